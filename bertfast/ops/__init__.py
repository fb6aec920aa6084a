"""Functional ops, one per file, each with a torch reference backend and dispatch to GPU kernels.

Every op validates its arguments (errors name the argument) before any backend runs, then picks a
backend by declared capability: see ``bertfast.ops.dispatch``.
"""

import sys

from bertfast.ops.attention import attention
from bertfast.ops.bias_gelu import bias_gelu
from bertfast.ops.dispatch import BackendUnavailableError, record_backends, use_backend
from bertfast.ops.embedding import embedding
from bertfast.ops.generator_sample import generator_sample
from bertfast.ops.layer_norm import layer_norm
from bertfast.ops.linear_gelu import linear_gelu
from bertfast.ops.mask_tokens import mask_tokens
from bertfast.ops.mlm_loss import mlm_loss
from bertfast.ops.rtd_loss import rtd_loss
from bertfast.ops.sample_tokens import sample_tokens
from bertfast.ops.sentence_pair_loss import sentence_pair_loss

_OP_MODULES = ("attention", "layer_norm", "bias_gelu", "linear_gelu", "embedding", "mlm_loss", "sentence_pair_loss",
               "rtd_loss", "sample_tokens", "generator_sample", "mask_tokens")
# name -> dispatch.Op, for `bertfast info` and the tests that walk every op. (The functions above
# shadow their modules' names in this package, hence sys.modules.)
ALL_OPS = {name: sys.modules[f"bertfast.ops.{name}"].OP for name in _OP_MODULES}

__all__ = [
    "attention", "layer_norm", "bias_gelu", "linear_gelu", "embedding", "mlm_loss", "sentence_pair_loss", "rtd_loss",
    "sample_tokens", "generator_sample", "mask_tokens", "use_backend", "record_backends", "BackendUnavailableError", "ALL_OPS",
]
