"""1-bit Adam: frozen-variance Adam with an error-compensated 1-bit momentum all-reduce."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.communication import scale_by_onebit_adam
from optax_ext.recipes import _common


def onebit_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
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
) -> optax.GradientTransformation:
    """1-bit Adam (Tang et al., 2021): Adam warm-up, then frozen ``v`` and 1-bit momentum sync.

    A data-parallel optimizer: it runs on every worker with that worker's own gradient and
    does the gradient communication itself. Warm-up is Adam on the worker-mean gradient;
    afterwards the variance is frozen and only the momentum is exchanged, compressed to one
    sign bit per entry (plus a scale per tensor) with error feedback on both the worker and the
    server side. Every leaf of the tree takes the same rule (no partition), as in the reference.

    Algorithm (``g_w`` the local gradient of worker ``w``, ``t`` the 1-based call count)::

        t = 1:                 no change (the reference's initialization call)
        2 <= t <= max(F, 2):   g = mean_w g_w;  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        t > max(F, 2):         m <- C_AR(b1 m + (1-b1) g_w);  v frozen
        W <- W - lr (m / (sqrt(v) + eps) + wd W)              (no bias correction)

    ``C_AR`` = :func:`optax_ext.kernels.compressed_allreduce` (sign+ with RMS scales, padding to
    ``W lcm(W, 8)``, worker and server error buffers, signs sent packed 8 per byte).

    **Wiring** (``jax.shard_map`` over a data axis of W devices):

    - Give ``update`` this device's gradient; never ``pmean``/``psum`` the gradients yourself
      (during warm-up the optimizer averages them with one float32 ``psum``; afterwards it
      sends only the compressed momentum). Parameters stay replicated (``P()``).
    - Build the state on the devices with ``tx.init`` inside ``shard_map``;
      :func:`optax_ext.per_device_state_specs` gives its specs: the error buffers are per device
      (``P(axis_name)``: the global array is the W local buffers concatenated), counts and
      moments are replicated (``P()``; identical on all workers by construction).
    - ``jax.pmap(tx.init, axis_name=...)`` and ``jax.pmap(step, axis_name=...)`` work as well
      (state with a leading device axis).
    - Single device: ``axis_name=None`` (no collective; the reference skips compression at
      W = 1, and so does an axis of size 1).

    Args:
      learning_rate: ``lr`` (scalar or schedule). Default 1e-3.
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to ``sqrt(v)``. Default 1e-8.
      weight_decay: ``wd``, added to the direction as ``wd W`` (lr-scaled, outside the
        preconditioner). Default 0.
      freeze_step: ``F``, the step count at which compression starts. Default 100000 (the
        tutorial advises 15-25% of the total steps).
      axis_name: the data-parallel axis name, or None for one worker. Default ``"data"``.
      momentum_mask: optional param-shaped 0/1 tree multiplied into ``m`` after each compressed
        step (the reference's ``exp_avg_mask``). Default None.
      skip_first_step: the first call is the reference's initialization call (no update;
        its batch is effectively discarded). False starts warm-up at the first call. Default
        True.
      mu_dtype: dtype of ``m`` and ``v``; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with state
      ``(ScaleByOnebitAdamState, ScaleByLearningRateState)``.

    Raises:
      ValueError: if ``init``/``update`` run where ``axis_name`` is not bound.

    References:
      Tang et al., 2021, "1-bit Adam: Communication Efficient Large-Scale Training with Adam's
      Convergence Speed", ICML, https://arxiv.org/abs/2102.02888 ; code:
      https://github.com/deepspeedai/DeepSpeed/blob/edaa7221267243c7be7fb49c5d5f5c4fb97b4641/deepspeed/runtime/fp16/onebit/adam.py
      and ``deepspeed/runtime/comm/nccl.py`` (``NcclBackend.compressed_allreduce``).

    Notes:
      - Follows the code, not the paper: the switch is at the fixed ``freeze_step`` (the
        paper also discusses a variance-change threshold); no bias correction
        (``bias_correction`` is accepted but unused there), so the first real step moves each
        entry by about ``(1 - b1) / sqrt(1 - b2) lr = 3.16 lr``; the first call is the
        reference's communicator warm-up (no update, counted as a step); ``sign+(0) = +1``
        and the zero padding enters the RMS scales.
      - The reference's initialization call runs a compressed all-reduce of zeros; here it
        does nothing (the result is the same: zero momentum, zero errors).
      - Error buffers live on each device and are not meant to be restored onto another
        number of devices; the reference resets them on every checkpoint load. Restoring
        them here continues the error feedback exactly.
      - Not implemented: the reference's ``non_freeze`` parameter groups (keep Adam with
        averaged gradients for some tensors); use ``optax.partition`` with ``optax.adam``
        on ``pmean``-ed gradients for those.

    Example:
      >>> import functools, jax, jax.numpy as jnp, optax, optax_ext
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))          # W devices in real use
      >>> params = {"w": jnp.zeros(4)}
      >>> tx = optax_ext.onebit_adam(0.1, freeze_step=3, axis_name="data")
      >>> specs = optax_ext.per_device_state_specs(tx, params, mesh, "data")
      >>> state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs))(
      ...     params)
      >>> @jax.jit
      ... @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data")),
      ...                    out_specs=(P(), specs))
      ... def train_step(params, state, y):           # y: this device's batch
      ...     loss = lambda p: jnp.mean((p["w"] - y) ** 2)
      ...     g = jax.grad(loss)(params)              # local gradient: no pmean
      ...     u, state = tx.update(g, state, params)
      ...     return optax.apply_updates(params, u), state
      >>> batch = jax.device_put(jnp.ones((1, 4)), NamedSharding(mesh, P("data")))
      >>> for _ in range(5):
      ...     params, state = train_step(params, state, batch)
      >>> int(state[0].count), round(float(params["w"][0]), 2)   # 1 init + 2 warm-up + 2 compressed
      (5, 1.53)
    """
    return _common.tied(optax.chain(
        scale_by_onebit_adam(  # m, v by phase; m 1-bit all-reduced after F; + wd W
            b1,
            b2,
            eps,
            weight_decay,
            freeze_step=freeze_step,
            axis_name=axis_name,
            momentum_mask=momentum_mask,
            skip_first_step=skip_first_step,
            mu_dtype=mu_dtype,
            nu_dtype=mu_dtype,
        ),
        optax.scale_by_learning_rate(learning_rate),  # W <- W - lr u
    ))
