"""flax.nnx decoder-only language models (GPT-2 and LLaMA style) for optimizer experiments.

The models know nothing about optimizers (no optax, no optax_ext). Build one with
``make_model("llama-tiny")`` or ``Transformer(ModelConfig.preset(...), rngs=nnx.Rngs(0))``;
for a jitted train step use the functional view ``split_model`` / ``apply`` / ``loss_fn``.

Parameter paths (attribute names, stable so label rules can key on them; ``i`` is the layer)::

    wte/embedding                     [V, D]   token embedding (also the head when tied)
    wpe/embedding                     [T, D]   learned positions (gpt2 only)
    blocks/i/ln_1/{scale,bias}        [D]      pre-attention norm (RMSNorm has no bias)
    blocks/i/attn/q_proj/kernel       [D, H*Dh]
    blocks/i/attn/k_proj/kernel       [D, K*Dh]  (K = n_kv_head)
    blocks/i/attn/v_proj/kernel       [D, K*Dh]
    blocks/i/attn/o_proj/kernel       [H*Dh, D]
    blocks/i/attn/{q_norm,k_norm}/... [Dh]     QK-norm (only with qk_norm)
    blocks/i/ln_2/{scale,bias}        [D]
    blocks/i/mlp/{fc,proj}/kernel     [D, F], [F, D]            (gpt2, with biases)
    blocks/i/mlp/{gate,up,down}/kernel [D, F], [D, F], [F, D]   (llama, no biases)
    ln_f/{scale,bias}                 [D]      final norm
    lm_head/kernel                    [D, V]   output head (absent when tie_embeddings)

Every hidden kernel has shape ``(fan_in, fan_out)``; gpt2 projections also have a ``bias``.
With ``sigma_reparam`` each hidden linear also has a scalar Param ``gamma`` and a
:class:`SpectralState` ``u`` (not a Param: it lands in ``other``, never in ``params``).
"""

from models.config import PRESETS as PRESETS
from models.config import ModelConfig as ModelConfig
from models.functional import apply as apply
from models.functional import loss_fn as loss_fn
from models.functional import merge_model as merge_model
from models.functional import split_model as split_model
from models.gpt import MLP as MLP
from models.gpt import Attention as Attention
from models.gpt import Block as Block
from models.gpt import SwiGLU as SwiGLU
from models.gpt import Transformer as Transformer
from models.gpt import make_model as make_model
from models.layers import SigmaReparamLinear as SigmaReparamLinear
from models.layers import SpectralState as SpectralState
from models.layers import apply_rope as apply_rope
from models.layers import power_iteration_step as power_iteration_step
from models.layers import shrink_gradient as shrink_gradient
from models.layers import softcap as softcap
from models.losses import lm_loss as lm_loss
from models.losses import log_stablemax as log_stablemax
