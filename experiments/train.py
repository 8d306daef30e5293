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
``data`` on the one before, where the sizes divide).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import optax_ext
from experiments import data as data_lib
from experiments import registry


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
    """The jitted train step ``(params, other, opt_state, x, y, step) -> (..., loss)``.

    ``shardings``: ``(params, other, opt_state)`` shardings to keep the outputs on (on a mesh),
    so every step sees the layout the step was compiled for.
    """

    def loss(params, other, x, y):
        return models.loss_fn(graphdef, params, other, x, y)

    def step(params, other, opt_state, x, y, step_idx):
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
        return optax.apply_updates(params, updates), other, opt_state, value

    out = None if shardings is None else (*shardings[:2], shardings[2], None)
    return jax.jit(step, donate_argnums=(0, 2), out_shardings=out)


def make_eval(graphdef):
    """Mean validation loss over fixed batches (evaluation mode)."""

    @jax.jit
    def batch_loss(params, other, x, y):
        return models.loss_fn(graphdef, params, other, x, y, train=False)[0]

    def evaluate(params, other, batches):
        return float(np.mean([float(batch_loss(params, other, x, y)) for x, y in batches]))

    return evaluate


class Log:
    """JSONL log at ``<out>/log.jsonl``; on resume, records after the restored step are dropped."""

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        records = []
        if resume_step is not None and path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
            records = [r for r in records if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.records = records

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs ``cfg`` and returns its summary (also written to ``<out>/summary.json``)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only for runs

    tx, entry, peak = build_optimizer(cfg)
    splits = data_lib.load_tokens(cfg.data, max_files=cfg.max_files)
    model_cfg = models.ModelConfig.preset(cfg.model)
    seq_len = min(cfg.seq_len, model_cfg.block_size)
    if splits.vocab_size > model_cfg.vocab_size:
        model_cfg = models.ModelConfig.preset(cfg.model, vocab_size=splits.vocab_size)
    graphdef, params, other = models.split_model(models.make_model(model_cfg, seed=cfg.seed))
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    mesh = parse_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        params = jax.tree.map(lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        other = jax.tree.map(lambda x: jax.device_put(x, replicated), other)
    opt_state = jax.jit(tx.init)(params)

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 7), len(leaves))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    spike_dir = treedef.unflatten(noise)
    spike_dir = jax.tree.map(lambda d: d / optax.tree.norm(spike_dir), spike_dir)

    ckpt_dir = (out / "ckpt").absolute()
    start, resume_step = 0, None
    if cfg.resume and ckpt_dir.exists():
        done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        if done:
            resume_step = done[-1]
            target = {"params": params, "other": _keys_to_data(other), "opt_state": opt_state}
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            restored = ocp.StandardCheckpointer().restore(ckpt_dir / str(resume_step), abstract)
            params, opt_state = restored["params"], restored["opt_state"]
            other = _data_to_keys(restored["other"], other)
            start = resume_step
    log = Log(out / "log.jsonl", resume_step if resume_step is not None else -1)

    shardings = None
    if mesh is not None:  # leaves that init left on one device (counts, keys): replicate
        on_mesh = lambda x: getattr(x.sharding, "mesh", None) == mesh  # noqa: E731
        opt_state = jax.tree.map(
            lambda x: x if on_mesh(x) else jax.device_put(x, replicated), opt_state
        )
        shardings = jax.tree.map(lambda x: x.sharding, (params, other, opt_state))
    train_step = make_train_step(graphdef, tx, entry.needs, cfg, spike_dir, shardings)
    evaluate = make_eval(graphdef)
    val_batches = data_lib.eval_batches(
        splits.val, batch_size=cfg.batch_size, seq_len=seq_len, count=cfg.eval_batches
    )
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
    train_step = train_step.lower(params, other, opt_state, x0, y0, start).compile()
    compile_s = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    loss_value = float("nan")
    val = None
    for step in range(start, cfg.steps):
        x, y = next(stream)
        if mesh is not None:
            x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
        params, other, opt_state, loss = train_step(params, other, opt_state, x, y, step)
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
                val = evaluate(params, other, val_batches)
                record["val_loss"] = val
            log.write(record)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{loss_value:.3f}", tok_s=f"{record['tokens'] / wall:.0f}"
                )
        if progress is not None:
            progress.update(1)
        stop = cfg.stop_after > 0 and step + 1 == cfg.stop_after
        periodic = cfg.ckpt_every > 0 and (step + 1) % cfg.ckpt_every == 0
        if cfg.ckpt_every >= 0 and (last or stop or periodic):
            _save(ocp, ckpt_dir, step + 1, params, other, opt_state)
        if stop:
            break
    if progress is not None:
        progress.close()
    records = log.records
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    state_bytes = optax_ext.state_nbytes(opt_state)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    summary = {
        "optimizer": cfg.optimizer,
        "learning_rate": peak,
        "model": cfg.model,
        "params": n_params,
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "final_train_loss": records[-1]["train_loss"] if records else loss_value,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "wall": records[-1]["wall"] if records else 0.0,
        "state_bytes_per_param": state_bytes / n_params,
        "compile_s": compile_s,
        "data": splits.source,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _save(ocp, ckpt_dir: pathlib.Path, step: int, params, other, opt_state) -> None:
    ckpt = ocp.StandardCheckpointer()
    path = ckpt_dir / str(step)
    if path.exists():
        shutil.rmtree(path)
    ckpt.save(path, {"params": params, "other": _keys_to_data(other), "opt_state": opt_state})
    ckpt.wait_until_finished()
    for old in ckpt_dir.iterdir():  # keep the latest checkpoint only
        if old.name.isdigit() and int(old.name) < step:
            shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input gives a one-line error and exit status 2."""
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except (registry.UnknownOptimizer, data_lib.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
