"""Train a small GPT-2/LLaMA-style model with any optimizer of the registry.

    python -m experiments.train --optimizer conda --learning-rate 1e-2 --model gpt2-tiny \\
        --steps 300 --out runs/conda

One readable script, nanoGPT-shaped: a frozen config with command-line overrides, a jitted train
step (the optimizer update inside it, with the extra arguments Hessian-based recipes need),
warm-up + cosine / REX / constant schedules, optional gradient clipping, periodic validation on a
fixed set of batches, a progress bar with tokens/s and loss, JSONL logs, orbax checkpoints with
exact resume (the batch stream depends only on ``(seed, step)``), and a final summary. With
``--mesh data=N,model=M`` parameters, optimizer state and batches are sharded over a device mesh
(automatic SPMD axes: batches over ``data``; matrices over ``model`` on their last axis and
``data`` on the one before, where the sizes divide). ``--coordinator host:port --num-processes N
--process-id i`` runs it as one of N processes of JAX's multi-controller runtime, the mesh
spanning the devices of all of them (docs/MULTIHOST.md).

What a run guarantees (README, "What survives a crash"): a non-empty ``--out`` is refused
without ``--resume``; ``--resume`` checks the saved settings (``config.json``) and refuses any
difference in one line; a run whose loss or state turns non-finite stops with exit status 1 and
saves nothing after that point; checkpoints carry sha256 manifests (experiments/checkpoints.py)
and a corrupted one is skipped for the previous intact one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import optax_ext
from experiments import checkpoints, registry
from experiments import data as data_lib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (each field is a ``--flag`` on the command line)."""

    optimizer: str = "adamw"
    learning_rate: float | None = None  # None: the registry's default for the optimizer
    model: str = "gpt2-tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    schedule: str = "cosine"  # cosine | rex | constant
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end (and at stop_after); <0: never
    seed: int = 0
    data: str | None = None  # None: the standard library's source code
    max_files: int | None = None
    out: str = "runs/default"
    resume: bool = False
    mesh: str | None = None  # e.g. "data=4,model=2"
    stop_after: int = 0  # >0: stop (with a checkpoint) after this many steps, resumable later
    spike_step: int = -1  # inject a gradient spike at this step (experiments/spikes.py)
    spike_scale: float = 1000.0
    progress: bool = True
    coordinator: str | None = None  # host:port of process 0 (several processes); "auto": detect
    num_processes: int = 1
    process_id: int = 0


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line flags (``--learning-rate 3e-3`` etc.)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
        parser.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


OPERATIONAL = (
    "out", "resume", "steps", "stop_after", "progress", "log_every", "eval_every", "ckpt_every",
    "mesh", "coordinator", "num_processes", "process_id",
)
"""Fields that do not change a run's result (``steps`` does, but may grow on resume)."""


class Diverged(RuntimeError):
    """The loss or the state became non-finite (the message gives the step and what was kept)."""


def check_config(cfg: TrainConfig) -> None:
    """Raises ValueError naming the flag, its value and the rule it breaks."""
    positive = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup", "stop_after"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_files is not None and cfg.max_files <= 0:
        raise ValueError(f"--max-files must be > 0, got {cfg.max_files}")
    lr = cfg.learning_rate
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--learning-rate must be a finite number > 0, got {lr}")
    for name in ("min_lr_ratio", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


def init_distributed(cfg: TrainConfig) -> None:
    """Starts JAX's multi-controller runtime when ``cfg`` names a coordinator (docs/MULTIHOST.md).

    Every process runs the same command with its own ``--process-id``; ``--coordinator auto``
    lets JAX detect the cluster (TPU pods, SLURM, Open MPI). On CPU, cross-process collectives
    go through gloo (the default of jax >= 0.4.36; set here where the installed jax defaults to
    none). Must run before anything else touches JAX's backends.
    """
    if cfg.coordinator is None or jax.distributed.is_initialized():
        return
    if jax.config.values.get("jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator == "auto":
        jax.distributed.initialize()
        return
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(
            f"--process-id must be in [0, --num-processes={cfg.num_processes}), got "
            f"{cfg.process_id}"
        )
    jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting that changes a run's result, the learning rate resolved to its value.

    ``--resume`` refuses a checkpoint whose settings differ (``steps`` aside), and
    experiments/compare.py keys its records by them.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in OPERATIONAL}
    if cfg.learning_rate is None:
        settings["learning_rate"] = registry.get(cfg.optimizer).lr
    settings["steps"] = cfg.steps
    return settings


def lr_schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    """The run's learning-rate schedule with peak ``peak``."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(cfg.steps, warmup + 1), end_value=peak * cfg.min_lr_ratio
        )
    if cfg.schedule == "rex":
        return optax_ext.rex_schedule(
            peak,
            max(cfg.steps - warmup, 1),
            end_value=peak * cfg.min_lr_ratio,
            warmup_steps=warmup,
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
            [max(warmup, 1)],
        )
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, rex or constant")


def parse_mesh(spec: str) -> jax.sharding.Mesh:
    """``"data=4,model=2"`` -> a mesh with automatic (GSPMD) axes of those sizes."""
    names, sizes = [], []
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if not size.isdigit():
            raise ValueError(f"bad --mesh {spec!r}: expected name=size[,name=size]")
        names.append(name.strip())
        sizes.append(int(size))
    if math.prod(sizes) > jax.device_count():
        raise ValueError(
            f"--mesh {spec} needs {math.prod(sizes)} devices, {jax.device_count()} here"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto)


def param_sharding(mesh: jax.sharding.Mesh, x: Any) -> jax.sharding.NamedSharding:
    """Matrices: last axis over ``model``, the one before over ``data`` (FSDP) where divisible."""
    P = jax.sharding.PartitionSpec
    spec = [None] * jnp.ndim(x)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    if jnp.ndim(x) >= 2:
        if "model" in sizes and x.shape[-1] % sizes["model"] == 0:
            spec[-1] = "model"
        if "data" in sizes and x.shape[-2] % sizes["data"] == 0:
            spec[-2] = "data"
    return jax.sharding.NamedSharding(mesh, P(*spec))


def _keys_to_data(tree: Any) -> Any:
    is_key = lambda x: jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _data_to_keys(tree: Any, like: Any) -> Any:
    def back(x, ref):
        if jnp.issubdtype(ref.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        return x

    return jax.tree.map(back, tree, like)


def build_optimizer(
    cfg: TrainConfig,
) -> tuple[optax.GradientTransformation, registry.Optimizer, float]:
    """The run's transformation (gradient clipping, then the recipe), its entry, its peak lr."""
    entry = registry.get(cfg.optimizer)
    peak = entry.lr if cfg.learning_rate is None else cfg.learning_rate
    tx = entry.build(lr_schedule(cfg, peak), cfg.steps)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx, entry, peak


def update_extras(graphdef, needs: str | None, other, x, y, key) -> dict[str, Any]:
    """The extra ``update`` arguments a recipe needs (``registry.Optimizer.needs``).

    ``"gnb"``: Sophia-G's Gauss-Newton-Bartlett estimator (labels sampled from the model on
    this batch); ``"hutchinson"``: AdaHessian's Hutchinson estimator of the loss on this batch.
    """
    if needs == "gnb":

        def logits(p):
            return models.apply(graphdef, p, other, x, train=False)[0]

        return {"hessian_fn": lambda p: optax_ext.kernels.gauss_newton_bartlett(logits, p, key)}
    if needs == "hutchinson":

        def loss(p):
            return models.loss_fn(graphdef, p, other, x, y)[0]

        return {"hessian_fn": lambda p: optax_ext.kernels.hutchinson(loss, p, key)}
    return {}


def make_train_step(
    graphdef, tx, needs: str | None, cfg: TrainConfig, spike_dir: Any, shardings: Any = None
):
    """The jitted train step ``(params, other, opt_state, x, y, step, bad) -> (..., loss, bad)``.

    ``bad`` (int32 scalar, -1 while all is finite) becomes ``step + 1`` at the first step whose
    loss, new parameters or new optimizer state hold a non-finite value, and stays there: the
    loop reads it only when it logs or saves, so checking costs no host sync per step.
    ``spike_dir``: the unit direction of the ``--spike-step`` spike (None without one).
    ``shardings``: ``(params, other, opt_state)`` shardings to keep the outputs on (on a mesh),
    so every step sees the layout the step was compiled for.
    """

    def loss(params, other, x, y):
        return models.loss_fn(graphdef, params, other, x, y)

    def step(params, other, opt_state, x, y, step_idx, bad):
        (value, (other, _)), grads = jax.value_and_grad(loss, has_aux=True)(params, other, x, y)
        if cfg.spike_step >= 0:  # a random-direction spike of spike_scale x ||g||
            norm = optax.tree.norm(grads)
            spiked = jax.tree.map(lambda g, d: g + cfg.spike_scale * norm * d, grads, spike_dir)
            grads = jax.tree.map(
                lambda s, g: jnp.where(step_idx == cfg.spike_step, s, g), spiked, grads
            )
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step_idx)
        extra = update_extras(graphdef, needs, other, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(value) & _all_finite((params, opt_state))
        bad = jnp.where((bad < 0) & ~ok, step_idx + 1, bad)
        return params, other, opt_state, value, bad

    out = None if shardings is None else (*shardings[:2], shardings[2], None, None)
    return jax.jit(step, donate_argnums=(0, 2), out_shardings=out)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def make_eval(graphdef):
    """Mean validation loss over fixed batches (evaluation mode)."""

    @jax.jit
    def batch_loss(params, other, x, y):
        return models.loss_fn(graphdef, params, other, x, y, train=False)[0]

    def evaluate(params, other, batches):
        return float(np.mean([float(batch_loss(params, other, x, y)) for x, y in batches]))

    return evaluate


class Log:
    """JSONL log at ``<out>/log.jsonl``; on resume, records after the restored step are dropped.

    A torn last line (a write cut short by a crash) is dropped with a message; an unreadable
    line elsewhere is an error naming the file and the line.
    """

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        records = []
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i + 1 < len(lines):
                        raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
                    print(f"note: {path}: dropped a torn last line ({i + 1})", file=sys.stderr)
            records = [r for r in records if r["step"] <= resume_step]
        checkpoints.barrier("log-read")  # every process has read the log before it is rewritten
        if jax.process_index() == 0:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.records = records

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _read_config(out: pathlib.Path) -> dict[str, Any] | None:
    """The saved ``config.json`` of the run in ``out`` (None for an empty or missing folder)."""
    path = out / "config.json"
    if not path.exists():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--resume: {out} holds files but no config.json of a train.py run")
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(saved, dict) or not {"settings", "data"} <= saved.keys():
        raise ValueError(f"{path}: no recorded settings (from an older train.py); use a new --out")
    return saved


def _differences(saved: dict[str, Any], now: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    keys = sorted(k for k in saved.keys() | now.keys() if k not in skip)
    return ", ".join(
        f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)
    )


def _write_config(out: pathlib.Path, cfg: TrainConfig, settings: dict, data: dict) -> None:
    if jax.process_index() == 0:
        record = {"settings": settings, "data": data, "config": dataclasses.asdict(cfg)}
        (out / "config.json").write_text(json.dumps(record, indent=1))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs ``cfg`` and returns its summary (also written to ``<out>/summary.json``).

    Raises:
      ValueError: a bad setting, a non-empty ``--out`` without ``--resume``, or a ``--resume``
        whose saved settings, data or checkpoint do not fit (one line naming what differs).
      data.DataError: an unusable data source.
      checkpoints.CheckpointError: ``--resume`` found checkpoints but none intact.
      Diverged: the loss or state became non-finite (nothing is saved after that step).
    """
    check_config(cfg)
    init_distributed(cfg)
    out = pathlib.Path(cfg.out)
    settings = run_settings(cfg)
    saved = _read_config(out) if cfg.resume else None
    if not cfg.resume and out.is_dir() and any(out.iterdir()):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ValueError(
            f"--out {out} is not empty ({names}); pass --resume to continue that run or choose "
            "an empty folder"
        )
    if saved is not None:
        differ = _differences(saved["settings"], settings, skip=("steps",))
        if differ:
            raise ValueError(f"--resume: {out} holds a run with other settings: {differ}")
    checkpoints.barrier("train-checked")  # every process has read --out before any writes

    tx, entry, peak = build_optimizer(cfg)
    splits = data_lib.load_tokens(cfg.data, max_files=cfg.max_files)
    data_record = {
        "source": splits.source,
        "train_tokens": int(splits.train.size),
        "val_tokens": int(splits.val.size),
        "vocab_size": int(splits.vocab_size),
    }
    if saved is not None and saved["data"] != data_record:
        differ = _differences(saved["data"], data_record)
        raise ValueError(f"--resume: the data differ from the saved run's: {differ}")
    run_id = checkpoints.digest(
        {"settings": {k: v for k, v in settings.items() if k != "steps"}, "data": data_record}
    )
    model_cfg = models.ModelConfig.preset(cfg.model)
    seq_len = min(cfg.seq_len, model_cfg.block_size)
    if splits.vocab_size > model_cfg.vocab_size:
        model_cfg = models.ModelConfig.preset(cfg.model, vocab_size=splits.vocab_size)
    graphdef, params, other = models.split_model(models.make_model(model_cfg, seed=cfg.seed))
    out.mkdir(parents=True, exist_ok=True)
    if saved is None:
        _write_config(out, cfg, settings, data_record)

    mesh = parse_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        params = jax.tree.map(lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        other = jax.tree.map(lambda x: jax.device_put(x, replicated), other)
    opt_state = jax.jit(tx.init)(params)
    if mesh is not None:  # replicate leaves init left on one device (counts), before a restore
        on_mesh = lambda x: getattr(x.sharding, "mesh", None) == mesh  # noqa: E731
        opt_state = jax.tree.map(
            lambda x: x if on_mesh(x) else jax.device_put(x, replicated), opt_state
        )

    spike_dir = None  # the unit random direction of an injected spike (--spike-step)
    if cfg.spike_step >= 0:
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 7), len(leaves))
        noise = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])
        norm = optax.tree.norm(noise)
        spike_dir = jax.tree.map(lambda d: d / norm, noise)

    ckpt_dir = (out / "ckpt").absolute()
    start, resume_step = 0, None
    if cfg.resume:
        target = {"params": params, "other": _keys_to_data(other), "opt_state": opt_state}
        restored = checkpoints.restore_latest(ckpt_dir, target, run_id)
        if restored is not None:
            resume_step, tree = restored
            if cfg.steps < resume_step:
                raise ValueError(
                    f"--steps {cfg.steps} is below the step {resume_step} of the checkpoint "
                    f"{ckpt_dir / str(resume_step)}"
                )
            params, opt_state = tree["params"], tree["opt_state"]
            other = _data_to_keys(tree["other"], other)
            start = resume_step
        if saved is not None and saved["settings"]["steps"] != cfg.steps:
            print(
                f"note: --steps {cfg.steps} (the saved run had {saved['settings']['steps']}): "
                f"the learning-rate schedule now ends at step {cfg.steps}",
                file=sys.stderr,
            )
            _write_config(out, cfg, settings, data_record)
    log = Log(out / "log.jsonl", resume_step if resume_step is not None else -1)

    shardings = None
    bad = jnp.full((), -1, jnp.int32)
    if mesh is not None:
        bad = jax.device_put(bad, replicated)
        shardings = jax.tree.map(lambda x: x.sharding, (params, other, opt_state))
    train_step = make_train_step(graphdef, tx, entry.needs, cfg, spike_dir, shardings)
    evaluate = make_eval(graphdef)
    val_batches = data_lib.eval_batches(
        splits.val, batch_size=cfg.batch_size, seq_len=seq_len, count=cfg.eval_batches
    )
    if mesh is not None:
        val_batches = [jax.device_put(b, batch_sharding) for b in val_batches]
    stream = data_lib.batches(
        splits.train, batch_size=cfg.batch_size, seq_len=seq_len, seed=cfg.seed, start_step=start
    )
    schedule = lr_schedule(cfg, peak)
    tokens_per_step = cfg.batch_size * seq_len
    elapsed = log.records[-1]["wall"] if log.records else 0.0
    progress = None
    if cfg.progress and sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        progress = tqdm(total=cfg.steps, initial=start, desc=cfg.optimizer, leave=False)
    x0, y0 = data_lib.sample_batch(splits.train, np.random.default_rng(0), cfg.batch_size, seq_len)
    if mesh is not None:
        x0, y0 = jax.device_put(x0, batch_sharding), jax.device_put(y0, batch_sharding)
    t_compile = time.perf_counter()  # compile outside the clock: wall times are training times
    train_step = train_step.lower(params, other, opt_state, x0, y0, start, bad).compile()
    compile_s = time.perf_counter() - t_compile

    def summarize(diverged_at: int | None = None) -> dict[str, Any]:
        records = log.records
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        n_params = sum(x.size for x in jax.tree.leaves(params))
        summary = {
            "optimizer": cfg.optimizer,
            "learning_rate": peak,
            "model": cfg.model,
            "params": n_params,
            "steps": cfg.steps,
            "tokens": cfg.steps * tokens_per_step,
            "final_train_loss": records[-1]["train_loss"] if records else None,
            "final_val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals) if vals else None,
            "wall": records[-1]["wall"] if records else 0.0,
            "state_bytes_per_param": optax_ext.state_nbytes(opt_state) / n_params,
            "compile_s": compile_s,
            "data": splits.source,
        }
        if diverged_at is not None:
            summary.update(final_train_loss=math.nan, final_val_loss=None, best_val_loss=None)
            summary["diverged_at_step"] = diverged_at
        if jax.process_index() == 0:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def check_finite() -> None:  # one host sync; only where the loop logs or saves
        first = int(bad)
        if first < 0:
            return
        summarize(diverged_at=first)
        kept = checkpoints.steps(ckpt_dir)
        keep = f"kept {ckpt_dir / str(kept[0])}" if kept else "no checkpoint was saved"
        raise Diverged(
            f"the run diverged: the loss or state is non-finite from step {first}; nothing was "
            f"saved after it ({keep}, the last finite one)"
        )

    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        x, y = next(stream)
        if mesh is not None:
            x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
        params, other, opt_state, loss, bad = train_step(params, other, opt_state, x, y, step, bad)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last or (step + 1) % cfg.eval_every == 0:
            loss_value = float(loss)
            wall = elapsed + time.perf_counter() - t0
            record = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "train_loss": loss_value,
                "lr": float(schedule(step)),
                "wall": wall,
            }
            if (step + 1) % cfg.eval_every == 0 or last:
                record["val_loss"] = evaluate(params, other, val_batches)
            log.write(record)
            check_finite()
            if progress is not None:
                progress.set_postfix(
                    loss=f"{loss_value:.3f}", tok_s=f"{record['tokens'] / wall:.0f}"
                )
        if progress is not None:
            progress.update(1)
        stop = cfg.stop_after > 0 and step + 1 == cfg.stop_after
        periodic = cfg.ckpt_every > 0 and (step + 1) % cfg.ckpt_every == 0
        if cfg.ckpt_every >= 0 and (last or stop or periodic):
            check_finite()
            tree = {"params": params, "other": _keys_to_data(other), "opt_state": opt_state}
            checkpoints.save(ckpt_dir, step + 1, tree, run_id)
        if stop:
            break
    if progress is not None:
        progress.close()
    check_finite()
    return summarize()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: bad input gives a one-line error and exit status 2, a run that
    diverges a one-line error and exit status 1."""
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except (registry.UnknownOptimizer, data_lib.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
