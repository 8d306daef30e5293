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

# Primitives.
from optax_ext.primitives.elementwise import ScaleByAdaBeliefState as ScaleByAdaBeliefState
from optax_ext.primitives.elementwise import ScaleByExAdamState as ScaleByExAdamState
from optax_ext.primitives.elementwise import ScaleByLionState as ScaleByLionState
from optax_ext.primitives.elementwise import ScaleBySGDSaIState as ScaleBySGDSaIState
from optax_ext.primitives.elementwise import scale_by_adabelief as scale_by_adabelief
from optax_ext.primitives.elementwise import scale_by_exadam as scale_by_exadam
from optax_ext.primitives.elementwise import scale_by_lion as scale_by_lion
from optax_ext.primitives.elementwise import scale_by_sgd_sai as scale_by_sgd_sai
from optax_ext.primitives.hessian import ScaleByAdaHessianState as ScaleByAdaHessianState
from optax_ext.primitives.hessian import ScaleBySophiaState as ScaleBySophiaState
from optax_ext.primitives.hessian import scale_by_adahessian as scale_by_adahessian
from optax_ext.primitives.hessian import scale_by_sophia as scale_by_sophia
from optax_ext.primitives.moments import MomentumState as MomentumState
from optax_ext.primitives.moments import ScaleByAdamState as ScaleByAdamState
from optax_ext.primitives.moments import ScaleByBiasCorrectionState as ScaleByBiasCorrectionState
from optax_ext.primitives.moments import momentum as momentum
from optax_ext.primitives.moments import scale_by_adam as scale_by_adam
from optax_ext.primitives.moments import scale_by_bias_correction as scale_by_bias_correction
from optax_ext.primitives.normalize import ColumnNormalizeState as ColumnNormalizeState
from optax_ext.primitives.normalize import NormGrowthLimiterState as NormGrowthLimiterState
from optax_ext.primitives.normalize import ScaleByNeuronNormState as ScaleByNeuronNormState
from optax_ext.primitives.normalize import column_normalize as column_normalize
from optax_ext.primitives.normalize import norm_growth_limiter as norm_growth_limiter
from optax_ext.primitives.normalize import scale_by_cosh_rms as scale_by_cosh_rms
from optax_ext.primitives.normalize import scale_by_neuron_norm as scale_by_neuron_norm
from optax_ext.primitives.orthogonalize import SHAPE_RULES as SHAPE_RULES
from optax_ext.primitives.orthogonalize import orthogonalize as orthogonalize
from optax_ext.primitives.orthogonalize import scale_by_shape as scale_by_shape
from optax_ext.primitives.preconditioners import OnlinePCA as OnlinePCA
from optax_ext.primitives.preconditioners import ScaleByCosmosAdamState as ScaleByCosmosAdamState
from optax_ext.primitives.preconditioners import ScaleByCosmosState as ScaleByCosmosState
from optax_ext.primitives.preconditioners import ScaleBySoapState as ScaleBySoapState
from optax_ext.primitives.preconditioners import SoapLayout as SoapLayout
from optax_ext.primitives.preconditioners import scale_by_cosmos as scale_by_cosmos
from optax_ext.primitives.preconditioners import scale_by_cosmos_adam as scale_by_cosmos_adam
from optax_ext.primitives.preconditioners import scale_by_soap as scale_by_soap
from optax_ext.primitives.projection import ProjectLowRankState as ProjectLowRankState
from optax_ext.primitives.projection import Projector as Projector
from optax_ext.primitives.projection import ScaledResidual as ScaledResidual
from optax_ext.primitives.projection import project_low_rank as project_low_rank
from optax_ext.primitives.projection import (
    scale_by_projected_norm_ratio as scale_by_projected_norm_ratio,
)
from optax_ext.primitives.radial import ProjectOutRadialState as ProjectOutRadialState
from optax_ext.primitives.radial import project_out_parallel as project_out_parallel
from optax_ext.primitives.radial import project_out_radial as project_out_radial
from optax_ext.primitives.resets import MomentumResetState as MomentumResetState
from optax_ext.primitives.resets import ScaleByResetWarmupState as ScaleByResetWarmupState
from optax_ext.primitives.resets import momentum_reset as momentum_reset
from optax_ext.primitives.resets import scale_by_reset_warmup as scale_by_reset_warmup
from optax_ext.primitives.spikes import ClipSpikesState as ClipSpikesState
from optax_ext.primitives.spikes import ScaleByStableSpamState as ScaleByStableSpamState
from optax_ext.primitives.spikes import clip_by_quantile as clip_by_quantile
from optax_ext.primitives.spikes import clip_spikes as clip_spikes
from optax_ext.primitives.spikes import scale_by_stable_spam as scale_by_stable_spam
from optax_ext.primitives.weight_decay import (
    AddDecoupledWeightDecayState as AddDecoupledWeightDecayState,
)
from optax_ext.primitives.weight_decay import (
    add_decoupled_weight_decay as add_decoupled_weight_decay,
)

# Recipes: Adam family, sign methods and schedules.
from optax_ext.recipes.adabelief import adabelief as adabelief
from optax_ext.recipes.adamp import adamp as adamp
from optax_ext.recipes.adamp import perp_adamw as perp_adamw
from optax_ext.recipes.adamp import sgdp as sgdp

# Recipes: low-rank and rotated projections (GaLore family, Conda).
from optax_ext.recipes.apollo import apollo as apollo
from optax_ext.recipes.apollo import apollo_mini as apollo_mini
from optax_ext.recipes.apollo import scale_by_apollo as scale_by_apollo

# Recipes: orthogonalized momentum (Muon family).
from optax_ext.recipes.auon import auon as auon
from optax_ext.recipes.auon import hybrid_auon as hybrid_auon
from optax_ext.recipes.auon import scale_by_auon as scale_by_auon
from optax_ext.recipes.conda import conda as conda

# Recipes: Shampoo-like preconditioners (SOAP, COSMOS).
from optax_ext.recipes.cosmos import cosmos as cosmos
from optax_ext.recipes.exadam import exadam as exadam
from optax_ext.recipes.exadam import exadam_v1_schedule as exadam_v1_schedule
from optax_ext.recipes.exadam import sgd_sai as sgd_sai
from optax_ext.recipes.galore import fira as fira
from optax_ext.recipes.galore import galore as galore
from optax_ext.recipes.galore import scale_by_galore as scale_by_galore
from optax_ext.recipes.lion import lion as lion
from optax_ext.recipes.lion import lion_k as lion_k
from optax_ext.recipes.muon import muon as muon
from optax_ext.recipes.muon import scale_by_muon as scale_by_muon
from optax_ext.recipes.normuon import normuon as normuon
from optax_ext.recipes.root import root as root
from optax_ext.recipes.schedules import rex_schedule as rex_schedule
from optax_ext.recipes.soap import soap as soap

# Recipes: second order (Hessian estimates).
from optax_ext.recipes.sophia import adahessian as adahessian
from optax_ext.recipes.sophia import sophia as sophia
from optax_ext.recipes.spam import spam as spam
from optax_ext.recipes.spam import stable_spam as stable_spam

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
from optax_ext.recipes.lipschitz_muon import layer_norms as layer_norms
from optax_ext.recipes.lipschitz_muon import lipschitz_bound as lipschitz_bound
from optax_ext.recipes.lipschitz_muon import lipschitz_muon as lipschitz_muon
from optax_ext.recipes.onebit_adam import onebit_adam as onebit_adam

__version__ = "0.1.0"
