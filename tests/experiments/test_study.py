"""The study's code path: sweep with edge extension and seeds (on a stand-in trainer whose loss
is a known function of the learning rate), resume without reruns, a torn JSONL tail, and one
small real study (two optimizers, real training) through the generated report."""

import json
import math
import pathlib

import jax
import pytest

from experiments import study


def _fake_train(best_lr):
    """A stand-in for train.train: loss minimal at ``best_lr``, a log with two evaluations."""
    calls = []

    def fake(cfg):
        calls.append((cfg.optimizer, cfg.learning_rate, cfg.seed))
        out = pathlib.Path(cfg.out)
        out.mkdir(parents=True)
        final = 2.0 + abs(math.log(cfg.learning_rate / best_lr[cfg.optimizer])) + 0.01 * cfg.seed
        log = [{"step": 1, "tokens": 32, "wall": 0.1, "val_loss": final + 1.0},
               {"step": 2, "tokens": 64, "wall": 0.2, "val_loss": final}]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return {"optimizer": cfg.optimizer, "learning_rate": cfg.learning_rate, "params": 10,
                "tokens": 64, "final_val_loss": final, "state_bytes_per_param": 8.0,
                "data": "test corpus"}

    return fake, calls


def _cfg(tmp_path, **kw):
    base = dict(optimizers=("adamw", "lion"), steps=2, points=4, extend=2, seeds=3,
                results=str(tmp_path / "study"), report_to=str(tmp_path / "RESULTS.md"))
    return study.StudyConfig(**{**base, **kw})


def test_grid_has_the_requested_points_geometric_around_the_registry_grid():
    entry = study.registry.get("adamw")
    grid = study.base_grid(entry, 5)
    assert len(grid) == 5 and grid == sorted(grid)
    assert set(entry.grid) <= set(grid)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert max(ratios) / min(ratios) < 1.2  # the registry grids are 1-3-10 steps
    assert study.base_grid(entry, 1) == [entry.lr]


def test_sweep_extends_past_an_edge_best_and_reruns_the_best_with_seeds(tmp_path, monkeypatch):
    fake, calls = _fake_train({"adamw": 3e-3, "lion": 0.1})  # lion's best is far above its grid
    monkeypatch.setattr(study.train, "train", fake)
    monkeypatch.setattr(study, "timing", lambda *a, **k: None)
    cfg = _cfg(tmp_path)
    study.run(cfg)
    lion = sorted(lr for o, lr, s in calls if o == "lion" and s == 0)
    assert len(lion) == cfg.points + cfg.extend and lion[-1] > max(study.registry.get("lion").grid)
    adamw = sorted(lr for o, lr, s in calls if o == "adamw" and s == 0)
    assert len(adamw) == cfg.points  # best inside the grid: no extension
    rows, target = study.analyse(cfg, study.Store(pathlib.Path(cfg.results)))
    assert rows["adamw"].lr == 3e-3 and len(rows["adamw"].seeds) == 3
    assert any("still at the edge" in n for n in rows["lion"].notes)
    assert {s for o, lr, s in calls if o == "lion" and lr == rows["lion"].lr} == {0, 1, 2}
    # resume: nothing is trained again
    calls.clear()
    study.run(cfg)
    assert calls == []
    # another setting is kept apart
    with pytest.raises(FileNotFoundError, match="no runs of this setting"):
        study.report(study.dataclasses.replace(cfg, steps=3))


def test_torn_last_line_is_dropped_and_its_run_redone(tmp_path, monkeypatch):
    fake, calls = _fake_train({"adamw": 3e-3})
    monkeypatch.setattr(study.train, "train", fake)
    monkeypatch.setattr(study, "timing", lambda *a, **k: None)
    cfg = _cfg(tmp_path, optimizers=("adamw",), points=1, extend=0, seeds=1)
    study.run(cfg)
    path = pathlib.Path(cfg.results) / "results.jsonl"
    lines = path.read_text().splitlines()
    run = next(x for x in lines if json.loads(x)["kind"] == "run")
    rest = [x for x in lines if x != run]
    path.write_text("".join(x + "\n" for x in rest) + run[:40])  # the run's record torn
    calls.clear()
    study.run(cfg)
    assert len(calls) == 1  # the torn run only
    assert all(json.loads(x) for x in path.read_text().splitlines())


def test_a_small_real_study_reports_a_row_per_optimizer_and_a_verdict_per_claim(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = _cfg(tmp_path, model="gpt2-tiny", steps=4, batch_size=2, seq_len=16, warmup=1,
               eval_every=2, eval_batches=1, points=1, extend=0, seeds=1, data=str(corpus),
               update_reps=2)
    study.run(cfg)
    text = study.report(cfg)
    for name in cfg.optimizers:
        assert f"| {name} |" in text
    for claim in study.CLAIMS:
        assert f"### {claim.title}: " in text
    assert "do not edit by hand" in text
    folder = pathlib.Path(cfg.results)
    for png in ("loss_vs_tokens.png", "loss_vs_wall.png", "lr_sensitivity.png"):
        assert (folder / png).stat().st_size > 1000
    store = study.Store(folder)
    timing = store.find("timing", {**cfg.setting(), "optimizer": "lion"})
    assert timing["ratio"] > 0 and timing["baseline_update_s"] > 0


def test_cli_rejects_an_unknown_optimizer_in_one_line(capsys, tmp_path):
    assert study.main(["--optimizers", "adamw,nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_a_diverged_run_is_recorded_as_such_and_never_chosen(tmp_path, monkeypatch):
    fake, calls = _fake_train({"adamw": 3e-3})

    def diverging(cfg):
        if cfg.learning_rate > 5e-3:
            raise study.train.Diverged("the run diverged at step 1")
        return fake(cfg)

    monkeypatch.setattr(study.train, "train", diverging)
    monkeypatch.setattr(study, "timing", lambda *a, **k: None)
    cfg = _cfg(tmp_path, optimizers=("adamw",), seeds=1)
    study.run(cfg)
    store = study.Store(pathlib.Path(cfg.results))
    bad = [r for r in store.records if r["kind"] == "run" and r["diverged"]]
    assert bad and all("diverged" in r["error"] for r in bad)
    rows, _ = study.analyse(cfg, store)
    assert rows["adamw"].lr == 3e-3


def test_diagnosis_variants_run_once_and_their_losses_reach_the_report(tmp_path, monkeypatch):
    fake, calls = _fake_train({"adamw": 3e-3, "perp_adamw": 3e-3, "perp_adamw:hidden_only": 3e-3,
                               "perp_adamw:no_decay": 3e-3})
    monkeypatch.setattr(study.train, "train", fake)
    monkeypatch.setattr(study, "timing", lambda *a, **k: None)
    cfg = _cfg(tmp_path, optimizers=("adamw", "perp_adamw"), points=1, extend=0, seeds=2)
    study.run(cfg)
    variants = sorted(o for o, lr, s in calls if ":" in o)
    assert variants == ["perp_adamw:hidden_only", "perp_adamw:no_decay"]
    assert "perp_adamw:hidden_only" not in study.registry.OPTIMIZERS  # registered only to train
    calls.clear()
    study.run(cfg)
    assert calls == []  # resumable like the sweep
    text = study.diagnosis_lines(cfg, study.Store(pathlib.Path(cfg.results)), "perp_adamw")
    assert "hidden matrices only" in text and "2.0000 (lr 0.003)" in text
    rows, _ = study.analyse(cfg, study.Store(pathlib.Path(cfg.results)))
    assert set(rows) == {"adamw", "perp_adamw"}  # variants are not optimizers of the table


def test_every_diagnosis_variant_builds_and_updates():
    import jax.numpy as jnp
    import optax

    params = {"wte": {"embedding": jnp.ones((8, 4))}, "h": {"kernel": jnp.ones((4, 4)) * 0.1},
              "ln": {"scale": jnp.ones(4)}}
    sched = optax.constant_schedule(1e-2)
    for name, diag in study.DIAGNOSES.items():
        assert name in study.registry.OPTIMIZERS, name
        for v in diag.variants:
            lr, build = v.make(0.01, 0.003)
            tx = build(sched, 10)
            u, _ = tx.update(params, tx.init(params), params)
            assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u)), (name, v.name)
