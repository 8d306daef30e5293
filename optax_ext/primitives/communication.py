"""Data-parallel moments with compressed communication: 1-bit Adam's frozen-variance core."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from optax_ext._types import canonicalize_dtype
from optax_ext.kernels.communication import compressed_allreduce, padded_size

PER_DEVICE_FIELDS = ("worker_error", "server_error")
"""State fields that hold per-device buffers (sharded over the data axis, never replicated)."""


class ScaleByOnebitAdamState(NamedTuple):
    """State of :func:`scale_by_onebit_adam`.

    Attributes:
      count: int32 step counter (the reference's ``step``; the initialization call counts).
      mu: first moment ``m`` (param-shaped), identical on every worker.
      nu: second moment ``v`` (param-shaped), identical on every worker, frozen after warm-up.
      worker_error: per leaf, this worker's compression error, float32 ``(n',)`` with ``n'`` the
        leaf size padded to a multiple of ``W * lcm(W, 8)``; None when W = 1.
      server_error: per leaf, this rank's server-chunk error, float32 ``(n' / W,)``; None when
        W = 1.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    worker_error: Any
    server_error: Any


def _workers(axis_name: Any, who: str) -> int:
    if axis_name is None:
        return 1
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"{who}(axis_name={axis_name!r}): init and update must run where the axis "
            f"{axis_name!r} is bound (inside jax.shard_map or jax.pmap over it), because the "
            "error buffers are per device; use axis_name=None for single-device training"
        ) from None


def scale_by_onebit_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    freeze_step: int = 100000,
    axis_name: Any = "data",
    momentum_mask: Any = None,
    skip_first_step: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    """1-bit Adam's direction: Adam, then frozen variance and a 1-bit all-reduced momentum.

    Called on every data-parallel worker with its **local** gradient ``g_w`` (do not average
    gradients before: warm-up averages them here, compression never does). ``t`` is the
    1-based step counted over all calls, W the size of ``axis_name``::

        t = 1:               u = 0; nothing else changes      (the initialization call)
        2 <= t <= max(F,2):  g = mean_w g_w (psum); m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2
        t > max(F,2):        m <- CompressedAllReduce(b1 m + (1-b1) g_w) (* mask); v frozen
        u = m / (sqrt(v) + eps) + wd * W                  (no bias correction; u = 0 at t = 1)

    ``CompressedAllReduce`` is :func:`optax_ext.kernels.compressed_allreduce` (two-level
    error feedback, packed signs). The phase is a ``lax.switch`` on the count, so each step
    runs (and communicates) only its own phase: a float32 ``psum`` of the gradient during
    warm-up, about 1/32 of those bytes after it.

    Args:
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to ``sqrt(v)``. Default 1e-8.
      weight_decay: ``wd``; ``wd * W`` is added to the direction, outside the preconditioner
        (zero on the initialization call, like the rest). Default 0.
      freeze_step: ``F``; the last warm-up step is ``max(F, 2)``. Default 100000.
      axis_name: the data-parallel axis (a ``shard_map``/``pmap`` axis name). ``None``: one
        worker, no collective (the reference skips compression when W = 1; so does an axis of
        size 1). Default ``"data"``.
      momentum_mask: optional param-shaped tree of 0/1 arrays multiplied into ``m`` after each
        compressed step (the reference's ``exp_avg_mask``, for entries whose momentum is
        always exactly zero, which 1-bit compression cannot represent). Default None.
      skip_first_step: make the first call the reference's initialization call (no change,
        but counted). False: the first call is already a warm-up step (the phases keep their
        step numbers). Default True.
      mu_dtype: dtype of ``m``; default the parameter dtype. Error buffers are float32.
      nu_dtype: dtype of ``v``; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByOnebitAdamState`; ``update`` needs
      ``params`` unless ``weight_decay`` is the number 0.

    Raises:
      ValueError: if ``init``/``update`` run where ``axis_name`` is not bound.

    References:
      Tang et al., 2021, "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
      Convergence Speed", ICML, arXiv 2102.02888; DeepSpeed
      ``deepspeed/runtime/fp16/onebit/adam.py`` ``OnebitAdam`` at edaa722.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_onebit_adam(freeze_step=2, axis_name=None)
      >>> s = tx.init(jnp.zeros(2))
      >>> for t in range(3):
      ...     u, s = tx.update(jnp.array([1.0, -2.0]), s)
      ...     print(t + 1, [round(float(x), 3) for x in u], [round(float(x), 4) for x in s.nu])
      1 [0.0, 0.0] [0.0, 0.0]
      2 [3.162, -3.162] [0.001, 0.004]
      3 [6.008, -6.008] [0.001, 0.004]
    """
    mu_dtype = canonicalize_dtype(mu_dtype)
    nu_dtype = canonicalize_dtype(nu_dtype)
    who = "scale_by_onebit_adam"

    def init_fn(params):
        workers = _workers(axis_name, who)
        if workers > 1:
            worker_error = jax.tree.map(
                lambda p: jnp.zeros(padded_size(p.size, workers), jnp.float32), params
            )
            server_error = jax.tree.map(
                lambda p: jnp.zeros(padded_size(p.size, workers) // workers, jnp.float32), params
            )
        else:
            worker_error = server_error = None
        return ScaleByOnebitAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params, dtype=nu_dtype),
            worker_error=worker_error,
            server_error=server_error,
        )

    def update_fn(updates, state, params=None):
        workers = _workers(axis_name, who)
        if params is None:
            if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
                raise ValueError(f"{who} with weight_decay needs params: update(g, s, params)")
            params = optax.tree.zeros_like(updates)
        f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
        g_local = f32(updates)

        def direction(m, v, p):
            return jax.tree.map(lambda m, v, p: m / (jnp.sqrt(v) + eps) + weight_decay * p, m, v, p)

        def init_call(mu, nu, we, se):
            return mu, nu, we, se, jax.tree.map(jnp.zeros_like, mu)

        def warmup(mu, nu, we, se):
            g = g_local if axis_name is None else jax.lax.pmean(g_local, axis_name)
            mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, g)
            nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, g)
            return mu, nu, we, se, direction(mu, nu, f32(params))

        def compressed(mu, nu, we, se):
            local = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, g_local)
            if workers > 1:
                leaves, treedef = jax.tree.flatten(local)
                means, we_new, se_new = compressed_allreduce(
                    leaves, jax.tree.leaves(we), jax.tree.leaves(se), axis_name
                )
                mu = treedef.unflatten([m.reshape(x.shape) for m, x in zip(means, leaves)])
                we, se = treedef.unflatten(we_new), treedef.unflatten(se_new)
            elif axis_name is not None:
                mu = jax.lax.pmean(local, axis_name)  # one worker: types the result replicated
            else:
                mu = local
            if momentum_mask is not None:
                mu = jax.tree.map(lambda m, k: m * k, mu, momentum_mask)
            return mu, nu, we, se, direction(mu, nu, f32(params))

        step = state.count + 1
        warm = jnp.where(step <= jnp.maximum(freeze_step, 2), 1, 2)
        phase = jnp.where(state.count == 0, 0, warm) if skip_first_step else warm
        operands = (f32(state.mu), f32(state.nu), state.worker_error, state.server_error)
        mu, nu, we, se, out = jax.lax.switch(phase, (init_call, warmup, compressed), *operands)
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        return out, ScaleByOnebitAdamState(
            count=optax.safe_increment(state.count),
            mu=jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu),
            nu=jax.tree.map(lambda v, old: v.astype(old.dtype), nu, state.nu),
            worker_error=we,
            server_error=se,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def per_device_state_specs(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    axis_name: Any = "data",
) -> Any:
    """``PartitionSpec``s of ``tx``'s state for ``jax.shard_map`` over the data axis.

    Per-device buffers (fields named ``worker_error``/``server_error``) are sharded over
    ``axis_name`` (globally, the W local buffers concatenated); everything else (counts,
    moments) is replicated, ``P()``. Use the same tree as ``out_specs`` of the sharded
    ``tx.init`` and as ``in_specs``/``out_specs`` of the training step.

    Args:
      tx: the optimizer (any chain containing :func:`scale_by_onebit_adam`).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``), replicated.
      mesh: the device mesh.
      axis_name: the data-parallel axis of ``mesh``.

    Returns:
      A tree of ``PartitionSpec`` with the structure of ``tx.init(params)``.
    """
    init = jax.vmap(tx.init, in_axes=None, axis_name=axis_name, axis_size=mesh.shape[axis_name])
    shapes = jax.eval_shape(init, params)

    def spec(path, _):
        names = {getattr(k, "name", None) for k in path}
        return PartitionSpec(axis_name) if names & set(PER_DEVICE_FIELDS) else PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, shapes)
