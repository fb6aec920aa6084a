"""Drop-in ``torch.nn`` modules on bertfast ops: same constructor arguments, parameter names and
state_dict keys as the modules they replace; the backend that runs is chosen by the ops."""

from bertfast.nn.embeddings import Embeddings
from bertfast.nn.layer_norm import LayerNorm
from bertfast.nn.linear_gelu import LinearGELU
from bertfast.nn.self_attention import SelfAttention
from bertfast.nn.unpadding import Packing

__all__ = ["Embeddings", "LayerNorm", "LinearGELU", "Packing", "SelfAttention"]
