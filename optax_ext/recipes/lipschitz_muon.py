"""Muon with enforced weight norms and the Lipschitz bound it certifies (Newhouse et al., 2025)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext import labels
from optax_ext._types import SpecLike, is_masked
from optax_ext.kernels import lapack
from optax_ext.kernels.newton_schulz import NewtonSchulz
from optax_ext.kernels.spectral import LIPSCHITZ_ORTHO
from optax_ext.primitives.constraints import (
    constrain_spectral_norm,
    constrain_token_rms,
    normalize_token_rms,
)
from optax_ext.primitives.moments import momentum
from optax_ext.primitives.orthogonalize import orthogonalize, scale_by_shape
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common

HEAD_TREATMENTS = ("matrix", "tokens")


def lipschitz_muon(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    beta: float = 0.9,
    weight_decay: float = 0.0,
    *,
    method: str = "soft_cap",
    w_max: float = 6.0,
    target_norm: float = 1.0,
    spectral_wd: float = 0.0,
    max_inflation: float = 16.0,
    head: str = "matrix",
    ns: NewtonSchulz | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Muon co-designed with a weight constraint: every step lands on norm-bounded weights.

    The reference's ``Atom.decay_step_project`` after the Muon optimizer and the modular
    dualization: hidden matrices take orthogonalized momentum scaled to unit RMS->RMS norm,
    decay, step, then a projection that keeps ``sqrt(fan_in/fan_out) sigma_max(W) <= w_max``;
    embeddings take per-token RMS-normalised momentum and a per-token RMS cap of 1.

    Algorithm (hidden matrix ``W``, flax ``(fan_in, fan_out)``; ``eta = lr t``, ``t`` the
    target norm)::

        B <- beta B + (1 - beta) G                        # Muon momentum (no Nesterov)
        D <- orthogonalize(B) sqrt(fan_out / fan_in) t    # Linear.dualize
        W <- W (1 - wd eta) - lr D                        # decay, then step
        W <- s P(W / s)                                   # Linear.project, P = method

    Embedding ``E`` (flax ``(num_embed, d)``): ``D = B / max(1/max_inflation, rms_row(B)) t``,
    the same decay and step, then ``E <- E / max(1, rms_row(E))``. Vectors (absent from the
    reference's models) take AdamW at ``adam_learning_rate``.

    Args:
      learning_rate: ``lr`` (scalar or schedule). Default 0.1 (the reference's Shakespeare
        transformer config, with a linear decay schedule there).
      beta: momentum. Default 0.9.
      weight_decay: ``wd``, multiplied by ``eta`` per step. Default 0.
      method: projection of hidden matrices, a key of
        :data:`optax_ext.primitives.constraints.SPECTRAL_METHODS`. Default ``"soft_cap"`` with
        the coupled strength (the paper's co-designed "spectral soft cap").
      w_max: bound on each hidden matrix's RMS->RMS norm. Default 6 (Shakespeare config).
      target_norm: ``t``, the update norm of every layer. Default 1.
      spectral_wd: factor of ``method="spec_wd"``. Default 0.
      max_inflation: largest amplification of a small embedding-gradient row. Default 16.
      head: ``"matrix"`` (the output head is a hidden-style ``Linear``, the Shakespeare config's
        ``use_unembed=False``) or ``"tokens"`` (the reference's ``Unembed``: per-token RMS
        treatment along the head kernel's fan-in axis).
      ns: orthogonalization spec; default (None) the reference's six-step iteration
        (:data:`optax_ext.kernels.spectral.LIPSCHITZ_ORTHO`).
      adam_learning_rate: lr of the AdamW used for vectors. Default ``0.003 * learning_rate``
        (3e-4 at the default lr 0.1), following a schedule passed as ``learning_rate``; an
        explicit value wins.
      param_labels: a tree or function giving ``labels.param_labels``-style labels
        (``"hidden"``, ``"embed"``, ``"head"``, ``"vector"``); default
        :func:`optax_ext.labels.param_labels`.
      specs: fan-in/fan-out axes of hidden leaves (default :func:`optax_ext.labels.matrix_view`).
      seed: PRNG seed of the power iterations (spec_* methods); ``update(..., key=k)`` overrides.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.partition``) whose ``update``
      needs ``params``.

    Raises:
      ValueError: for an unknown ``method``/``head``, or a hidden leaf with ``ndim < 2``.

    References:
      Newhouse, Hess, Cesista, Zahorodnii, Bernstein, Isola, 2025, "Training Transformers with
      Enforced Lipschitz Constants", https://arxiv.org/abs/2507.13338 ; code:
      https://github.com/Arongil/lipschitz-transformers/tree/158692e24c0fbb3cbeea3f7454f41fd4bfcec209
      (``modula/abstract.py`` ``Atom.decay_step_project``, ``modula/atom.py``,
      ``optimizers.py`` ``Muon``).

    Notes:
      - The reference splits ``target_norm`` over modules by their mass and sensitivity
        (compound modules), i.e. per-layer step sizes; here every layer gets ``target_norm``
        (use ``optax.partition`` with several instances for per-layer values).
      - Stacked ``(L, in, out)`` weights are projected per matrix, without the reference's
        division by the number of stacked matrices (1 for its 2-D weights).
      - The reference decays with ``wd * lr * t`` and passes ``wd * lr * t`` and ``lr * t`` to
        the soft-cap coupling, as here; lr = 0 still projects (identity for soft cap, whose
        strength is then 0, and for weights already inside the constraint of the exact maps).

    Example:
      >>> import jax, jax.numpy as jnp, optax, optax_ext
      >>> params = {"wte": {"embedding": jnp.ones((10, 4))},
      ...           "mlp": {"kernel": 0.1 * jnp.ones((4, 8))}, "ln": {"scale": jnp.ones(4)}}
      >>> tx = optax_ext.lipschitz_muon(0.1, w_max=1.0)
      >>> g = jax.tree.map(jnp.ones_like, params)
      >>> u, _ = tx.update(g, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> w = new["mlp"]["kernel"]   # RMS->RMS norm <= w_max
      >>> bool(jnp.sqrt(4 / 8) * jnp.linalg.norm(w, 2) <= 1.0 + 1e-5)
      True
    """
    if head not in HEAD_TREATMENTS:
        raise ValueError(f"head must be one of {HEAD_TREATMENTS}, got {head!r}")

    def matrices():
        return optax.chain(
            momentum(beta),  # B <- beta B + (1 - beta) G
            orthogonalize(ns or LIPSCHITZ_ORTHO, specs=specs),  # O(B), (fan_in, fan_out) view
            scale_by_shape("sqrt_fan_out_over_fan_in_plain", specs=specs),  # * sqrt(fo/fi)
            optax.scale(target_norm),  # D = O(B) sqrt(fan_out/fan_in) t
            optax.scale_by_learning_rate(learning_rate),  # -lr D
            add_decoupled_weight_decay(
                weight_decay * target_norm, learning_rate, after_update=False
            ),
            constrain_spectral_norm(  # W <- s P(W / s)
                method,
                w_max=w_max,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                target_norm=target_norm,
                spectral_wd=spectral_wd,
                seed=seed,
                specs=specs,
            ),
        )

    def tokens(axis):
        return optax.chain(
            momentum(beta),  # B <- beta B + (1 - beta) G
            normalize_token_rms(max_inflation, axis=axis),  # rows to RMS 1 (<= inflation x)
            optax.scale(target_norm),
            optax.scale_by_learning_rate(learning_rate),
            add_decoupled_weight_decay(
                weight_decay * target_norm, learning_rate, after_update=False
            ),
            constrain_token_rms(axis=axis),  # E <- E / max(1, rms_row(E))
        )

    transforms = {
        "hidden": matrices(),
        "embed": tokens(-1),
        "vector": _common.adamw(
            _common.auxiliary_learning_rate(adam_learning_rate, learning_rate, 3e-4 / 0.1)
        ),
    }
    if head == "tokens":
        transforms["head"] = tokens(-2)
    group = {"head": "hidden"} if head == "matrix" else {}
    if param_labels is None:
        param_labels = labels.label_fn(group)
    elif group:
        given = param_labels
        rename = lambda tree: jax.tree.map(lambda x: group.get(x, x), tree)  # noqa: E731
        param_labels = (lambda p: rename(given(p))) if callable(given) else rename(given)
    return _common.tied(optax.partition(transforms, param_labels))


# ----------------------------------------------------------------------------------------------
# The certified Lipschitz bound.

ATTENTION = ("q", "k", "v", "o")
_ATTN_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_MLP_NAMES = {"fc": "mlp_in", "proj": "mlp_out"}
_GATED = ("gate", "up", "down")


def _matrix_norm(w: jax.Array) -> jax.Array:
    """RMS->RMS operator norm of a flax ``(..., fan_in, fan_out)`` kernel (batched)."""
    w = w.astype(jnp.float32)
    sigma = lapack.singular_values(w)[..., 0]
    return jnp.sqrt(w.shape[-2] / w.shape[-1]) * sigma


def _token_norm(w: jax.Array, axis: int) -> jax.Array:
    """Largest RMS of a token vector (RMS over the embedding ``axis``)."""
    w = w.astype(jnp.float32)
    return jnp.max(jnp.linalg.norm(w, axis=axis) / jnp.sqrt(float(w.shape[axis])))


def layer_norms(params: Any, *, head: str = "matrix") -> dict[str, Any]:
    """The per-layer norms :func:`lipschitz_bound` needs, read from a flax GPT param tree.

    Paths (as the ``models`` package names them): ``wte`` (embedding, ``(vocab, d)``),
    ``lm_head`` (kernel ``(d, vocab)``; absent = tied to ``wte``),
    ``blocks/<i>/attn/{q_proj,k_proj,v_proj,o_proj}`` and ``blocks/<i>/mlp/{fc,proj}``
    (kernels ``(fan_in, fan_out)``; a ``blocks/...`` kernel with a leading layer axis counts as
    one block per slice).

    Norms (the reference's logged ``weight_norm``): linear maps ``sqrt(fan_in/fan_out)
    sigma_max``; the embedding the largest token RMS; the head as a linear map
    (``head="matrix"``) or the largest token RMS (``"tokens"``, the reference's ``Unembed``).

    Returns:
      ``{"embed": e, "unembed": u, "blocks": [{"q", "k", "v", "o", "mlp_in", "mlp_out"}, ...]}``.

    Raises:
      ValueError: for gated MLPs (``gate``/``up``/``down``: a product of two linear maps has
        no global Lipschitz bound) or a missing attention/MLP matrix (its path is named).

    Positional tables (``wpe``) and vectors are not read: the reference's model has rotary
    positions and no gains or biases.
    """
    blocks: dict[int, dict[str, jax.Array]] = {}
    embed = unembed = None
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)
    for path, leaf in flat:
        if is_masked(leaf) or jnp.ndim(leaf) < 2:
            continue
        names = labels.path_names(path)
        joined = "/".join(names)
        if "wte" in names:
            embed = _token_norm(leaf, -1)
            if unembed is None and head != "matrix":
                unembed = embed
            continue
        if "lm_head" in names:
            unembed = _matrix_norm(leaf) if head == "matrix" else _token_norm(leaf, -2)
            continue
        if any(n in _GATED for n in names) and "mlp" in names:
            raise ValueError(
                f"parameter {joined}: gated MLPs are outside the paper's bound (the product of "
                "two linear maps has no global Lipschitz constant)"
            )
        found = re.search(r"blocks/(\d+/)?(attn|mlp)/(\w+)/", joined + "/")
        if not found:
            continue
        kind = {**_ATTN_NAMES, **_MLP_NAMES}.get(found.group(3))
        if kind is None:
            continue
        norms = _matrix_norm(leaf)
        indices = [int(found.group(1)[:-1])] if found.group(1) else range(norms.shape[0])
        for j, i in enumerate(indices):
            blocks.setdefault(i, {})[kind] = norms if found.group(1) else norms[j]
    if embed is None:
        raise ValueError("no embedding table (a path component 'wte') in params")
    if unembed is None:
        unembed = embed  # tied head
    out = []
    for i in sorted(blocks):
        missing = set(ATTENTION) | {"mlp_in", "mlp_out"}
        missing -= set(blocks[i])
        if missing:
            raise ValueError(
                f"block {i}: missing {sorted(missing)} (expected paths "
                "blocks/<i>/attn/{q,k,v,o}_proj and blocks/<i>/mlp/{fc,proj})"
            )
        out.append(blocks[i])
    return {"embed": embed, "unembed": unembed, "blocks": out}


def lipschitz_bound(
    params: Any = None,
    *,
    norms: Mapping[str, Any] | None = None,
    softmax_scale: float = 1.0,
    residual_scale: float = 1.0,
    attention_factor: float = 1 / 3,
    mlp_factor: float = 1 / 1.1289,
    head: str = "matrix",
) -> jax.Array:
    """Upper bound on a residual transformer's Lipschitz constant from its per-layer norms.

    The reference's ``utils.calculate_lipschitz_constant`` for its modula ``GPT`` (no
    LayerNorm)::

        x_0 = embed(tokens)                                   (token rows of RMS <= L_embed)
        per block l = 1..L, alpha = residual_scale / (2 L):
          x <- (1 - alpha) x + alpha attn(x),   attn(x) = W_o (1/3) softmax(c q k^T / d) V x
          x <- (1 - alpha) x + alpha mlp(x),    mlp(x)  = W_out gelu(W_in x) / 1.1289
        logits = head(x_L)

    Stage 1 bounds the activation norms ``a`` (``a_0 = 1``; each sub-block multiplies by
    ``(1 - alpha) + alpha n`` with ``n = attention_factor |o| |v|`` resp. ``mlp_factor |out|
    |in|``); stage 2 multiplies the Lipschitz constants::

        L <- L_embed
        L <- L ((1 - alpha) + alpha L_att),  L_att = f_att |o| (|v| + 2 |v| a^2 |q| |k|) c
        L <- L ((1 - alpha) + alpha L_mlp),  L_mlp = f_mlp |out| |in|
        L <- L |head|

    with ``a`` the activation bound entering that attention, ``c = softmax_scale``,
    ``f_att = attention_factor``, ``f_mlp = mlp_factor`` and ``|.|``
    the RMS->RMS norms of :func:`layer_norms`.

    Args:
      params: a flax GPT param tree (see :func:`layer_norms`), or None with ``norms``.
      norms: explicit ``{"embed", "unembed", "blocks": [{"q","k","v","o","mlp_in","mlp_out"}]}``.
      softmax_scale: ``c``, the attention logit scale (the model divides ``q k^T`` by the head
        dimension ``d``, not its square root). Default 1.
      residual_scale: the model's residual weight; ``alpha = residual_scale / (2 L)``.
        Default 1 (the reference's bound hard-codes it).
      attention_factor: the ``1/3`` of the model's attention. Default 1/3.
      mlp_factor: the bound's factor for the MLP nonlinearity. Default ``1 / 1.1289`` as the
        reference's bound; see Notes.
      head: how the head enters (``"matrix"`` or ``"tokens"``), see :func:`layer_norms`.

    Returns:
      A float32 scalar array.

    References:
      Newhouse et al., 2025, arXiv 2507.13338; code ``utils.py`` and ``modula/compound.py``
      (``GPT``) at 158692e of github.com/Arongil/lipschitz-transformers.

    Notes:
      - Certifies only models of the structure above (convex-combination residuals, the 1/3
        attention scale, ``1/d`` logits, no LayerNorm, no gating). Standard pre-LayerNorm
        residual blocks ``x + f(LN(x))`` are not covered.
      - The reference's model already divides GeLU by 1.1289 (its maximal slope), making the
        activation 1-Lipschitz, and its bound divides by 1.1289 once more; we follow the bound
        (``mlp_factor = 1/1.1289``). ``mlp_factor=1`` gives the strict certificate for that
        model, ``1.1289`` for a plain GeLU.
      - ``softmax_scale`` multiplies the whole attention term (including the value path), as in
        the reference.
    """
    if norms is None:
        if params is None:
            raise ValueError("lipschitz_bound needs params or norms")
        norms = layer_norms(params, head=head)
    blocks: Sequence[Mapping[str, Any]] = norms["blocks"]
    depth = len(blocks)
    alpha = residual_scale / (2 * depth) if depth else 0.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    act = [f32(1.0)]
    for b in blocks:
        att = attention_factor * f32(b["o"]) * f32(b["v"])
        act.append((1 - alpha) * act[-1] + alpha * att * act[-1])
        mlp = f32(b["mlp_out"]) * f32(b["mlp_in"]) * mlp_factor
        act.append((1 - alpha) * act[-1] + alpha * mlp * act[-1])
    bound = f32(norms["embed"])
    for i, b in enumerate(blocks):
        q, k, v, o = (f32(b[n]) for n in ATTENTION)
        l_att = attention_factor * o * (v + 2 * v * act[2 * i] ** 2 * q * k) * softmax_scale
        l_mlp = f32(b["mlp_out"]) * f32(b["mlp_in"]) * mlp_factor
        bound = (1 - alpha) * bound + alpha * bound * l_att
        bound = (1 - alpha) * bound + alpha * bound * l_mlp
    return bound * f32(norms["unembed"])
