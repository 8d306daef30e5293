"""The study: every registry optimizer, tuned, on one model, token budget and schedule.

    python -m experiments.study                       # run (or continue) the study
    python -m experiments.study --report              # docs/RESULTS.md + plots from the JSONL
    python -m experiments.study --model llama-tiny --steps 2000 --results results/study-big

Every optimizer of ``experiments/registry.py`` (AdamW, optax's Muon and every recipe) trains the
same model on the same data with the same batch, token budget and warm-up + cosine schedule:

1. **Sweep**: ``--points`` (>= 4) peak learning rates per optimizer, geometric around the
   registry default (its grid, extended by the grid's own ratio). When the best rate of the
   sweep lies on an edge of the grid, the grid is extended past that edge (up to ``--extend``
   times) and the report says so.
2. **Seeds**: the best rate is rerun with ``--seeds`` seeds in all (model initialisation and
   batch order both change with the seed).
3. **Update time**: the jitted optimizer update alone, as a ratio to AdamW's measured in the
   same process, on the study's model.

Each finished run appends one record to ``<results>/results.jsonl``, keyed by every setting
that changes its result (optimizer, learning rate, seed, model, steps, batch, sequence length,
schedule, warm-up, clipping, evaluation, data); a record already there is never run again, so
a long study can be spread over several sittings and an interrupted one loses at most the run in
progress. Records of other settings in the same file are kept and ignored by the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from experiments import compare, registry, train
from experiments import data as data_lib

BASELINE = "adamw"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's shared settings (each is a ``--flag``)."""

    optimizers: tuple[str, ...] = tuple(e.name for e in registry.ENTRIES)
    model: str = "gpt2-tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    schedule: str = "cosine"
    warmup: int = 20
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 4
    points: int = 4  # learning rates per optimizer before edge extension
    extend: int = 2  # at most this many extra points past an edge
    seeds: int = 3  # seeds of the best learning rate, in all
    data: str | None = None
    max_files: int | None = None
    update_reps: int = 40
    results: str = "results/study"
    report_to: str = "docs/RESULTS.md"

    def setting(self) -> dict[str, Any]:
        """Every shared setting that changes a run's result."""
        keys = ("model", "steps", "batch_size", "seq_len", "schedule", "warmup", "grad_clip",
                "eval_every", "eval_batches", "data", "max_files")
        return {k: getattr(self, k) for k in keys}

    def setting_id(self) -> str:
        """A short hash of :meth:`setting`, naming the study's run folders."""
        blob = json.dumps(self.setting(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def run_key(cfg: StudyConfig, optimizer: str, lr: float, seed: int) -> dict[str, Any]:
    """The full key of one run: the shared setting plus optimizer, learning rate and seed."""
    return {**cfg.setting(), "optimizer": optimizer, "learning_rate": float(f"{lr:.6g}"),
            "seed": seed}


# ---------------------------------------------------------------------------------------------
# The JSONL store
# ---------------------------------------------------------------------------------------------


class Store:
    """``results.jsonl``: append-only records, looked up by their key."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.path = folder / "results.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # a torn last line: the run it held is redone
                        print(f"{self.path}: dropping a torn last line", file=sys.stderr)
                        self._rewrite()
                        break
                    raise ValueError(f"{self.path}:{i + 1}: not a JSON record") from None

    def _rewrite(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def find(self, kind: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The record of ``kind`` with exactly ``key`` (the latest one), or None."""
        found = [r for r in self.records if r.get("kind") == kind and r.get("key") == key]
        return found[-1] if found else None

    def add(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (flushed and fsynced line by line)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _round(lr: float) -> float:
    """Two significant digits, so that grids read as 1e-3, 3.2e-3, 1e-2."""
    return float(f"{lr:.2g}")


def grid_ratio(grid: list[float]) -> float:
    """The geometric step of a sorted grid (3 for a single point, at least 2)."""
    ratio = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1)) if len(grid) > 1 else 3.0
    return max(ratio, 2.0)


def base_grid(entry: registry.Optimizer, points: int) -> list[float]:
    """``points`` geometric learning rates around ``entry``'s default: its grid, extended by the
    grid's own ratio alternately above and below (or its ``points`` rates nearest the default)."""
    if points < 1:
        raise ValueError(f"--points must be >= 1, got {points}")
    grid = sorted(entry.grid)
    if points <= len(grid):
        return list(compare.sweep_lrs(entry, points))
    ratio = grid_ratio(grid)
    up, k_up, k_down = True, 0, 0
    while len(grid) < points:
        if up:
            k_up += 1
            grid = grid + [_round(entry.grid[-1] * ratio**k_up)]
        else:
            k_down += 1
            grid = [_round(min(entry.grid) / ratio**k_down)] + grid
        up = not up
    return grid


def final_loss(record: dict[str, Any] | None) -> float:
    """The run's final validation loss, +inf for a diverged or missing run."""
    if record is None or record.get("diverged"):
        return math.inf
    v = record.get("final_val_loss")
    return v if v is not None and math.isfinite(v) else math.inf


def run_one(cfg: StudyConfig, store: Store, optimizer: str, lr: float, seed: int,
            kind: str = "run") -> dict:
    """Trains one run unless its record of ``kind`` exists; returns the record."""
    key = run_key(cfg, optimizer, lr, seed)
    done = store.find(kind, key)
    if done is not None:
        return done
    folder = optimizer.replace(":", "__")
    out = pathlib.Path(cfg.results) / "runs" / cfg.setting_id() / folder / f"lr{lr:g}_s{seed}"
    if out.exists():  # an interrupted run of this key: its partial files are redone
        shutil.rmtree(out)
    tcfg = train.TrainConfig(
        optimizer=optimizer, learning_rate=lr, model=cfg.model, steps=cfg.steps,
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, schedule=cfg.schedule,
        warmup=cfg.warmup, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches, log_every=cfg.eval_every, seed=seed, data=cfg.data,
        max_files=cfg.max_files, out=str(out), ckpt_every=-1, progress=False,
    )
    t = time.perf_counter()
    try:
        summary = train.train(tcfg)
        diverged, error = not math.isfinite(summary.get("final_val_loss") or math.nan), None
    except train.Diverged as e:  # a result of the sweep (too high a rate), not a failure
        summary = {"optimizer": optimizer, "learning_rate": lr}
        diverged, error = True, str(e)
    log_path = out / "log.jsonl"
    log = [json.loads(x) for x in log_path.read_text().splitlines() if x] if log_path.exists() else []
    evals = [r for r in log if "val_loss" in r]
    record = {
        "kind": kind,
        "key": key,
        **summary,
        "diverged": diverged,
        "error": error,
        "curve": {
            "tokens": [r["tokens"] for r in evals],
            "wall": [r["wall"] for r in evals],
            "val_loss": [r["val_loss"] for r in evals],
        },
    }
    store.add(record)
    shown = "diverged" if diverged else f"{final_loss(record):.4f}"
    print(f"{optimizer:>14} lr {lr:<9g} seed {seed}  final val {shown}  "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return record


def sweep(cfg: StudyConfig, store: Store, entry: registry.Optimizer) -> tuple[float, list[str]]:
    """Sweeps ``entry`` at seed 0 (extending past an edge best); returns its best lr and notes."""
    grid = base_grid(entry, cfg.points)
    ratio = grid_ratio(sorted(entry.grid))
    runs = {lr: run_one(cfg, store, entry.name, lr, 0) for lr in grid}
    notes: list[str] = []
    for _ in range(cfg.extend):
        best = min(runs, key=lambda lr: final_loss(runs[lr]))
        lrs = sorted(runs)
        if not math.isfinite(final_loss(runs[best])):
            break
        if best == lrs[0]:
            new = _round(lrs[0] / ratio)
        elif best == lrs[-1]:
            new = _round(lrs[-1] * ratio)
        else:
            break
        notes.append(f"grid extended to {new:g} (best was at the edge {best:g})")
        runs[new] = run_one(cfg, store, entry.name, new, 0)
    best = min(runs, key=lambda lr: final_loss(runs[lr]))
    if best in (min(runs), max(runs)) and len(runs) > 2:
        notes.append(f"best lr {best:g} still at the edge of the swept range")
    return best, notes


def timing(cfg: StudyConfig, store: Store, names: Iterable[str], best: dict[str, float]) -> None:
    """Update time of every optimizer not yet timed, with AdamW timed in the same process."""
    todo = [n for n in names if store.find("timing", {**cfg.setting(), "optimizer": n}) is None]
    if not todo:
        return
    ccfg = compare.CompareConfig(
        model=cfg.model, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        update_reps=cfg.update_reps,
    )
    base = compare.update_time(ccfg, BASELINE, best.get(BASELINE, registry.get(BASELINE).lr))
    for name in todo:
        seconds = compare.update_time(ccfg, name, best[name]) if name != BASELINE else base
        store.add({"kind": "timing", "key": {**cfg.setting(), "optimizer": name},
                   "update_s": seconds, "baseline_update_s": base, "ratio": seconds / base})


def run(cfg: StudyConfig) -> None:
    """Runs (or continues) the study: sweeps, seeds, update times; then writes the report."""
    entries = [registry.get(n) for n in cfg.optimizers]  # unknown names fail before any run
    if cfg.points < 1 or cfg.seeds < 1 or cfg.steps < 1:
        raise ValueError("--points, --seeds and --steps must be >= 1")
    store = Store(pathlib.Path(cfg.results))
    best: dict[str, float] = {}
    for entry in entries:
        lr, notes = sweep(cfg, store, entry)
        best[entry.name] = lr
        store_notes(store, cfg, entry.name, notes)
    for entry in entries:
        for seed in range(1, cfg.seeds):
            run_one(cfg, store, entry.name, best[entry.name], seed)
    timing(cfg, store, [e.name for e in entries], best)
    diagnose(cfg, store, best)


def store_notes(store: Store, cfg: StudyConfig, name: str, notes: list[str]) -> None:
    """Records the sweep's notes for ``name`` (once per setting)."""
    key = {**cfg.setting(), "optimizer": name}
    if store.find("sweep", key) is None or store.find("sweep", key).get("notes") != notes:
        store.add({"kind": "sweep", "key": key, "notes": notes})


# ---------------------------------------------------------------------------------------------
# Diagnoses: is a recipe that trains worse than AdamW wrong, or is it the method at this scale?
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One controlled change of an optimizer, trained at the study's setting (seed 0).

    Attributes:
      name: short label (the record's optimizer is ``"<optimizer>:<name>"``).
      what: what changes, for the report.
      make: ``(best lr of the optimizer, best lr of AdamW) -> (lr, build)`` where ``build`` is a
        registry builder ``(lr_schedule, steps) -> GradientTransformation``.
    """

    name: str
    what: str
    make: Callable[[float, float], tuple[float, registry.Build]]


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Why an optimizer trains worse than AdamW here: the finding, and the runs behind it."""

    finding: str
    variants: tuple[Variant, ...] = ()


def _perp_on_hidden_only(lr: float, _: float) -> tuple[float, registry.Build]:
    import optax  # noqa: PLC0415

    import optax_ext  # noqa: PLC0415

    def build(sched, steps):
        return optax.partition(
            {"hidden": optax_ext.perp_adamw(sched, 0.9, 0.95, weight_decay=0.1),
             "other": optax.adamw(sched, 0.9, 0.95, weight_decay=0.1)},
            optax_ext.labels.hidden_matrices)
    return lr, build


def _perp_no_decay(lr: float, _: float) -> tuple[float, registry.Build]:
    import optax_ext  # noqa: PLC0415

    return lr, lambda sched, steps: optax_ext.perp_adamw(sched, 0.9, 0.95, weight_decay=0.0)


def _auon_adam_at_adamw_lr(lr: float, adamw_lr: float) -> tuple[float, registry.Build]:
    import optax_ext  # noqa: PLC0415

    ratio = adamw_lr / lr  # the auxiliary Adam peaks at AdamW's best lr, same schedule shape
    return lr, lambda sched, steps: optax_ext.auon(
        sched, adam_learning_rate=lambda t: sched(t) * ratio)


def _sign_like(opt: str) -> str:
    return (f"{opt} replays its authors' code (tests/goldens), so not a bug in the update rule. "
            "Its update is sign-like: every coordinate moves by about the learning rate whatever "
            "its gradient's size, so the noise of small-gradient coordinates at this tiny batch "
            "(16 x 64 tokens) is applied at full size; the Lion paper reports that Lion prefers "
            "larger batches than AdamW. Most likely the method at this scale; reasoned, not "
            "measured at a larger batch here.")


_SGD = ("replays its authors' code (tests/goldens), so not a bug in the update rule. It is SGD "
        "with momentum (no per-coordinate scaling), which trains transformers worse than Adam "
        "at tuned learning rates (Zhang et al. 2020; Kunstner et al. 2023, 2024). Most likely "
        "the method at this scale; reasoned from the literature, not isolated by a run here.")

DIAGNOSES: dict[str, Diagnosis] = {
    "perp_adamw": Diagnosis(
        "The method as specified (projection of every tensor's gradient onto the tangent of its "
        "weight, from grokking work) also freezes the radial direction of LayerNorm gains, "
        "embeddings and biases, whose scale must change in LM training. Restricted to the "
        "hidden matrices (AdamW elsewhere) it trains like AdamW; without weight decay it stays "
        "behind. A property of applying it to every tensor (the recipe's default, as its paper), "
        "not a bug.",
        (Variant("hidden_only", "projection on the hidden matrices only, AdamW (same betas and "
                 "decay) on embeddings, head and vectors", _perp_on_hidden_only),
         Variant("no_decay", "every tensor projected, weight decay 0", _perp_no_decay)),
    ),
    "auon": Diagnosis(
        "The reference's HEAD algorithm is momentum SGD on hidden matrices (its brake is ~1 "
        "unless the momentum is concentrated) and replays the authors' code (tests/goldens). "
        "Its auxiliary Adam follows the main lr (1/30 of it); giving that Adam AdamW's best lr "
        "changes little, so the SGD step on the hidden matrices is what trails; hybrid_auon "
        "(Newton-Schulz first) trains at Muon's level. The method at this scale.",
        (Variant("adam_at_adamw_lr", "auxiliary Adam peaking at AdamW's best lr instead of "
                 "1/30 of AuON's", _auon_adam_at_adamw_lr),),
    ),
    "sgdp": Diagnosis("SGDP " + _SGD),
    "sgd_sai": Diagnosis(
        "SGD-SaI " + _SGD.replace("It is SGD with momentum (no per-coordinate scaling)",
                                  "It is SGD with momentum, scaled once per tensor at the first "
                                  "step (no per-coordinate adaptivity afterwards)")),
    "lion": Diagnosis(_sign_like("Lion")),
    "lion_k": Diagnosis(_sign_like("Lion-K (Huber)")),
    "lion_8bit": Diagnosis(_sign_like("8-bit Lion")),
    "sophia": Diagnosis(
        "Sophia replays its authors' code (tests/goldens), so not a bug in the update rule. It "
        "clips m / (rho h) coordinate-wise to [-1, 1], so coordinates whose curvature estimate "
        "is small move by the full learning rate, a sign-like step (see Lion) that the tiny "
        "batch makes noisy. Most likely the method at this scale; reasoned, not measured "
        "(e.g. the fraction of clipped coordinates) here."),
}


def variant_name(optimizer: str, variant: Variant) -> str:
    """The record name of a diagnosis run: ``"<optimizer>:<variant>"``."""
    return f"{optimizer}:{variant.name}"


def diagnose(cfg: StudyConfig, store: Store, best: dict[str, float]) -> None:
    """Trains every diagnosis variant of the study's optimizers (seed 0), once."""
    adamw_lr = best.get(BASELINE, registry.get(BASELINE).lr)
    for name, diag in DIAGNOSES.items():
        if name not in best:
            continue
        for v in diag.variants:
            lr, build = v.make(best[name], adamw_lr)
            vname = variant_name(name, v)
            base = registry.get(name)
            registry.OPTIMIZERS[vname] = dataclasses.replace(base, name=vname, build=build,
                                                             lr=lr, grid=(lr,))
            try:
                run_one(cfg, store, vname, lr, 0, kind="diagnosis")
            finally:
                del registry.OPTIMIZERS[vname]


def diagnosis_lines(cfg: StudyConfig, store: Store, name: str) -> str:
    """The finding for ``name`` with the measured loss of each of its variants."""
    diag = DIAGNOSES.get(name)
    if diag is None:
        return "Not yet diagnosed."
    parts = [diag.finding]
    setting = cfg.setting()
    for v in diag.variants:
        recs = [r for r in store.records if r.get("kind") == "diagnosis"
                and r["key"].get("optimizer") == variant_name(name, v)
                and {k: r["key"].get(k) for k in setting} == setting]
        got = (f"{final_loss(recs[-1]):.4f} (lr {recs[-1]['key']['learning_rate']:g})"
               if recs else "not run")
        parts.append(f"Measured, seed 0: {v.what}: {got}.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One optimizer's results at its best learning rate."""

    name: str
    lr: float
    seeds: list[dict[str, Any]]
    sweep: dict[float, float]
    notes: list[str]
    update_ratio: float | None = None
    tokens: float | None = None  # mean tokens to the target (seeds that reached it)
    reached: int = 0
    wall: float | None = None
    speedup_tokens: float | None = None
    speedup_wall: float | None = None

    @property
    def losses(self) -> list[float]:
        return [final_loss(r) for r in self.seeds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses) if self.losses else math.inf

    @property
    def std(self) -> float:
        finite = [x for x in self.losses if math.isfinite(x)]
        return statistics.stdev(finite) if len(finite) > 1 else 0.0

    @property
    def state_bytes(self) -> float | None:
        vals = [r.get("state_bytes_per_param") for r in self.seeds if r.get("state_bytes_per_param")]
        return vals[0] if vals else None


def analyse(cfg: StudyConfig, store: Store) -> tuple[dict[str, Row], float | None]:
    """Rows of every optimizer with records under ``cfg``'s setting, and the target loss."""
    setting = cfg.setting()
    runs = [r for r in store.records if r.get("kind") == "run"
            and {k: r["key"].get(k) for k in setting} == setting]
    rows: dict[str, Row] = {}
    for name in cfg.optimizers:
        mine = [r for r in runs if r["key"]["optimizer"] == name]
        sweep0 = {r["key"]["learning_rate"]: final_loss(r) for r in mine if r["key"]["seed"] == 0}
        if not sweep0:
            continue
        lr = min(sweep0, key=sweep0.get)
        seeds = {r["key"]["seed"]: r for r in mine if r["key"]["learning_rate"] == lr}
        note = store.find("sweep", {**setting, "optimizer": name})
        t = store.find("timing", {**setting, "optimizer": name})
        rows[name] = Row(name, lr, [seeds[s] for s in sorted(seeds) if s < cfg.seeds],
                         dict(sorted(sweep0.items())), note["notes"] if note else [],
                         t["ratio"] if t else None)
    base = rows.get(BASELINE)
    target = base.mean if base is not None and math.isfinite(base.mean) else None
    if target is not None:
        b_tok = _mean_crossing(base.seeds, "tokens", target)
        b_wall = _mean_crossing(base.seeds, "wall", target)
        for row in rows.values():
            row.tokens, row.reached = _crossings(row.seeds, "tokens", target)
            row.wall, _ = _crossings(row.seeds, "wall", target)
            if row is base:  # the reference, by definition
                row.speedup_tokens = row.speedup_wall = 1.0
                continue
            if row.tokens and b_tok and row.reached == len(row.seeds):
                row.speedup_tokens = b_tok / row.tokens
            if row.wall and b_wall and row.reached == len(row.seeds):
                row.speedup_wall = b_wall / row.wall
    return rows, target


def _crossings(seeds: list[dict], axis: str, target: float) -> tuple[float | None, int]:
    """Mean first crossing of ``target`` over the seeds that reach it, and how many do."""
    xs = [compare.crossing(r["curve"][axis], r["curve"]["val_loss"], target) for r in seeds
          if r["curve"]["val_loss"]]
    hit = [x for x in xs if x is not None]
    return (statistics.fmean(hit) if hit else None), len(hit)


def _mean_crossing(seeds: list[dict], axis: str, target: float) -> float | None:
    """AdamW's own mean crossing of its mean final loss (its seeds straddle it)."""
    xs = []
    for r in seeds:
        c = r["curve"]
        x = compare.crossing(c[axis], c["val_loss"], target)
        xs.append(x if x is not None else (c[axis][-1] if c[axis] else None))
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
    """A published claim and how this study's numbers bear on it."""

    title: str
    claim: str
    judge: Callable[[dict[str, Row], float | None], tuple[str, str]]


def _speedup_claim(name: str, low: float) -> Callable[[dict[str, Row], float | None],
                                                       tuple[str, str]]:
    def judge(rows, target):
        r = rows.get(name)
        if r is None or target is None:
            return "not testable here", f"no {name} or AdamW runs in this study"
        if r.speedup_tokens is None:
            return ("not confirmed", f"{name} ({r.mean:.4f} +- {r.std:.4f}) did not reach AdamW's "
                    f"final loss {target:.4f} in every seed ({r.reached}/{len(r.seeds)})")
        verdict = "confirmed" if r.speedup_tokens >= low else "not confirmed"
        wall = f"{r.speedup_wall:.2f}x" if r.speedup_wall else "-"
        return verdict, (f"{r.speedup_tokens:.2f}x fewer tokens than AdamW to AdamW's final loss "
                         f"{target:.4f} (wall clock {wall}); final loss {r.mean:.4f} +- "
                         f"{r.std:.4f} vs AdamW {rows[BASELINE].mean:.4f} +- "
                         f"{rows[BASELINE].std:.4f}")
    return judge


def _quality_claim(name: str) -> Callable[[dict[str, Row], float | None], tuple[str, str]]:
    """'As good as AdamW': the mean final loss within two standard errors of the difference."""

    def judge(rows, target):
        r, b = rows.get(name), rows.get(BASELINE)
        if r is None or b is None:
            return "not testable here", f"no {name} or AdamW runs in this study"
        n = max(min(len(r.seeds), len(b.seeds)), 1)
        margin = 2 * math.sqrt((r.std**2 + b.std**2) / n) + 1e-3
        diff = r.mean - b.mean
        verdict = "confirmed" if diff <= margin else "not confirmed"
        mem = (f"; state {r.state_bytes:.2f} B/param vs AdamW {b.state_bytes:.2f}"
               if r.state_bytes and b.state_bytes else "")
        return verdict, (f"final loss {r.mean:.4f} +- {r.std:.4f} vs AdamW {b.mean:.4f} +- "
                         f"{b.std:.4f} (difference {diff:+.4f}, tolerance {margin:.4f}){mem}")
    return judge


def _spike_claim(rows, target):
    path = pathlib.Path("results/spikes/spikes.json")
    if not path.exists():
        return "not testable here", "this study injects no gradient spikes"
    spikes = {r["optimizer"]: r for r in json.loads(path.read_text())}
    if not {"adamw", "spam", "stable_spam"} <= set(spikes):
        return "not testable here", "results/spikes lacks adamw, spam or stable_spam"
    gap = {k: spikes[k]["gap"] for k in ("adamw", "spam", "stable_spam")}
    verdict = "confirmed" if max(gap["spam"], gap["stable_spam"]) < gap["adamw"] else "not confirmed"
    return verdict, ("from `python -m experiments.spikes` (one 1000x spike at step 100, no clipping): "
                     f"loss gap after the spike AdamW {gap['adamw']:+.3f}, SPAM {gap['spam']:+.3f}, "
                     f"Stable-SPAM {gap['stable_spam']:+.3f}; without spikes (this study, clipping "
                     "1.0) see their rows")


def _scale_claim(rows, target):
    mats = [r for n, r in rows.items() if n in ("muon", "normuon", "soap", "conda")
            and r.speedup_tokens]
    if not mats:
        return "not testable here", "no matrix optimizer reached AdamW's loss in every seed"
    top = max(mats, key=lambda r: r.speedup_tokens)
    params = top.seeds[0].get("params", 0)
    return "context", (f"best matrix-optimizer speedup here: {top.name} {top.speedup_tokens:.2f}x "
                       f"at {params:,} parameters and {top.seeds[0].get('tokens', 0):,} tokens; the "
                       "Fantastic-Optimizers study (arXiv 2509.02046) measured ~1.4x at 130M "
                       "parameters falling to ~1.1x at 1.2B under equal tuning, and element-wise "
                       "methods near 1.0x: a speedup at this scale says little about LLM scale")


CLAIMS = (
    Claim("Conda", "reaches AdamW's loss 2-2.5x faster (steps and wall time)",
          _speedup_claim("conda", 2.0)),
    Claim("Muon", "~1.35x speedrun improvement; ~2x compute efficiency (Moonlight)",
          _speedup_claim("muon", 1.35)),
    Claim("SOAP", ">40% fewer iterations than AdamW (>= 1.67x in tokens)",
          _speedup_claim("soap", 1 / 0.6)),
    Claim("Sophia", "reaches Adam's loss in about half the steps (2x)",
          _speedup_claim("sophia", 2.0)),
    Claim("APOLLO-Mini", "AdamW-level quality with SGD-like optimizer memory",
          _quality_claim("apollo_mini")),
    Claim("8-bit states", "8-bit AdamW matches 32-bit AdamW with no hyperparameter change",
          _quality_claim("adamw_8bit")),
    Claim("SPAM and Stable-SPAM", "recover from gradient spikes that derail Adam",
          _spike_claim),
    Claim("Speedups shrink with scale", "Fantastic Pretraining Optimizers (Wen et al. 2025)",
          _scale_claim),
)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) + suffix


def report(cfg: StudyConfig) -> str:
    """Writes ``cfg.report_to`` and the plots from the JSONL; returns the markdown."""
    store = Store(pathlib.Path(cfg.results))
    rows, target = analyse(cfg, store)
    if not rows:
        raise FileNotFoundError(f"{store.path}: no runs of this setting to report")
    first = next(iter(rows.values())).seeds[0]
    folder = pathlib.Path(cfg.results)
    out = pathlib.Path(cfg.report_to)
    plots = _plots(rows, folder)
    ordered = sorted(rows.values(), key=lambda r: r.mean)
    lines = [
        "# Results: every optimizer, tuned, at the scale a CPU trains",
        "",
        "Generated by `python -m experiments.study --report` from "
        f"`{folder.as_posix()}/results.jsonl`; do not edit by hand.",
        "",
        f"**Setting.** {cfg.model} ({first.get('params', 0):,} parameters), {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens ({first.get('tokens', 0):,} tokens per run), "
        f"{cfg.schedule} schedule with {cfg.warmup} warm-up steps, gradient clipping "
        f"{cfg.grad_clip}, data: {first.get('data')}. Each optimizer swept over "
        f">= {cfg.points} peak learning rates at seed 0, the best rerun with {cfg.seeds} seeds.",
        "",
        f"**Scale.** {first.get('params', 0):,} parameters trained on {first.get('tokens', 0):,} "
        "tokens: this shows that every recipe trains and how the recipes rank *here*; speedups "
        "measured at small scale are known to shrink with model size (see the last claim).",
        "",
        f"Target = AdamW's mean final validation loss ({_fmt(target, '.4f')}). Tokens and wall "
        "time to the target are means over seeds (linear interpolation between evaluations); "
        "a speedup is given only when every seed reached the target. Wall time excludes "
        "compilation and is measured on this machine across sittings; update time is a ratio "
        "to AdamW measured in one process.",
        "",
        "| optimizer | best lr | final val (mean +- std, n) | tokens to target | speedup "
        "(tokens) | speedup (wall) | state B/param | update time / AdamW | sweep notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ordered:
        lines.append(
            f"| {r.name} | {r.lr:g} | {_fmt(r.mean, '.4f')} +- {r.std:.4f} ({len(r.seeds)}) | "
            f"{_fmt(r.tokens, ',.0f')} ({r.reached}/{len(r.seeds)}) | "
            f"{_fmt(r.speedup_tokens, '.2f', 'x')} | {_fmt(r.speedup_wall, '.2f', 'x')} | "
            f"{_fmt(r.state_bytes, '.2f')} | {_fmt(r.update_ratio, '.2f', 'x')} | "
            f"{'; '.join(r.notes) or '-'} |"
        )
    lines += ["", "Learning-rate sweeps (seed 0, final validation loss):", ""]
    for r in ordered:
        pts = ", ".join(f"{lr:g}: {_fmt(v, '.4f')}" for lr, v in r.sweep.items())
        lines.append(f"- {r.name}: {pts}")
    lines += ["", "Plots (small multiples, one panel per optimizer):", ""]
    lines += [f"![{p.stem}]({_relative(p, out.parent)})" for p in plots]
    lines.append("")
    worse = [r for r in ordered if target is not None and rows.get(BASELINE) is not None
             and r.mean - 2 * (r.std + rows[BASELINE].std) > target]
    lines += ["## Clearly worse than AdamW at their best learning rate", ""]
    if worse:
        for r in worse:
            lines.append(f"- {r.name}: {r.mean:.4f} +- {r.std:.4f} vs {target:.4f}. "
                         + diagnosis_lines(cfg, store, r.name))
    else:
        lines.append("- none")
    lines += ["", "## Claims", ""]
    for c in CLAIMS:
        verdict, numbers = c.judge(rows, target)
        lines += [f"### {c.title}: {verdict}", "", f"Claim: {c.claim}. Here: {numbers}.", ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def _relative(path: pathlib.Path, start: pathlib.Path) -> str:
    """``path`` relative to the report's folder (for markdown image links)."""
    import os  # noqa: PLC0415

    return pathlib.Path(os.path.relpath(path.absolute(), start.absolute())).as_posix()


def _plots(rows: dict[str, Row], folder: pathlib.Path) -> list[pathlib.Path]:
    """Small multiples: loss vs tokens and vs wall (seed bands), and lr sensitivity."""
    import matplotlib  # noqa: PLC0415 - optional (experiments extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    names = sorted(rows)
    cols = 6
    nrows = math.ceil(len(names) / cols)
    base = rows.get(BASELINE)
    paths = []

    def band(ax, row, axis, color, label):
        curves = [r["curve"] for r in row.seeds if r["curve"]["val_loss"]]
        if not curves:
            return
        n = min(len(c["val_loss"]) for c in curves)
        x = np.mean([c[axis][:n] for c in curves], axis=0)
        y = np.array([c["val_loss"][:n] for c in curves])
        ax.plot(x, y.mean(0), color=color, lw=1.2, label=label)
        ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.25, lw=0)

    for axis, fname in (("tokens", "loss_vs_tokens.png"), ("wall", "loss_vs_wall.png")):
        fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.0 * nrows), squeeze=False,
                                 sharey=True)
        for ax, name in zip(axes.flat, names):
            if base is not None and name != BASELINE:
                band(ax, base, axis, "0.6", BASELINE)
            band(ax, rows[name], axis, "C0", name)
            ax.set_title(f"{name} (lr {rows[name].lr:g})", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.supxlabel("tokens" if axis == "tokens" else "wall time (s, this machine)", fontsize=8)
        fig.supylabel("validation loss (band: min-max over seeds; grey: AdamW)", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=90)
        plt.close(fig)
        paths.append(folder / fname)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.0 * nrows), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes.flat, names):
        r = rows[name]
        lrs = list(r.sweep)
        ax.plot(lrs, [min(v, 1e2) for v in r.sweep.values()], marker="o", ms=3)
        if len(r.losses) > 1:
            ax.errorbar([r.lr], [r.mean], yerr=[r.std], fmt="s", color="C3", ms=3)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supxlabel("peak learning rate (red: best, mean +- std over seeds)", fontsize=8)
    fig.supylabel("final validation loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "lr_sensitivity.png", dpi=90)
    plt.close(fig)
    paths.append(folder / "lr_sensitivity.png")
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, bool]:
    """A :class:`StudyConfig` from flags, and whether only to report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = StudyConfig()
    parser.add_argument("--optimizers", default=",".join(d.optimizers))
    for f in ("model", "schedule", "data", "results", "report_to"):
        parser.add_argument("--" + f.replace("_", "-"), default=getattr(d, f))
    for f in ("steps", "batch_size", "seq_len", "warmup", "eval_every", "eval_batches", "points",
              "extend", "seeds", "max_files", "update_reps"):
        parser.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip)
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    args = vars(parser.parse_args(argv))
    only_report = args.pop("report")
    args["optimizers"] = tuple(o.strip() for o in args["optimizers"].split(",") if o.strip())
    return StudyConfig(**args), only_report


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input gives a one-line error and exit status 2."""
    try:
        cfg, only_report = parse_args(argv)
        if not only_report:
            run(cfg)
        report(cfg)
    except (registry.UnknownOptimizer, data_lib.DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {cfg.report_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
