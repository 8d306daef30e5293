"""Runs the multi-device checks (tests/multidevice/) in a process with 8 fake CPU devices."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
@pytest.mark.parametrize("check", sorted(p.name for p in (HERE / "multidevice").glob("check_*.py")))
def test_multidevice_checks_pass_on_eight_fake_cpu_devices(check):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
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
