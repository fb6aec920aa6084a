"""Validation of the inputs every encoder takes, at the model boundary, before any computation."""

from __future__ import annotations

import torch

from bertfast.ops import checks


def key_padding_mask(model: str, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                     position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Check the shapes of the model inputs; return ``attention_mask`` as (B, T) bool or None.

    ``attention_mask`` is transformers' (B, T) mask: 1/True = real token, 0/False = padding.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{model}: give exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        checks.tensor(model, "input_ids", input_ids, ndim=2, kind="int")
        lead, lead_name = input_ids, "input_ids"
    else:
        checks.tensor(model, "inputs_embeds", inputs_embeds, ndim=3, kind="float")
        lead, lead_name = inputs_embeds, "inputs_embeds"
    B, T = lead.shape[:2]
    if B == 0:
        raise ValueError(f"{model}: `{lead_name}` is an empty batch (shape {tuple(lead.shape)})")
    if T == 0:
        raise ValueError(f"{model}: `{lead_name}` has sequence length 0")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is not None:
            checks.tensor(model, name, t, ndim=2, kind="int")
            if t.shape[1] != T or t.shape[0] not in (1, B):
                raise ValueError(f"{model}: `{name}` must have shape ({B}, {T}) or (1, {T}), got {tuple(t.shape)}")
            checks.same_device(model, name, t, lead_name, lead)
    if attention_mask is None:
        return None
    checks.tensor(model, "attention_mask", attention_mask, kind="int_or_bool")
    checks.shape(model, "attention_mask", attention_mask, (B, T), "(batch, seq_len)")
    checks.same_device(model, "attention_mask", attention_mask, lead_name, lead)
    return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask


def labels(model: str, name: str, t: torch.Tensor | None, input_ids: torch.Tensor | None,
           inputs_embeds: torch.Tensor | None, per_token: bool, classes: int, ignore_index: int | None = None,
           kind: str = "int") -> None:
    """A label tensor: (B, T) per token or (B,) per sequence, values in [0, classes) or
    ``ignore_index``; checked before the encoder runs, naming the model's argument."""
    lead = input_ids if input_ids is not None else inputs_embeds
    if t is None or lead is None:
        return
    checks.tensor(model, name, t, kind=kind)
    if per_token:
        checks.shape(model, name, t, tuple(lead.shape[:2]), "(batch, seq_len)")
    else:
        checks.shape(model, name, t, (lead.shape[0],), "(batch,)")
    checks.same_device(model, name, t, "input_ids" if input_ids is not None else "inputs_embeds", lead)
    if t.dtype != torch.bool:
        checks.index_range(model, name, t, classes, f"labels must be class ids below {classes}", allow=ignore_index)
