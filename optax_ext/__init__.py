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
# isort: split
from optax_ext.kernels.quantize import BlockQuantizer as BlockQuantizer
from optax_ext.memory import state_nbytes as state_nbytes
from optax_ext.primitives.quantized import QuantizedArray as QuantizedArray
from optax_ext.primitives.quantized import QuantizeStateState as QuantizeStateState
from optax_ext.primitives.quantized import quantize_state as quantize_state
from optax_ext.recipes.bnb8bit import adam_8bit as adam_8bit
from optax_ext.recipes.bnb8bit import adamw_8bit as adamw_8bit
from optax_ext.recipes.bnb8bit import lion_8bit as lion_8bit

# Communication compression and weight constraints.

__version__ = "0.1.0"
