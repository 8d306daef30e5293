"""optax-ext: modern LLM optimizers as composable optax transformations.

Kernels (pure math) live in :mod:`optax_ext.kernels`; this module exports the primitives
(``optax.GradientTransformation`` factories), the parameter labels and the recipes.
"""

from optax_ext import kernels as kernels
from optax_ext import labels as labels

# Types and specs.
from optax_ext._types import MatrixSpec as MatrixSpec
from optax_ext.kernels.newton_schulz import NewtonSchulz as NewtonSchulz
from optax_ext.kernels.newton_schulz import PolarSVD as PolarSVD
from optax_ext.kernels.projections import RandomProjector as RandomProjector
from optax_ext.kernels.projections import SVDProjector as SVDProjector

# Primitives.
from optax_ext.primitives.communication import (
    ScaleByOnebitAdamState as ScaleByOnebitAdamState,
)
from optax_ext.primitives.communication import per_device_state_specs as per_device_state_specs
from optax_ext.primitives.communication import scale_by_onebit_adam as scale_by_onebit_adam
from optax_ext.primitives.constraints import (
    ConstrainSpectralNormState as ConstrainSpectralNormState,
)
from optax_ext.primitives.constraints import constrain_spectral_norm as constrain_spectral_norm
from optax_ext.primitives.constraints import constrain_token_rms as constrain_token_rms
from optax_ext.primitives.constraints import normalize_token_rms as normalize_token_rms
from optax_ext.primitives.moments import MomentumState as MomentumState
from optax_ext.primitives.moments import ScaleByAdamState as ScaleByAdamState
from optax_ext.primitives.moments import momentum as momentum
from optax_ext.primitives.moments import scale_by_adam as scale_by_adam
from optax_ext.primitives.normalize import ColumnNormalizeState as ColumnNormalizeState
from optax_ext.primitives.normalize import column_normalize as column_normalize
from optax_ext.primitives.orthogonalize import SHAPE_RULES as SHAPE_RULES
from optax_ext.primitives.orthogonalize import orthogonalize as orthogonalize
from optax_ext.primitives.orthogonalize import scale_by_shape as scale_by_shape
from optax_ext.primitives.projection import ProjectLowRankState as ProjectLowRankState
from optax_ext.primitives.projection import Projector as Projector
from optax_ext.primitives.projection import project_low_rank as project_low_rank
from optax_ext.primitives.resets import MomentumResetState as MomentumResetState
from optax_ext.primitives.resets import momentum_reset as momentum_reset
from optax_ext.primitives.spikes import ClipSpikesState as ClipSpikesState
from optax_ext.primitives.spikes import clip_spikes as clip_spikes
from optax_ext.primitives.weight_decay import (
    AddDecoupledWeightDecayState as AddDecoupledWeightDecayState,
)
from optax_ext.primitives.weight_decay import (
    add_decoupled_weight_decay as add_decoupled_weight_decay,
)

# Recipes: orthogonalized momentum (Muon family).
# Recipes: low-rank and rotated projections (GaLore family, Conda).
# Recipes: Shampoo-like preconditioners (SOAP, COSMOS).
# Recipes: Adam family, sign methods and schedules.
# Recipes: second order (Hessian estimates).
# State compression (block-wise quantized states).
# Communication compression and weight constraints.
from optax_ext.recipes.lipschitz_muon import layer_norms as layer_norms
from optax_ext.recipes.lipschitz_muon import lipschitz_bound as lipschitz_bound
from optax_ext.recipes.lipschitz_muon import lipschitz_muon as lipschitz_muon
from optax_ext.recipes.onebit_adam import onebit_adam as onebit_adam

__version__ = "0.1.0"
