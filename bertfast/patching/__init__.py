"""``bertfast.patch(model)``: run an existing transformers or ``torch.nn`` encoder on bertfast ops,
in place, and ``bertfast.unpatch(model)`` to undo it.

    report = bertfast.patch(hf_model)      # e.g. a transformers BertForPreTraining
    print(report)                          # what was swapped, what was left and why
    ...                                    # train / compile / save as before
    bertfast.unpatch(hf_model)             # the original classes, bit-identical behaviour

Recognized (by structure: attribute and parameter names, shapes, activations, and transformers' or
torch's own forward, never by class name alone):

- transformers BERT-family base models (BERT, RoBERTa, ELECTRA, ALBERT and models built like them):
  ``hf_encoder``; their pretraining / MLM models: ``hf_heads``; in any other model containing one
  (``*ForSequenceClassification``, a user's module) the base model is patched and the rest left.
- ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``, other ``nn.LayerNorm``: ``torch_modules``.

A model bertfast cannot run exactly (relative positions, cross-attention, a decoder, an unknown
attention variant, a user-overridden forward) is left untouched as a whole, with the reason in the
report: nothing inside it is swapped. Patching swaps classes only (``core``), so the parameters,
buffers and ``state_dict`` are the same objects before, during and after.
"""

from __future__ import annotations

from torch import nn

from bertfast.patching import core, hf_heads, hf_structure, torch_modules
from bertfast.patching.hf_encoder import encoder_model_forward
from bertfast.patching.report import Left, PatchReport, Swapped

__all__ = ["PatchReport", "is_patched", "patch", "unpatch"]

is_patched = core.is_patched


def _encoder_summary(model: nn.Module, plan: hf_structure.EncoderPlan) -> str:
    if plan.kind == "albert":
        layers = f"{model.config.num_hidden_layers} shared-layer steps through the one-node layer loop"
    else:
        layers = f"{len(model.encoder.layer)} layers"
    projection = " with the E->H projection" if plan.projection else ""
    return (f"fused embeddings{projection}; {layers} (QKV GEMM + fused attention, bias+GELU, "
            f"dropout+residual+LayerNorm)")


_HEAD_WHAT = {
    "bert_pretraining": "MLM loss fused at labelled positions + NSP loss",
    "bert_mlm": "MLM loss fused at labelled positions",
    "albert_pretraining": "MLM loss fused at labelled positions + SOP loss",
    "albert_mlm": "MLM loss fused at labelled positions",
    "roberta_mlm": "MLM loss fused at labelled positions",
    "electra_mlm": "generator MLM loss fused at labelled positions",
    "electra_pretraining": "fused replaced-token-detection head and loss",
}


def _subtree(module: nn.Module) -> set[int]:
    return {id(m) for m in module.modules()}


def patch(model: nn.Module, *, unpad: bool | None = None, keep_logits: bool = False) -> PatchReport:
    """Swap, in place, what bertfast accelerates inside ``model``; returns the report.

    Args:
        model: any ``nn.Module`` (also a transformers model or an ``nn.TransformerEncoder``).
        unpad: transformers encoders: None = run CUDA batches with padding unpadded (varlen
            attention), True / False = always / never.
        keep_logits: pretraining / MLM models: also compute the full prediction logits when the
            fused MLM loss is computed (by default they are None then: the point of the fused loss).

    Idempotent: modules already patched are left as they are. Nothing is swapped until every
    recognized structure has been checked, so a refusal leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if unpad not in (None, True, False):
        raise ValueError(f"unpad: must be None, True or False, got {unpad!r}")
    if not isinstance(keep_logits, bool):
        raise TypeError(f"keep_logits: must be a bool, got {type(keep_logits).__name__}")
    report = PatchReport(type(model).__name__)
    claimed: set[int] = set()  # modules inside a swapped or refused structure
    swaps: list[tuple[nn.Module, object, object]] = []

    def left(path: str, module: nn.Module, reason: str) -> None:
        report.left.append(Left(path, type(module).__name__, reason))
        claimed.update(_subtree(module))

    def swapped(path: str, module: nn.Module, forward, plan, what: str) -> None:
        swaps.append((module, forward, plan))
        report.swapped.append(Swapped(path, type(module).__name__, what))

    for path, module in model.named_modules():
        if id(module) in claimed:
            continue
        if core.is_patched(module):
            claimed.update(_subtree(module))
            continue
        try:
            if hf_structure.is_encoder_model(module):
                _claim_encoder(path, module, unpad, swapped)
                claimed.update(_subtree(module))
            elif (kind := hf_heads.head_kind(module)) is not None and getattr(module, "config", None) is not None:
                _claim_head(path, module, kind, unpad, keep_logits, swapped)
                claimed.update(_subtree(module))
            elif isinstance(module, nn.TransformerEncoder):
                _claim_torch_encoder(path, module, swapped)
                claimed.update(_subtree(module))
            elif isinstance(module, nn.TransformerEncoderLayer):
                _claim_torch_layer(path, module, swapped)
                claimed.update(_subtree(module))
            elif isinstance(module, nn.LayerNorm):
                _claim_layer_norm(path, module, swapped)
            elif isinstance(module, (nn.MultiheadAttention, nn.TransformerDecoderLayer)):
                left(path, module, "bertfast swaps attention only inside nn.TransformerEncoderLayer and transformers "
                     "encoders (this one may be cross- or causal attention)")
        except hf_structure.Refused as refusal:
            # drop what this structure queued: nothing inside it is half-replaced
            inside = _subtree(module)
            kept = [(m, f, p) for m, f, p in swaps if id(m) not in inside]
            dropped = len(swaps) - len(kept)
            swaps[:] = kept
            del report.swapped[len(report.swapped) - dropped:]
            left(path, module, str(refusal))
    for module, forward, plan in swaps:
        core.swap(module, forward, plan)
    return report


def _claim_encoder(path, module, unpad, swapped) -> None:
    plan = hf_structure.encoder_plan(module, unpad)
    swapped(path, module, encoder_model_forward, plan, _encoder_summary(module, plan))


def _claim_head(path, module, kind, unpad, keep_logits, swapped) -> None:
    bases = [(name, child) for name, child in module.named_children() if hf_structure.is_encoder_model(child)]
    if len(bases) != 1:
        raise hf_structure.Refused(f"expected one transformers encoder inside, found {len(bases)}")
    name, base = bases[0]
    already = core.is_patched(base)  # patched by an earlier call on the base model alone
    base_plan = core.plan_of(base) if already else hf_structure.encoder_plan(base, unpad)  # refused: all refused
    hidden = base.config.hidden_size
    plan = hf_heads.head_plan(module, kind, name, hidden, keep_logits)
    swapped(path, module, hf_heads.head_forward, plan, _HEAD_WHAT[kind])
    if not already:
        swapped(f"{path}.{name}" if path else name, base, encoder_model_forward, base_plan,
                _encoder_summary(base, base_plan))


def _claim_layer_norm(path, norm, swapped) -> None:
    if not core.defined_in_library(type(norm)):
        raise hf_structure.Refused(f"{type(norm).__name__}.forward is overridden")
    torch_modules.layer_norm_ok(norm)
    swapped(path, norm, torch_modules.layer_norm_forward, True, "LayerNorm op")


def _claim_torch_layer(path, layer, swapped) -> None:
    if not core.defined_in_library(type(layer)):
        raise hf_structure.Refused(f"{type(layer).__name__}.forward is overridden")
    plan = torch_modules.layer_plan(layer)
    fused = "fused GELU feed-forward" if plan.activation == "gelu" else f"{plan.activation} feed-forward"
    norm = "pre-norm" if layer.norm_first else "post-norm: dropout+residual+LayerNorm fused"
    swapped(path, layer, torch_modules.encoder_layer_forward, plan,
            f"in-projection GEMM + fused attention; {norm}; {fused}")


def _claim_torch_encoder(path, encoder, swapped) -> None:
    if not core.defined_in_library(type(encoder)):
        raise hf_structure.Refused(f"{type(encoder).__name__}.forward is overridden")
    for i, layer in enumerate(encoder.layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise hf_structure.Refused(f"layers.{i} is {type(layer).__name__}, not nn.TransformerEncoderLayer")
        if not core.is_patched(layer):  # (a layer patched by an earlier call stays as it is)
            _claim_torch_layer(f"{path}.layers.{i}" if path else f"layers.{i}", layer, swapped)
    if encoder.norm is not None and not core.is_patched(encoder.norm):
        if not isinstance(encoder.norm, nn.LayerNorm):
            raise hf_structure.Refused(f"norm is {type(encoder.norm).__name__}, not nn.LayerNorm")
        torch_modules.layer_norm_ok(encoder.norm)
        swapped(f"{path}.norm" if path else "norm", encoder.norm, torch_modules.layer_norm_forward, True,
                "LayerNorm op")
    swapped(path, encoder, torch_modules.encoder_forward, True, "runs the patched layers (no nested-tensor path)")


def unpatch(model: nn.Module) -> int:
    """Restore the original class of every patched module in ``model``; returns how many."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return sum(core.restore(m) for m in model.modules())
