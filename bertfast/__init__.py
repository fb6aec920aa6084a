"""bertfast: fast BERT-family encoders (BERT, ALBERT, RoBERTa, ELECTRA) for PyTorch.

    import bertfast
    model = bertfast.from_hf(hf_model)          # same weights, bertfast ops underneath
    with bertfast.use_backend("torch"): ...     # pick the backend (see bertfast.ops.dispatch)
    report = bertfast.patch(model)              # swap bertfast ops into an existing model, in place

Nothing here touches a GPU at import time.
"""

__version__ = "0.1.0"

from bertfast import models, nn, ops  # noqa: E402
from bertfast.ops.dispatch import record_backends, use_backend  # noqa: E402
from bertfast.patching import PatchReport, is_patched, patch, unpatch  # noqa: E402


def from_hf(hf_model):
    """The bertfast model equal to a transformers model (same weights); see ``bertfast.hf``."""
    from bertfast import hf

    return hf.from_hf(hf_model)


def to_hf(model, attn_implementation=None):
    """The transformers model equal to a bertfast model (same weights); see ``bertfast.hf``."""
    from bertfast import hf

    return hf.to_hf(model, attn_implementation=attn_implementation)


def register_hf_attention(name="bertfast"):
    """Make ``attn_implementation=name`` in transformers run ``bertfast.ops.attention``; see
    ``bertfast.hf_attention``."""
    from bertfast import hf_attention

    hf_attention.register(name)


__all__ = ["PatchReport", "__version__", "from_hf", "is_patched", "models", "nn", "ops", "patch", "record_backends",
           "register_hf_attention", "to_hf", "unpatch", "use_backend"]
