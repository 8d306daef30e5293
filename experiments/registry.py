"""The optimizers the experiments know: one line per recipe.

Each entry builds an ``optax.GradientTransformation`` from a learning-rate schedule and the
length of the run, with settings meant for LM pretraining (the authors' recommended ones where
they give them, refresh/reset periods scaled to short runs), plus a default peak learning rate
and a small grid for sweeps. ``needs`` names the extra ``update`` arguments a recipe takes
(``"gnb"``: a Gauss-Newton-Bartlett Hessian function, ``"hutchinson"``: a Hutchinson one);
``experiments/train.py`` supplies them. A recipe added to optax-ext appears here with one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

import optax_ext
from optax_ext import OnlinePCA, RandomProjector, SVDProjector

Build = Callable[[optax.Schedule, int], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer for the experiments.

    Attributes:
      name: registry key.
      build: ``(lr_schedule, steps) -> GradientTransformation``.
      lr: default peak learning rate.
      grid: learning rates of a sweep (ascending).
      needs: extra update arguments (``None``, ``"gnb"`` or ``"hutchinson"``).
    """

    name: str
    build: Build
    lr: float
    grid: tuple[float, ...]
    needs: str | None = None


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
    """A schedule ``factor`` times another (a second learning rate that follows the sweep)."""
    return lambda count: factor * schedule(count)


def _every(steps: int, target: int) -> int:
    """A refresh/reset period: ``target``, but at most a fifth of the run (at least 10)."""
    return max(10, min(target, steps // 5))


ENTRIES = [
    # Baselines.
    Optimizer(
        "adamw",
        lambda lr, n: optax.adamw(lr, 0.9, 0.95, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "optax_muon",
        lambda lr, n: optax.contrib.muon(lr, adam_b2=0.95, adam_learning_rate=_scaled(lr, 0.15)),
        0.02,
        (0.01, 0.02, 0.04),
    ),
    # Orthogonalized momentum.
    Optimizer(
        "muon",
        lambda lr, n: optax_ext.muon(lr, adam_learning_rate=_scaled(lr, 0.15)),
        0.02,
        (0.01, 0.02, 0.04),
    ),
    Optimizer(
        "normuon",
        lambda lr, n: optax_ext.normuon(lr, adam_learning_rate=_scaled(lr, 0.15)),
        0.02,
        (0.01, 0.02, 0.04),
    ),
    Optimizer("root", lambda lr, n: optax_ext.root(lr), 3e-3, (1e-3, 3e-3, 1e-2)),
    Optimizer(
        "auon",
        lambda lr, n: optax_ext.auon(lr, adam_learning_rate=_scaled(lr, 0.1)),
        0.08,
        (0.04, 0.08, 0.24),
    ),
    Optimizer(
        "hybrid_auon",
        lambda lr, n: optax_ext.hybrid_auon(lr, adam_learning_rate=_scaled(lr, 0.15)),
        0.02,
        (0.01, 0.02, 0.04),
    ),
    Optimizer(
        "lipschitz_muon",
        lambda lr, n: optax_ext.lipschitz_muon(lr, adam_learning_rate=_scaled(lr, 0.03)),
        0.1,
        (0.05, 0.1, 0.2),
    ),
    # Projections and rotations.
    Optimizer(
        "conda",
        lambda lr, n: optax_ext.conda(
            lr, 0.9, 0.99, projector=SVDProjector(None, _every(n, 2000)), scale=0.25
        ),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    Optimizer(
        "galore",
        lambda lr, n: optax_ext.galore(lr, projector=SVDProjector(32, _every(n, 200)), scale=0.25),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    Optimizer(
        "fira",
        lambda lr, n: optax_ext.fira(
            lr,
            projector=SVDProjector(32, _every(n, 200)),
            residual=optax_ext.ScaledResidual(scale=0.25),
        ),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    Optimizer(
        "apollo",
        lambda lr, n: optax_ext.apollo(lr, projector=RandomProjector(32, _every(n, 200))),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    Optimizer(
        "apollo_mini",
        lambda lr, n: optax_ext.apollo_mini(lr, projector=RandomProjector(1, _every(n, 200))),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    Optimizer(
        "soap",
        lambda lr, n: optax_ext.soap(lr, 0.95, 0.95, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "cosmos",
        lambda lr, n: optax_ext.cosmos(
            lr, 0.95, 0.95, weight_decay=0.1, lr_ratio=0.2, subspace=OnlinePCA(rank=16)
        ),
        1e-2,
        (3e-3, 1e-2, 3e-2),
    ),
    # Adam family, sign methods.
    Optimizer(
        "spam",
        lambda lr, n: optax_ext.spam(
            lr,
            reset_every=_every(n, 500),
            warmup_steps=_every(n, 150) // 3,
            grace_steps=min(20, _every(n, 500) // 4),
        ),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "stable_spam",
        lambda lr, n: optax_ext.stable_spam(
            lr, gamma1=0.85, gamma2=0.999, reset_every=_every(n, 500), total_steps=n
        ),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "lion",
        lambda lr, n: optax_ext.lion(lr, 0.95, 0.98, weight_decay=0.3),
        3e-4,
        (1e-4, 3e-4, 1e-3),
    ),
    Optimizer(
        "lion_k",
        lambda lr, n: optax_ext.lion_k(lr, 0.95, 0.98, weight_decay=0.3, k="huber", k_param=1e-4),
        3e-4,
        (1e-4, 3e-4, 1e-3),
    ),
    Optimizer(
        "adabelief",
        lambda lr, n: optax_ext.adabelief(lr, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "adamp",
        lambda lr, n: optax_ext.adamp(lr, 0.9, 0.95, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer("sgdp", lambda lr, n: optax_ext.sgdp(lr, 0.9, nesterov=True), 0.3, (0.1, 0.3, 1.0)),
    Optimizer(
        "perp_adamw",
        lambda lr, n: optax_ext.perp_adamw(lr, 0.9, 0.95, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer("exadam", lambda lr, n: optax_ext.exadam(lr), 1e-3, (3e-4, 1e-3, 3e-3)),
    Optimizer(
        "sgd_sai", lambda lr, n: optax_ext.sgd_sai(lr, weight_decay=0.0), 1e-3, (3e-4, 1e-3, 3e-3)
    ),
    Optimizer(
        "sophia",
        lambda lr, n: optax_ext.sophia(
            lr, rho=0.05, weight_decay=0.1, update_every=10, batch_size=1024
        ),
        1e-3,
        (3e-4, 1e-3, 3e-3),
        needs="gnb",
    ),
    Optimizer(
        "adahessian",
        lambda lr, n: optax_ext.adahessian(lr),
        0.05,
        (0.02, 0.05, 0.15),
        needs="hutchinson",
    ),
    # Compression.
    Optimizer(
        "adamw_8bit",
        lambda lr, n: optax_ext.adamw_8bit(lr, 0.9, 0.95, weight_decay=0.1),
        3e-3,
        (1e-3, 3e-3, 1e-2),
    ),
    Optimizer(
        "adam_8bit", lambda lr, n: optax_ext.adam_8bit(lr, 0.9, 0.95), 3e-3, (1e-3, 3e-3, 1e-2)
    ),
    Optimizer(
        "lion_8bit",
        lambda lr, n: optax_ext.lion_8bit(lr, 0.95, 0.98, weight_decay=0.3),
        3e-4,
        (1e-4, 3e-4, 1e-3),
    ),
    Optimizer(
        "onebit_adam",
        lambda lr, n: optax_ext.onebit_adam(
            lr, 0.9, 0.95, freeze_step=max(2, n // 5), axis_name=None
        ),
        1e-3,
        (3e-4, 1e-3, 3e-3),
    ),
]

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in ENTRIES}

NOT_OPTIMIZERS = frozenset(
    {"rex_schedule", "exadam_v1_schedule", "lipschitz_bound", "layer_norms"}
)
"""Recipe-module exports that are not optimizers (schedules, diagnostics); the ``scale_by_*``
forms of recipes are reached through the recipes themselves."""


class UnknownOptimizer(ValueError):
    """An optimizer name the registry does not have (the message lists the known ones)."""


def get(name: str) -> Optimizer:
    """The registry entry called ``name``.

    Raises:
      UnknownOptimizer: naming the known optimizers.
    """
    if name not in OPTIMIZERS:
        raise UnknownOptimizer(
            f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    return OPTIMIZERS[name]
