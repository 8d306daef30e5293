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

import optax

import optax_ext
from optax_ext.kernels import NewtonSchulz, RandomProjector, SVDProjector


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    extra_args: Callable[[int, Any, Any], dict[str, Any]] | None = None
    descent_steps: int = 20


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
                optax_ext.orthogonalize(NewtonSchulz()),
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
    # GaLore family and Conda.
    # SOAP, COSMOS.
    # Adam family, sign methods.
    # Second order.
    # State compression.
    # Communication compression and constraints.
    Entry(
        "onebit_adam",
        optax_ext.onebit_adam,
        # skip_first_step=False: the MultiSteps check expects the first applied step to move
        dict(learning_rate=0.01, freeze_step=3, axis_name=None, skip_first_step=False),
    ),
    Entry("lipschitz_muon", optax_ext.lipschitz_muon, dict(learning_rate=0.02, w_max=1.0)),
]
