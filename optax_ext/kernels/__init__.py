"""Pure array -> array math: Newton-Schulz, polar factors, projections, norms, matrix views,
block-wise quantization, spectral caps and
1-bit compressed all-reduce.

Kernels know nothing about optax or state; every one is jit-safe and batched over leading axes.
"""

from optax_ext.kernels.communication import collective_traffic as collective_traffic
from optax_ext.kernels.communication import compressed_allreduce as compressed_allreduce
from optax_ext.kernels.communication import pack_signs as pack_signs
from optax_ext.kernels.communication import padded_size as padded_size
from optax_ext.kernels.communication import unpack_signs as unpack_signs
from optax_ext.kernels.hessian import gauss_newton_bartlett as gauss_newton_bartlett
from optax_ext.kernels.hessian import hessian_vector_product as hessian_vector_product
from optax_ext.kernels.hessian import hutchinson as hutchinson
from optax_ext.kernels.hessian import random_probe as random_probe
from optax_ext.kernels.hessian import spatial_average as spatial_average
from optax_ext.kernels.matricize import batch_shape as batch_shape
from optax_ext.kernels.matricize import bucket_apply as bucket_apply
from optax_ext.kernels.matricize import matricize as matricize
from optax_ext.kernels.matricize import matrix_shape as matrix_shape
from optax_ext.kernels.matricize import unmatricize as unmatricize
from optax_ext.kernels.newton_schulz import HARD_CAP_COEFFS as HARD_CAP_COEFFS
from optax_ext.kernels.newton_schulz import LIPSCHITZ_ORTHO_COEFFS as LIPSCHITZ_ORTHO_COEFFS
from optax_ext.kernels.newton_schulz import MUON_BAND as MUON_BAND
from optax_ext.kernels.newton_schulz import MUON_COEFFS as MUON_COEFFS
from optax_ext.kernels.newton_schulz import POLAR_EXPRESS_BAND as POLAR_EXPRESS_BAND
from optax_ext.kernels.newton_schulz import POLAR_EXPRESS_COEFFS as POLAR_EXPRESS_COEFFS
from optax_ext.kernels.newton_schulz import ROOT_COEFFS as ROOT_COEFFS
from optax_ext.kernels.newton_schulz import NewtonSchulz as NewtonSchulz
from optax_ext.kernels.newton_schulz import PolarSVD as PolarSVD
from optax_ext.kernels.newton_schulz import ShapeCoeffs as ShapeCoeffs
from optax_ext.kernels.newton_schulz import newton_schulz as newton_schulz
from optax_ext.kernels.newton_schulz import polar_svd as polar_svd
from optax_ext.kernels.norms import frobenius_norm as frobenius_norm
from optax_ext.kernels.norms import mean_square as mean_square
from optax_ext.kernels.norms import rms as rms
from optax_ext.kernels.norms import vector_norm as vector_norm
from optax_ext.kernels.projections import FAN_IN as FAN_IN
from optax_ext.kernels.projections import FAN_OUT as FAN_OUT
from optax_ext.kernels.projections import RandomProjector as RandomProjector
from optax_ext.kernels.projections import SVDProjector as SVDProjector
from optax_ext.kernels.projections import project as project
from optax_ext.kernels.projections import project_back as project_back
from optax_ext.kernels.projections import projected_axis as projected_axis
from optax_ext.kernels.projections import random_basis as random_basis
from optax_ext.kernels.projections import svd_basis as svd_basis
from optax_ext.kernels.quantize import BlockQuantizer as BlockQuantizer
from optax_ext.kernels.quantize import dequantize_blockwise as dequantize_blockwise
from optax_ext.kernels.quantize import dynamic_map as dynamic_map
from optax_ext.kernels.quantize import quantize_blockwise as quantize_blockwise
from optax_ext.kernels.spectral import LIPSCHITZ_ORTHO as LIPSCHITZ_ORTHO
from optax_ext.kernels.spectral import lipschitz_orthogonalize as lipschitz_orthogonalize
from optax_ext.kernels.spectral import power_iteration as power_iteration
from optax_ext.kernels.spectral import rms_cap as rms_cap
from optax_ext.kernels.spectral import soft_cap_coupling as soft_cap_coupling
from optax_ext.kernels.spectral import spectral_hammer as spectral_hammer
from optax_ext.kernels.spectral import spectral_hard_cap as spectral_hard_cap
from optax_ext.kernels.spectral import spectral_normalize as spectral_normalize
from optax_ext.kernels.spectral import spectral_soft_cap as spectral_soft_cap
from optax_ext.kernels.spectral import spectral_weight_decay as spectral_weight_decay
from optax_ext.kernels.spectral import svd_cap as svd_cap
