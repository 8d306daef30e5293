"""experiments/train.py as 2 processes x 4 CPU devices on a ``data=4,model=2`` mesh matches
the same run on one device.

JAX's multi-controller runtime on this machine: two processes joined by
``jax.distributed.initialize`` on localhost (cross-process collectives through gloo), one
``data=4,model=2`` mesh spanning both, orbax checkpoints written by both and resumed by both.
Every subprocess runs under a timeout and is killed if it overruns, so the test cannot hang.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # per launch; an unloaded 2-core machine needs a small fraction of this
FLAGS = ["--optimizer", "adamw", "--steps", "4", "--batch-size", "8", "--seq-len", "16",
         "--eval-every", "4", "--eval-batches", "1", "--log-every", "1", "--max-files", "40",
         "--no-progress"]
MESH = ["--mesh", "data=4,model=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}


def _launch(commands: list[list[str]], devices: int) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *c], cwd=ROOT,
                              env=_env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


def _hosts(out, *extra) -> list[str]:
    port = _free_port()
    return _launch([[*FLAGS, *MESH, "--out", str(out), "--coordinator", f"localhost:{port}",
                     "--num-processes", "2", "--process-id", str(i), *extra] for i in range(2)],
                   devices=4)


def _losses(out) -> list[float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines if line]


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    # the reference: the same run on one device, in this process
    one = train.train(train.parse_args([*FLAGS, "--out", str(tmp_path / "one")]))
    _hosts(tmp_path / "two", "--stop-after", "2")  # both processes write checkpoint 2
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir()) == [
        "2", "2.manifest.json"]
    assert len(_losses(tmp_path / "two")) == 2
    outs = _hosts(tmp_path / "two", "--resume")  # both restore it and finish the run
    timing = ("compile_s", "wall")  # each process's own clock
    summaries = [{k: v for k, v in json.loads(o[o.index("{"):]).items() if k not in timing}
                 for o in outs]
    assert summaries[0] == summaries[1]  # one run, seen alike by both processes
    # Same model, data and steps; the sharded run splits its reductions over 8 devices and
    # two processes (gloo between them), which reorders fp32 sums (3e-7 relative measured):
    # 1e-5 relative is ~100 ulps of a loss near 5, far below any real difference (one step
    # moves it ~1e-2). This is also the check that a --mesh run trains like one device.
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    assert summaries[0]["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)
