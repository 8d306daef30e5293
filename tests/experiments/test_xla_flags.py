"""XLA flags are set only where the installed jaxlib knows them (XLA aborts on unknown ones)."""

import experiments


def test_known_and_unknown_flags():
    assert experiments.xla_flag_known("xla_force_host_platform_device_count")
    assert not experiments.xla_flag_known("xla_cpu_no_such_flag_in_any_jaxlib")


def test_add_xla_flag_keeps_the_callers_value_and_skips_unknown_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    assert experiments.add_xla_flag("xla_backend_optimization_level", "0")
    assert experiments.add_xla_flag("xla_force_host_platform_device_count", "3")
    assert not experiments.add_xla_flag("xla_cpu_no_such_flag_in_any_jaxlib", "1")
    import os

    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_backend_optimization_level=2", "--xla_force_host_platform_device_count=3"]


def test_importing_experiments_runs_openblas_single_threaded_unless_the_caller_chose():
    import os
    import subprocess
    import sys

    code = "import os, experiments; print(os.environ['OPENBLAS_NUM_THREADS'])"
    for given, want in ((None, "1"), ("4", "4")):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if given is not None:
            env["OPENBLAS_NUM_THREADS"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(experiments.__path__[0]))
        assert out.stdout.strip() == want
