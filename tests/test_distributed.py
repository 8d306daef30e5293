"""Runs the multi-device checks (tests/multidevice/) in a process with 8 fake CPU devices."""

import os
import pathlib
import subprocess
import sys

import pytest

import experiments

HERE = pathlib.Path(__file__).parent
# Checks that measure a recipe's numerical sensitivity (chaotic SOAP dynamics): they run with
# XLA's default code generation, the one users get, not the suite's compile-speed flags
# (tests/conftest.py), which round differently and move the measured sensitivities.
DEFAULT_CODEGEN = {"check_soap_cosmos.py"}


@pytest.mark.parametrize("check", sorted(p.name for p in (HERE / "multidevice").glob("check_*.py")))
def test_multidevice_checks_pass_on_eight_fake_cpu_devices(check):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    if check in DEFAULT_CODEGEN:  # explicit, or the subprocess's conftest would set it again
        flags = [f for f in flags if "fusion_emitters" not in f]
        if experiments.xla_flag_known("xla_cpu_use_fusion_emitters"):
            flags.append("--xla_cpu_use_fusion_emitters=true")
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    env["JAX_PLATFORMS"] = "cpu"
    files = [str(HERE / "multidevice" / check)]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
