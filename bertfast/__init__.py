"""bertfast: fast BERT-family encoders (BERT, ALBERT, RoBERTa, ELECTRA) for PyTorch.

    import bertfast
    model = bertfast.from_hf(hf_model)          # same weights, bertfast ops underneath
    with bertfast.use_backend("torch"): ...     # pick the backend (see bertfast.ops.dispatch)

Nothing here touches a GPU at import time.
"""

__version__ = "0.1.0"

from bertfast import models, nn, ops  # noqa: E402
from bertfast.ops.dispatch import record_backends, use_backend  # noqa: E402


def from_hf(hf_model):
    """The bertfast model equal to a transformers model (same weights); see ``bertfast.hf``."""
    from bertfast import hf

    return hf.from_hf(hf_model)


def to_hf(model, attn_implementation=None):
    """The transformers model equal to a bertfast model (same weights); see ``bertfast.hf``."""
    from bertfast import hf

    return hf.to_hf(model, attn_implementation=attn_implementation)


__all__ = ["__version__", "models", "nn", "ops", "use_backend", "record_backends", "from_hf", "to_hf"]
