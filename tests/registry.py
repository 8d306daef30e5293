"""The registry of recipes that every convention check runs on (tests/test_conventions.py).

A new recipe is one line: ``Entry(name, factory, kwargs)``. ``factory(**kwargs)`` must build the
optimizer, ``kwargs`` must contain ``learning_rate`` (checked with ``optax.inject_hyperparams``)
and be small-problem friendly (small ranks, short refresh periods). ``extra_args(step, params,
grads)`` supplies the keyword arguments of ``update`` for recipes that need them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_ext
from optax_ext.kernels import BlockQuantizer, NewtonSchulz, RandomProjector, SVDProjector


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    extra_args: Callable[[int, Any, Any], dict[str, Any]] | None = None
    descent_steps: int = 20
    noop_calls: int = 0  # leading calls that only build state (SOAP, 1-bit Adam)


def _identity_hessian(step, params, grads):
    """Hessian-diagonal extra argument for the quadratic of the convention checks."""
    del step, grads
    return {"hessian": jax.tree.map(jnp.ones_like, params)}


def _hidden_chain(hidden: Callable[[Any], optax.GradientTransformation]):
    """Primitive chain on hidden matrices, AdamW elsewhere (how recipes are assembled)."""

    def factory(learning_rate):
        return optax.partition(
            {"hidden": hidden(learning_rate), "other": optax.adamw(learning_rate)},
            optax_ext.labels.hidden_matrices,
        )

    return factory


PRIMITIVE_CHAINS = [
    Entry(
        "chain:momentum+orthogonalize+scale_by_shape",
        _hidden_chain(
            lambda lr: optax.chain(
                optax_ext.momentum(0.95, nesterov=True),
                optax_ext.orthogonalize(NewtonSchulz(dtype="float32")),
                optax_ext.scale_by_shape("sqrt_fan_out_over_fan_in"),
                optax.add_decayed_weights(0.01),
                optax.scale_by_learning_rate(lr),
            )
        ),
        dict(learning_rate=0.02),
    ),
    Entry(
        "chain:column_normalize",
        _hidden_chain(
            lambda lr: optax.chain(
                optax_ext.column_normalize(projector=SVDProjector(rank=None, update_every=3)),
                optax.scale_by_learning_rate(lr),
                optax_ext.add_decoupled_weight_decay(0.01, lr),
            )
        ),
        dict(learning_rate=0.01),
    ),
    Entry(
        "chain:project_low_rank(svd)",
        _hidden_chain(
            lambda lr: optax.chain(
                optax_ext.project_low_rank(
                    optax_ext.scale_by_adam(bias_correction="hf"),
                    SVDProjector(rank=2, update_every=3),
                ),
                optax.scale_by_learning_rate(lr),
            )
        ),
        dict(learning_rate=0.01),
    ),
    Entry(
        "chain:project_low_rank(random)",
        _hidden_chain(
            lambda lr: optax.chain(
                optax_ext.project_low_rank(
                    optax_ext.scale_by_adam(), RandomProjector(rank=2, update_every=3)
                ),
                optax.scale_by_learning_rate(lr),
            )
        ),
        dict(learning_rate=0.01),
    ),
    Entry(
        "chain:momentum_reset+clip_spikes",
        lambda learning_rate: optax.chain(
            optax_ext.momentum_reset(
                optax_ext.clip_spikes(optax_ext.scale_by_adam(), 50.0, every=4, grace_steps=2),
                every=4,
            ),
            optax.scale_by_learning_rate(learning_rate),
        ),
        dict(learning_rate=0.01),
    ),
]

RECIPES: list[Entry] = [
    *PRIMITIVE_CHAINS,
    # Muon family.
    Entry("muon", optax_ext.muon, dict(learning_rate=0.02, adam_learning_rate=0.01)),
    Entry(
        "muon:polar_express",
        optax_ext.muon,
        dict(learning_rate=0.02, ns=NewtonSchulz.polar_express(), shape_rule="moonlight"),
    ),
    Entry("normuon", optax_ext.normuon, dict(learning_rate=0.02, adam_learning_rate=0.01)),
    Entry("root", optax_ext.root, dict(learning_rate=0.01)),
    Entry("auon", optax_ext.auon, dict(learning_rate=0.2, adam_learning_rate=0.01)),
    Entry("hybrid_auon", optax_ext.hybrid_auon, dict(learning_rate=0.02, adam_learning_rate=0.01)),
    Entry("auon:v1", optax_ext.auon, dict(learning_rate=0.02, variant="v1")),
    # GaLore family and Conda.
    Entry("galore", optax_ext.galore, dict(learning_rate=0.01, projector=SVDProjector(2, 3))),
    Entry("fira", optax_ext.fira, dict(learning_rate=0.01, projector=SVDProjector(2, 3))),
    Entry("apollo", optax_ext.apollo, dict(learning_rate=0.01, projector=RandomProjector(2, 3))),
    Entry("apollo:svd", optax_ext.apollo, dict(learning_rate=0.01, projector=SVDProjector(2, 3))),
    Entry(
        "apollo_mini",
        optax_ext.apollo_mini,
        dict(learning_rate=0.01, projector=RandomProjector(1, 3)),
    ),
    Entry(
        "conda",
        optax_ext.conda,
        dict(learning_rate=0.01, projector=SVDProjector(None, update_every=3)),
    ),
    # SOAP, COSMOS.
    Entry("soap", optax_ext.soap, dict(learning_rate=0.01, precondition_frequency=2), noop_calls=1),
    Entry(
        "soap:one_sided_1d",
        optax_ext.soap,
        dict(
            learning_rate=0.01,
            precondition_frequency=2,
            layout=optax_ext.SoapLayout(max_precond_dim=10, precondition_1d=True),
        ),
        noop_calls=1,
    ),
    Entry(
        "cosmos",
        optax_ext.cosmos,
        dict(learning_rate=0.02, lr_ratio=1.0, subspace=optax_ext.OnlinePCA(rank=2)),
    ),
    # Adam family, sign methods.
    Entry(
        "spam",
        optax_ext.spam,
        dict(learning_rate=0.01, reset_every=4, warmup_steps=2, grace_steps=2),
    ),
    Entry(
        "stable_spam",
        optax_ext.stable_spam,
        dict(learning_rate=0.01, reset_every=4, total_steps=20),
    ),
    Entry("lion", optax_ext.lion, dict(learning_rate=3e-3, weight_decay=0.01)),
    Entry("lion_k:huber", optax_ext.lion_k, dict(learning_rate=3e-3, k="huber", k_param=0.01)),
    Entry("adabelief", optax_ext.adabelief, dict(learning_rate=0.01, weight_decay=1e-4)),
    Entry("adamp", optax_ext.adamp, dict(learning_rate=0.01, weight_decay=0.01)),
    Entry("sgdp", optax_ext.sgdp, dict(learning_rate=0.1, beta=0.9, weight_decay=1e-4)),
    Entry("perp_adamw", optax_ext.perp_adamw, dict(learning_rate=0.01)),
    Entry("exadam", optax_ext.exadam, dict(learning_rate=3e-3)),
    Entry("sgd_sai", optax_ext.sgd_sai, dict(learning_rate=1e-3, weight_decay=0.0)),
    # Second order: the convention problem 0.5 ||p - target||^2 has Hessian I.
    Entry(
        "sophia",
        optax_ext.sophia,
        dict(learning_rate=0.01, update_every=2, batch_size=1.0, weight_decay=0.0),
        extra_args=_identity_hessian,
    ),
    Entry(
        "sophia:hutchinson",
        optax_ext.sophia,
        dict(learning_rate=0.01, update_every=2, variant="h", weight_decay=0.0),
        extra_args=_identity_hessian,
    ),
    Entry(
        "adahessian", optax_ext.adahessian, dict(learning_rate=0.01), extra_args=_identity_hessian
    ),
    # State compression.
    Entry(
        "adamw_8bit(min_size=0)",
        optax_ext.adamw_8bit,
        dict(learning_rate=0.01, quantizer=BlockQuantizer(min_size=0)),
    ),
    Entry("adamw_8bit", optax_ext.adamw_8bit, dict(learning_rate=0.01)),
    Entry(
        "lion_8bit(min_size=0)",
        optax_ext.lion_8bit,
        dict(learning_rate=0.005, quantizer=BlockQuantizer(min_size=0)),
    ),
    Entry("lion_8bit", optax_ext.lion_8bit, dict(learning_rate=0.005)),
    # Communication compression and constraints.
    Entry(
        "onebit_adam",
        optax_ext.onebit_adam,
        # skip_first_step=False: the MultiSteps check expects the first applied step to move
        dict(learning_rate=0.01, freeze_step=3, axis_name=None, skip_first_step=False),
    ),
    Entry("lipschitz_muon", optax_ext.lipschitz_muon, dict(learning_rate=0.02, w_max=1.0)),
]

# Variants whose kernels and layouts another entry already runs: Newton-Schulz coefficients only
# (Muon); SVD bases (GaLore, Fira); below the 8-bit size threshold on the test trees, so plain
# Adam/Lion (the min_size=0 entries quantize); an elementwise Lion; AdamP's projection with SGD
# momentum; and the primitive chains that a recipe is built of, primitive for primitive (Muon:
# momentum, orthogonalize, scale_by_shape; GaLore: project_low_rank of Adam with SVD bases;
# SPAM: momentum_reset of clip_spikes of Adam). The sharded multi-device checks leave them out
# (CI time); every single-device check runs them.
KERNEL_COVERED = frozenset(
    {"muon:polar_express", "apollo:svd", "adamw_8bit", "lion_8bit", "lion_k:huber", "sgdp",
     "chain:momentum+orthogonalize+scale_by_shape", "chain:project_low_rank(svd)",
     "chain:momentum_reset+clip_spikes"}
)
