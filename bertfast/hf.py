"""Hugging Face interop: convert transformers models to bertfast models and back, strictly.

bertfast models have transformers' module names, so a state_dict maps key for key. Conversion is
strict: every key and shape must match, tied parameters must hold equal values on the side that
stores them twice, and unsupported classes or settings are refused with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from bertfast import models

# transformers class name -> (bertfast class, whether its constructor takes add_pooling_layer)
SUPPORTED = {
    "BertModel": (models.BertModel, True),
    "BertForPreTraining": (models.BertForPreTraining, False),
    "AlbertModel": (models.AlbertModel, True),
    "AlbertForPreTraining": (models.AlbertForPreTraining, False),
    "AlbertForMaskedLM": (models.AlbertForMaskedLM, False),
    "RobertaModel": (models.RobertaModel, True),
    "RobertaForMaskedLM": (models.RobertaForMaskedLM, False),
    "ElectraModel": (models.ElectraModel, False),
    "ElectraForPreTraining": (models.ElectraForPreTraining, False),
    "ElectraForMaskedLM": (models.ElectraForMaskedLM, False),
}
_CONFIGS = {
    "bert": models.BertConfig,
    "albert": models.AlbertConfig,
    "roberta": models.RobertaConfig,
    "electra": models.ElectraConfig,
}


def _supported_list() -> str:
    return ", ".join(SUPPORTED)


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names under which one parameter appears more than once in ``state_dict`` (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _load_strict(target: nn.Module, state: dict[str, torch.Tensor], source_name: str, arg: str) -> None:
    """Load ``state`` into ``target``: same keys, same shapes, tied entries equal."""
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{arg}: state_dict of {source_name} does not map key for key; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{arg}: `{key}` has shape {tuple(state[key].shape)} in {source_name}, "
                             f"expected {tuple(value.shape)}")
    for names in _tied_groups(target):
        first = state[names[0]]
        for other in names[1:]:
            if not torch.equal(state[other], first):
                raise ValueError(f"{arg}: `{other}` and `{names[0]}` are tied in the target but hold different "
                                 f"values in {source_name}; untie them in the config (tie_word_embeddings=False)")
    target.load_state_dict(state, strict=True)


def _dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters())
    return p.dtype, p.device


def from_hf(hf_model: nn.Module) -> nn.Module:
    """A bertfast model with the same architecture and weights as ``hf_model``.

    Supported: BertModel, BertForPreTraining, AlbertModel, AlbertForPreTraining, AlbertForMaskedLM,
    RobertaModel, RobertaForMaskedLM, ElectraModel, ElectraForPreTraining, ElectraForMaskedLM.
    The result has the dtype, device and train/eval mode of ``hf_model``.
    """
    name = type(hf_model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"hf_model: {name} is not supported; supported: {_supported_list()}")
    cls, takes_pooler = SUPPORTED[name]
    hf_config = hf_model.config
    config_cls = _CONFIGS[hf_config.model_type]
    config = config_cls.from_hf(hf_config)
    if takes_pooler:
        model = cls(config, add_pooling_layer=getattr(hf_model, "pooler", None) is not None)
    else:
        model = cls(config)
    dtype, device = _dtype_device(hf_model)
    model.to(dtype=dtype, device=device)
    _load_strict(model, hf_model.state_dict(), name, "hf_model")
    return model.train(hf_model.training)


def to_hf(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """The transformers model with the same architecture and weights as a bertfast ``model``.

    ``attn_implementation`` ("eager", "sdpa", ...) is passed to transformers; None = its default.
    """
    import transformers

    name = type(model).__name__
    if name not in SUPPORTED or type(model) is not SUPPORTED[name][0]:
        raise TypeError(f"model: {name} has no transformers counterpart; supported: {_supported_list()}")
    _, takes_pooler = SUPPORTED[name]
    hf_config = model.config.to_hf()
    kwargs = {}
    if takes_pooler:
        kwargs["add_pooling_layer"] = model.pooler is not None
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    hf_model = getattr(transformers, name)._from_config(hf_config, **kwargs)
    dtype, device = _dtype_device(model)
    hf_model.to(dtype=dtype, device=device)
    _load_strict(hf_model, model.state_dict(), name, "model")
    return hf_model.train(model.training)
