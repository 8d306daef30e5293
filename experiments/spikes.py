"""Gradient-spike recovery: inject one huge gradient into a real run and watch the loss.

    python -m experiments.spikes --optimizers adamw,spam,stable_spam --steps 200 --spike-step 100

Each optimizer is trained twice on the same model and batches: once cleanly and once with the
gradient at ``--spike-step`` replaced by ``g + scale * ||g|| * d`` for a fixed random unit
direction ``d`` (``--scale``, default 1000; train.py's ``spike_step``). Gradient clipping is
off in both runs, so the optimizer alone has to absorb the spike. The table (stdout and
``results/spikes/spikes.md``) gives, per optimizer, the training loss just before the spike,
the worst loss after it, the number of steps until the spiked run's loss is back within
``--tolerance`` of the clean run's, and both final validation losses; ``spikes.png`` plots the
training-loss curves of both runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from typing import Any

import numpy as np

from experiments import data as data_lib
from experiments import registry, train


def run(optimizer: str, spiked: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One training run (log every step); returns its summary and training-loss curve."""
    out = pathlib.Path(args.out) / "runs" / f"{optimizer}-{'spike' if spiked else 'clean'}"
    cfg = train.TrainConfig(
        optimizer=optimizer,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_clip=0.0,
        log_every=1,
        eval_every=args.steps,
        seed=args.seed,
        max_files=args.max_files,
        out=str(out),
        progress=False,
        ckpt_every=-1,
        spike_step=args.spike_step if spiked else -1,
        spike_scale=args.scale,
    )
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: train.py keeps one per --out
    summary = train.train(cfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    return {**summary, "loss": [r["train_loss"] for r in log]}


def recovery(clean: list[float], spiked: list[float], at: int, tolerance: float) -> int | None:
    """Steps after the spike until ``spiked`` stays within ``tolerance`` (relative, on a 5-step
    mean) of ``clean`` for the rest of the run; None if it never does."""
    c, s = _smooth(clean), _smooth(spiked)
    ok = np.abs(s - c) <= tolerance * np.abs(c)
    for k in range(at, len(ok)):
        if ok[k:].all():
            return k - at
    return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input gives a one-line error and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="adamw,spam,stable_spam")
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--spike-step", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1000.0)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--out", default="results/spikes")
    args = parser.parse_args(argv)
    names = [o for o in args.optimizers.split(",") if o]
    try:
        for name in names:
            registry.get(name)
        if not 0 <= args.spike_step < args.steps - 1:
            raise ValueError(
                f"--spike-step must be in [0, {args.steps - 1}), got {args.spike_step}"
            )
        results = {n: (run(n, False, args), run(n, True, args)) for n in names}
    except (registry.UnknownOptimizer, data_lib.DataError, ValueError, train.Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    at = args.spike_step
    head = [
        "optimizer",
        "loss before",
        "worst after",
        "steps to recover",
        "gap at end",
        "final val clean",
        "final val spiked",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for name, (clean, spiked) in results.items():
        steps = recovery(clean["loss"], spiked["loss"], at, args.tolerance)
        after = np.asarray(spiked["loss"][at + 1 :])
        worst = float(np.where(np.isfinite(after), after, np.inf).max())
        gap = float(np.mean(np.subtract(spiked["loss"][-10:], clean["loss"][-10:])))
        rows.append(
            {
                "optimizer": name,
                "gap": gap,
                "recover_steps": steps,
                "worst": worst,
                "clean": clean["loss"],
                "spiked": spiked["loss"],
            }
        )
        lines.append(
            f"| {name} | {spiked['loss'][at]:.3f} | {worst:.3f} | "
            f"{'never' if steps is None else steps} | {gap:+.3f} | "
            f"{clean['final_val_loss']:.3f} | {spiked['final_val_loss']:.3f} |"
        )
    md = "\n".join(lines)
    intro = (
        f"# Gradient-spike recovery\n\n{args.model}, {args.steps} steps, a spike of "
        f"{args.scale:g} x ||g|| in a random direction at step {at}, no gradient clipping. "
        f"Recovery: the spiked run's 5-step mean loss stays within {args.tolerance:.0%} of the "
        f"clean run's. Gap at end: mean spiked - clean training loss over the last 10 steps.\n\n"
    )
    (out / "spikes.md").write_text(intro + md + "\n")
    (out / "spikes.json").write_text(json.dumps(rows))
    plot = _plot(rows, at, out / "spikes.png")
    print(md)
    print(f"\ntable: {out / 'spikes.md'}\nplot:  {plot}")
    return 0


def _smooth(x: list[float], k: int = 5) -> np.ndarray:
    return np.convolve(np.asarray(x, np.float64), np.ones(k) / k, mode="valid")


def _plot(rows: list[dict[str, Any]], at: int, path: pathlib.Path) -> pathlib.Path:
    import matplotlib  # noqa: PLC0415 - optional (experiments extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i, r in enumerate(rows):
        color = f"C{i}"
        clean, spiked = _smooth(r["clean"]), _smooth(r["spiked"])
        steps = np.arange(len(clean)) + 2  # centre of the 5-step window
        top.plot(steps, clean, color=color, alpha=0.4, lw=1, ls="--")
        top.plot(steps, spiked, color=color, lw=1.5, label=r["optimizer"])
        bottom.plot(steps, spiked - clean, color=color, lw=1.5, label=r["optimizer"])
    finite = [v for r in rows for v in _smooth(r["clean"]) if np.isfinite(v)]
    top.set_ylim(min(finite) * 0.95, np.percentile(finite, 95) * 1.2)
    top.set_ylabel("training loss (5-step mean)\nsolid: spiked, dashed: clean")
    bottom.set_ylabel("spiked - clean")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.axvline(at, color="k", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
