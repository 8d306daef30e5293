"""Compare optimizers on the same model, data and token budget, each at its best learning rate.

    python -m experiments.compare --name demo --optimizers adamw,muon,conda,spam,apollo_mini \\
        --model gpt2-tiny --steps 200
    python -m experiments.compare --name demo --report      # rebuild table + plots from the logs

Every optimizer is trained once per learning rate of its registry grid (``--sweep 1`` keeps only
the registry default; fair tuning: each recipe is reported at its own best rate). Runs go to
``results/<name>/runs/<optimizer>/lr<rate>-<digest>/`` (train.py's JSONL log and summary; the
digest covers every setting that changes a result) and are skipped when their summary already
exists, so an interrupted comparison picks up where it stopped and a comparison with other
settings (``--steps``, ``--seed``, ...) never reuses another's runs. ``results/<name>/`` then
holds ``results.md`` (the table), ``results.jsonl`` (one line per run, curves and settings
included, appended to and never rewritten: the source of ``--report``, which tables the records
whose settings are the invoked comparison's, the latest per run), ``loss_vs_tokens.png``,
``loss_vs_wall.png`` and ``lr_sensitivity.png``.

Table columns, per optimizer at its best learning rate:
  * best / final validation loss;
  * tokens and wall time to reach the target loss (``--target``; default: AdamW's best final
    validation loss), linearly interpolated between evaluations, "-" when never reached;
  * speedup vs AdamW in tokens to the target (AdamW tokens / optimizer tokens);
  * optimizer-state bytes per parameter (``optax_ext.state_nbytes`` of the real state);
  * update time as a ratio to AdamW's, measured in this run on this machine (the jitted optimizer
    update alone, Hessian estimates included, averaged over consecutive steps; "-" when
    AdamW's was measured by another invocation). Absolute times are not reported: on a CPU
    they say little about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

import models
from experiments import bench_step, checkpoints, registry, train
from experiments import data as data_lib

BASELINE = "adamw"


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """A comparison: the optimizers, the shared run settings and the sweep."""

    name: str = "compare"
    optimizers: tuple[str, ...] = ("adamw", "muon", "conda", "spam", "apollo_mini")
    model: str = "gpt2-tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    eval_every: int = 25
    eval_batches: int = 4
    sweep: int = 3  # learning rates per optimizer (from the registry grid, centred on its default)
    target: float | None = None  # None: AdamW's best final validation loss
    seed: int = 0
    data: str | None = None
    max_files: int | None = None
    results: str = "results"
    update_reps: int = 80  # >= twice the longest refresh period of the demo's recipes


def sweep_lrs(entry: registry.Optimizer, count: int) -> tuple[float, ...]:
    """``count`` learning rates of ``entry``'s grid, closest to its default first."""
    if count < 1:
        raise ValueError(f"--sweep must be >= 1, got {count}")
    ranked = sorted(entry.grid, key=lambda lr: abs(math.log(lr / entry.lr)))
    return tuple(sorted(ranked[:count]))


def train_config(
    cfg: CompareConfig, optimizer: str, lr: float, out: str = ""
) -> train.TrainConfig:
    """The :class:`train.TrainConfig` of one run of the comparison."""
    return train.TrainConfig(
        optimizer=optimizer,
        learning_rate=lr,
        model=cfg.model,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches,
        log_every=cfg.eval_every,
        seed=cfg.seed,
        data=cfg.data,
        max_files=cfg.max_files,
        out=out,
        ckpt_every=-1,
        progress=False,
    )


def settings(cfg: CompareConfig, optimizer: str, lr: float) -> dict[str, Any]:
    """Every setting that changes one run's record: train.py's, plus the evaluation period."""
    tcfg = train_config(cfg, optimizer, lr)
    return {**train.run_settings(tcfg), "eval_every": tcfg.eval_every}


def _group(record_settings: dict[str, Any]) -> dict[str, Any]:
    """The settings shared by all runs of one comparison (optimizer and learning rate aside)."""
    return {k: v for k, v in record_settings.items() if k not in ("optimizer", "learning_rate")}


def run_dir(cfg: CompareConfig, optimizer: str, lr: float) -> pathlib.Path:
    """Where one run of the comparison lives (a digest of its settings in the name)."""
    tag = checkpoints.digest(settings(cfg, optimizer, lr))[:8]
    return pathlib.Path(cfg.results) / cfg.name / "runs" / optimizer / f"lr{lr:g}-{tag}"


def run_one(cfg: CompareConfig, optimizer: str, lr: float) -> dict[str, Any]:
    """Trains (or reuses) one run and returns its record: summary, settings and curves.

    An unfinished run (no summary: the comparison was interrupted) is started again from
    scratch; a run that diverges is recorded as such (no final loss).
    """
    out = run_dir(cfg, optimizer, lr)
    if not (out / "summary.json").exists():
        if out.exists():
            print(f"note: {out} is an unfinished run; starting it again", file=sys.stderr)
            shutil.rmtree(out)
        try:
            train.train(train_config(cfg, optimizer, lr, str(out)))
        except train.Diverged as e:
            print(f"note: {optimizer} lr {lr:g}: {e}", file=sys.stderr)
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    evals = [r for r in log if "val_loss" in r]
    return {
        **summary,
        "settings": settings(cfg, optimizer, lr),
        "curve": {
            "tokens": [r["tokens"] for r in evals],
            "wall": [r["wall"] for r in evals],
            "val_loss": [r["val_loss"] for r in evals],
        },
    }


@functools.partial(jax.jit, static_argnums=0)
def _model_grads(graphdef, params, other, x):
    """The gradients whose updates :func:`update_time` times (compiled once per model and
    batch shape, shared by every optimizer of a comparison)."""
    return jax.grad(lambda p: models.loss_fn(graphdef, p, other, x, x)[0])(params)


def update_time(cfg: CompareConfig, optimizer: str, lr: float) -> float:
    """Mean seconds of one jitted optimizer update on the comparison's model (this machine).

    The state is threaded through ``cfg.update_reps`` consecutive updates, so periodic work
    (projector refreshes, preconditioner updates, Hessian estimates every k steps) is counted
    at its real frequency when ``update_reps`` covers its period.
    """
    reps = cfg.update_reps
    tcfg = train_config(cfg, optimizer, lr)
    tx, entry, _ = train.build_optimizer(tcfg)
    model_cfg = models.ModelConfig.preset(cfg.model)
    graphdef, params, other = models.split_model(models.make_model(model_cfg, seed=cfg.seed))
    seq_len = min(cfg.seq_len, model_cfg.block_size)
    rng = np.random.default_rng(cfg.seed)
    x = rng.integers(0, model_cfg.vocab_size, (cfg.batch_size, seq_len)).astype(np.int32)
    grads = _model_grads(graphdef, params, other, x)

    @jax.jit
    def update(grads, opt_state, params):
        extra = train.update_extras(graphdef, entry.needs, other, x, x, jax.random.PRNGKey(0))
        return tx.update(grads, opt_state, params, **extra)

    times = bench_step.update_times(update, grads, tx.init(params), params, reps)
    return sum(times) / reps


def crossing(xs: list[float], losses: list[float], target: float) -> float | None:
    """The first ``x`` at which the piecewise-linear loss curve reaches ``target`` (or None)."""
    prev_x, prev_l = 0.0, math.inf
    for x, loss in zip(xs, losses):
        if loss <= target:
            if not math.isfinite(prev_l):
                return x
            return prev_x + (x - prev_x) * (prev_l - target) / (prev_l - loss)
        prev_x, prev_l = x, loss
    return None


def best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer, the run with the lowest final validation loss (NaN/diverged runs last)."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = _final(r)
        if r["optimizer"] not in best or key < _final(best[r["optimizer"]]):
            best[r["optimizer"]] = r
    return best


def _final(run: dict[str, Any]) -> float:
    v = run.get("final_val_loss")
    return v if v is not None and math.isfinite(v) else math.inf


def table(runs: list[dict[str, Any]], target: float | None = None) -> tuple[str, float]:
    """The markdown results table and the target loss it used."""
    best = best_runs(runs)
    if target is None:
        base = best.get(BASELINE)
        target = _final(base) if base is not None else min(_final(r) for r in best.values())
    rows = []
    base_tokens = None
    if BASELINE in best:
        b = best[BASELINE]["curve"]
        base_tokens = crossing(b["tokens"], b["val_loss"], target)
    base = best.get(BASELINE, {})
    base_update, base_batch = base.get("update_s"), base.get("update_batch")
    for name, r in sorted(best.items(), key=lambda kv: _final(kv[1])):
        c = r["curve"]
        tok = crossing(c["tokens"], c["val_loss"], target)
        wall = crossing(c["wall"], c["val_loss"], target)
        speed = base_tokens / tok if tok and base_tokens else None
        upd = r.get("update_s")
        same_batch = r.get("update_batch") == base_batch  # timed in the same invocation
        ratio = upd / base_update if upd and base_update and same_batch else None
        rows.append(
            [
                name,
                f"{r['learning_rate']:g}",
                _fmt(r.get("best_val_loss"), ".4f"),
                _fmt(r.get("final_val_loss"), ".4f"),
                _fmt(tok, ",.0f"),
                _fmt(wall, ".1f"),
                _fmt(speed, ".2f", "x"),
                _fmt(r.get("state_bytes_per_param"), ".2f"),
                _fmt(ratio, ".2f", "x"),
            ]
        )
    head = [
        "optimizer",
        "best lr",
        "best val",
        "final val",
        f"tokens to {target:.4f}",
        "wall s to target",
        "speedup vs AdamW",
        "state B/param",
        "update time / AdamW",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines), target


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) + suffix


def plots(runs: list[dict[str, Any]], folder: pathlib.Path) -> list[pathlib.Path]:
    """Validation loss vs tokens and vs wall time (best lr each), and lr sensitivity."""
    import matplotlib  # noqa: PLC0415 - optional (experiments extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    best = best_runs(runs)
    paths = []
    for axis, label, fname in (
        ("tokens", "tokens", "loss_vs_tokens.png"),
        ("wall", "wall time (s, this machine)", "loss_vs_wall.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in sorted(best.items()):
            c = r["curve"]
            ax.plot(c[axis], c["val_loss"], marker=".", label=f"{name} (lr {r['learning_rate']:g})")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        paths.append(folder / fname)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted(best):
        pts = sorted((r["learning_rate"], _final(r)) for r in runs if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [min(p[1], 1e3) for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "lr_sensitivity.png", dpi=110)
    plt.close(fig)
    paths.append(folder / "lr_sensitivity.png")
    return paths


def _adopt(record: dict[str, Any], cfg: CompareConfig) -> dict[str, Any]:
    """A record written before records carried settings, given the invoked comparison's settings
    when its model, steps and tokens agree, and a portable data name."""
    want = settings(cfg, record["optimizer"], record["learning_rate"])
    seq_len = min(cfg.seq_len, models.ModelConfig.preset(cfg.model).block_size)
    agree = (record["model"], record["steps"], record["tokens"]) == (
        cfg.model,
        cfg.steps,
        cfg.steps * cfg.batch_size * seq_len,
    )
    if not agree:
        raise ValueError(
            f"a record without settings ({record['optimizer']} lr {record['learning_rate']:g}: "
            f"{record['model']}, {record['steps']} steps, {record['tokens']} tokens) does not "
            "match the invoked comparison; pass its --model/--steps/--batch-size/--seq-len"
        )
    data = data_lib.portable_name(record["data"], max_files=cfg.max_files)
    return {**record, "data": data, "settings": want}


def load_records(folder: pathlib.Path, cfg: CompareConfig) -> list[dict[str, Any]]:
    """The records of ``results.jsonl`` (older records given settings and portable data names,
    rewritten in place once, every record kept)."""
    source = folder / "results.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no results to report (run the comparison first)")
    records = []
    for i, line in enumerate(source.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{source}: line {i + 1} is not valid JSON") from None
    if any("settings" not in r for r in records):
        records = [r if "settings" in r else _adopt(r, cfg) for r in records]
        tmp = source.with_name(source.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, source)
        print(f"note: {source}: older records given their settings and data names", flush=True)
    return records


def report(
    folder: pathlib.Path, cfg: CompareConfig, target: float | None = None
) -> tuple[str, list[pathlib.Path]]:
    """Writes ``results.md`` and the plots from the records of ``results.jsonl`` whose settings
    are ``cfg``'s (the latest record per run); returns the table and the plots."""
    records = load_records(folder, cfg)
    group = _group(settings(cfg, BASELINE, 1.0))
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if _group(r["settings"]) == group:
            latest[json.dumps(r["settings"], sort_keys=True)] = r
    runs = list(latest.values())
    if not runs:
        raise ValueError(
            f"{folder / 'results.jsonl'}: no records with these settings "
            f"({', '.join(f'{k}={v}' for k, v in group.items())})"
        )
    md, used = table(runs, target)
    first = runs[0]
    header = (
        f"# {folder.name}\n\n{first['model']} ({first['params']:,} parameters), "
        f"{first['steps']} steps, {first['tokens']:,} tokens per run, data: {first['data']}.\n"
        f"Each optimizer at its best learning rate of the sweep; target loss {used:.4f}.\n"
        "Update time is a ratio measured in the same run on the same machine.\n\n"
    )
    (folder / "results.md").write_text(header + md + "\n")
    return md, plots(runs, folder)


def compare(cfg: CompareConfig) -> tuple[str, list[pathlib.Path]]:
    """Runs the comparison, appends its records to ``results/<name>/results.jsonl`` and writes
    the report; returns the table and plot paths."""
    entries = [registry.get(name) for name in cfg.optimizers]  # fails early on unknown names
    folder = pathlib.Path(cfg.results) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for entry in entries:
        for lr in sweep_lrs(entry, cfg.sweep):
            t = time.perf_counter()
            run = run_one(cfg, entry.name, lr)
            print(
                f"{entry.name:>12} lr {lr:<8g} final val {_fmt(run['final_val_loss'], '.4f')}"
                f"  ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
            runs.append(run)
    batch = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, best in best_runs(runs).items():
        seconds = update_time(cfg, name, best["learning_rate"])
        for r in runs:
            if r["optimizer"] == name:
                r["update_s"], r["update_batch"] = seconds, batch
    with (folder / "results.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in runs))
    return report(folder, cfg, cfg.target)


def parse_args(
    argv: list[str] | None = None, defaults: CompareConfig | None = None
) -> tuple[CompareConfig, bool]:
    """A :class:`CompareConfig` (flags over ``defaults``) and the ``--report`` flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = defaults or CompareConfig()
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--optimizers", default=",".join(defaults.optimizers))
    for f in ("model", "data", "results"):
        parser.add_argument(f"--{f}", default=getattr(defaults, f))
    for f in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "sweep", "seed",
              "max_files", "update_reps"):
        parser.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(defaults, f))
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--report", action="store_true", help="rebuild table + plots only")
    args = vars(parser.parse_args(argv))
    only_report = args.pop("report")
    args["optimizers"] = tuple(o.strip() for o in args["optimizers"].split(",") if o.strip())
    return CompareConfig(**args), only_report


def main(argv: list[str] | None = None, defaults: CompareConfig | None = None) -> int:
    """Command-line entry point (flags over ``defaults``); bad input gives a one-line error and
    exit status 2."""
    try:
        cfg, only_report = parse_args(argv, defaults)
        folder = pathlib.Path(cfg.results) / cfg.name
        md, paths = report(folder, cfg, cfg.target) if only_report else compare(cfg)
    except (registry.UnknownOptimizer, data_lib.DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"\ntable: {folder / 'results.md'}")
    for p in paths:
        print(f"plot:  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
