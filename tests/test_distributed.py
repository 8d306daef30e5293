"""Runs the multi-device checks (tests/multidevice/) in a process with 8 fake CPU devices."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
CHECKS = sorted(p.name for p in (HERE / "multidevice").glob("check_*.py"))
# Two processes of about equal length, one per xdist worker; each process start (imports,
# collection) costs ~5 s, so the checks share them: the two longest checks lead one each.
FIRST = ["check_recipes.py", "check_state_layout.py"]
GROUPS = [[c for c in FIRST if c in CHECKS], [c for c in CHECKS if c not in FIRST]]


@pytest.mark.parametrize("checks", GROUPS, ids="+".join)
def test_multidevice_checks_pass_on_eight_fake_cpu_devices(checks):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    env["JAX_PLATFORMS"] = "cpu"
    files = [str(HERE / "multidevice" / check) for check in checks]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
