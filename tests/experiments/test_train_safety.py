"""train.py data safety: one run per folder, verified resume, divergence, corrupted checkpoints."""

import json

import numpy as np
import optax
import pytest

from experiments import checkpoints, train

TINY = dict(optimizer="adamw", learning_rate=1e-2, batch_size=4, seq_len=32, eval_every=50,
            log_every=1, max_files=40, progress=False)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]


def _flags(out, **kw):
    cfg = {**TINY, **kw}
    flags = ["--out", str(out), "--no-progress"]
    for k, v in cfg.items():
        if k != "progress":
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def _error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_one_run_per_folder_and_resume_checks_every_setting(tmp_path, capsys):
    out = tmp_path / "r"
    assert train.main(_flags(out, steps=2, seed=0)) == 0
    config = (out / "config.json").read_bytes()
    # a second fresh run into the same folder is refused: it would mix two runs
    assert train.main(_flags(out, steps=2, seed=1)) == 2
    line = _error(capsys)
    assert "is not empty" in line and "pass --resume" in line, line
    # a resume with other settings is refused in one line naming what differs
    for kw, words in [
        (dict(seed=1), "seed 0 -> 1"),
        (dict(optimizer="lion"), "optimizer 'adamw' -> 'lion'"),
        (dict(learning_rate=3e-3), "learning_rate 0.01 -> 0.003"),
        (dict(batch_size=2), "batch_size 4 -> 2"),
        (dict(schedule="rex"), "schedule 'cosine' -> 'rex'"),
        (dict(max_files=41), "max_files 40 -> 41"),
    ]:
        assert train.main([*_flags(out, steps=4, **kw), "--resume"]) == 2
        line = _error(capsys)
        assert "other settings" in line and words in line, line
    # fewer steps than the checkpoint holds
    assert train.main([*_flags(out, steps=1), "--resume"]) == 2
    assert "--steps 1 is below the step 2" in _error(capsys)
    assert (out / "config.json").read_bytes() == config  # nothing rewritten by refused resumes
    assert [r["step"] for r in _log(out)] == [1, 2]


def test_a_different_state_layout_is_one_readable_line(tmp_path, monkeypatch):
    out = tmp_path / "r"
    train.train(train.TrainConfig(**TINY, steps=1, out=str(out)))
    build = train.build_optimizer

    def other_layout(cfg):  # the same settings, but an optimizer whose state has changed
        tx, entry, peak = build(cfg)
        return optax.chain(tx, optax.scale_by_adam()), entry, peak

    monkeypatch.setattr(train, "build_optimizer", other_layout)
    with pytest.raises(checkpoints.CheckpointError, match="layout differs") as err:
        train.train(train.TrainConfig(**TINY, steps=2, out=str(out), resume=True))
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("flags", [["--spike-step", "2", "--spike-scale", "inf"]])
def test_a_diverging_run_exits_non_zero_and_keeps_the_last_finite_checkpoint(
    tmp_path, capsys, flags
):
    out = tmp_path / "r"
    assert train.main([*_flags(out, steps=4, ckpt_every=1), *flags]) == 1
    line = _error(capsys)
    assert "diverged" in line and "from step 3" in line and "ckpt/2" in line, line
    assert checkpoints.steps(out / "ckpt") == [2, 1]  # nothing saved at or after step 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at_step"] == 3 and summary["final_val_loss"] is None
    run = json.loads((out / "ckpt" / f"2{checkpoints.MANIFEST}").read_text())["run"]
    assert checkpoints.verify(out / "ckpt", 2, run)["step"] == 2  # intact


def _flip_one_bit(step_dir):
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    return data


def test_a_corrupted_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, capsys):
    out = tmp_path / "r"
    cfg = dict(**TINY, ckpt_every=1, out=str(out))
    train.train(train.TrainConfig(**cfg, steps=3))
    clean = _log(out)
    assert checkpoints.steps(out / "ckpt") == [3, 2]  # the last two are kept
    _flip_one_bit(out / "ckpt" / "3")
    capsys.readouterr()
    train.train(train.TrainConfig(**cfg, steps=3, resume=True))
    err = capsys.readouterr().err
    assert "ckpt/3: file" in err and "does not match its sha256" in err, err
    assert "resuming from the intact checkpoint" in err and "ckpt/2" in err
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert [r["train_loss"] for r in _log(out)] == [r["train_loss"] for r in clean]  # exact
    # no intact checkpoint at all: an error, never a silent fresh start
    for step in checkpoints.steps(out / "ckpt"):
        (out / "ckpt" / f"{step}{checkpoints.MANIFEST}").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint"):
        train.train(train.TrainConfig(**cfg, steps=4, resume=True))


def test_torn_log_line_is_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "r"
    train.train(train.TrainConfig(**TINY, steps=2, stop_after=1, out=str(out)))
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 2, "tokens": 2')  # a write cut short by a crash
    train.train(train.TrainConfig(**TINY, steps=2, out=str(out), resume=True))
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in _log(out)] == [1, 2]
    (out / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl: line 2 is not valid JSON"):
        train.Log(out / "log.jsonl", 2)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-5"], "--steps must be > 0, got -5"),
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--seq-len", "0"], "--seq-len must be > 0, got 0"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    assert train.main([*flags, "--out", str(out), "--max-files", "40"]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_checkpoint_manifest_catches_every_kind_of_damage(tmp_path):
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, np.float32)}
    run = checkpoints.digest({"a": 1})
    for step in (1, 2, 3):
        checkpoints.save(tmp_path, step, tree, run)
    assert checkpoints.steps(tmp_path) == [3, 2]
    assert checkpoints.verify(tmp_path, 3, run)["layout"] == [["['b']", [8], "float32"],
                                                              ["['w']", [8, 8], "float32"]]
    with pytest.raises(checkpoints.CheckpointError, match="another run"):
        checkpoints.verify(tmp_path, 3, checkpoints.digest({"a": 2}))
    (tmp_path / "3" / "extra").write_text("x")
    with pytest.raises(checkpoints.CheckpointError, match="extra is not in the manifest"):
        checkpoints.verify(tmp_path, 3, run)
    data = _flip_one_bit(tmp_path / "2")
    with pytest.raises(checkpoints.CheckpointError, match="does not match its sha256"):
        checkpoints.verify(tmp_path, 2, run)
    data.unlink()
    with pytest.raises(checkpoints.CheckpointError, match="is missing"):
        checkpoints.verify(tmp_path, 2, run)
