"""What each model pretrains with: its sizes, its objective, its data, and how a batch becomes losses.

| model   | data                                   | masking                     | losses                         |
|---------|----------------------------------------|-----------------------------|--------------------------------|
| bert    | sentence pairs, random next (NSP)       | static, 10 duplicates        | MLM + NSP                      |
| albert  | sentence pairs, swapped order (SOP)     | static, n-gram spans (n <= 3)| MLM + SOP                      |
| roberta | full sentences across documents         | dynamic (fresh every epoch)  | MLM                            |
| electra | full sentences across documents         | dynamic                      | generator MLM + 50 x RTD       |
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bertfast import models

MODELS = ("bert", "albert", "roberta", "electra")
SIZES = ("tiny", "small", "base", "large")

# Encoder shapes per size. tiny trains on a 2-core CPU in minutes; small is ELECTRA-small's
# discriminator; base and large are the papers' sizes.
_SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# Factorized embedding width E: ALBERT's is 128 from base up; ELECTRA-small's is 128, larger ELECTRAs use H.
_EMBEDDING = {
    "albert": {"tiny": 64, "small": 128, "base": 128, "large": 128},
    "electra": {"tiny": 128, "small": 128, "base": 768, "large": 1024},
}
_CONFIG_CLASSES = {"bert": models.BertConfig, "albert": models.AlbertConfig, "roberta": models.RobertaConfig,
                   "electra": models.ElectraConfig}


@dataclass(frozen=True)
class Objective:
    """The data and masking of a model's pretraining."""

    pairs: str | None        # "nsp", "sop" or None (full-sentence blocks)
    masking: str             # "static" (fixed per example and duplicate) or "dynamic" (fresh every epoch)
    max_ngram: int           # 1 = per token; >= 2 = ALBERT's n-gram spans
    duplicates: int          # static masking: distinct masks (and sentence pairings) per example


OBJECTIVES = {
    "bert": Objective(pairs="nsp", masking="static", max_ngram=1, duplicates=10),
    "albert": Objective(pairs="sop", masking="static", max_ngram=3, duplicates=10),
    "roberta": Objective(pairs=None, masking="dynamic", max_ngram=1, duplicates=1),
    "electra": Objective(pairs=None, masking="dynamic", max_ngram=1, duplicates=1),
}


def check_model(model: str, size: str | None = None) -> None:
    if model not in MODELS:
        raise ValueError(f"--model: must be one of {', '.join(MODELS)}, got {model!r}")
    if size is not None and size not in SIZES:
        raise ValueError(f"--size: must be one of {', '.join(SIZES)}, got {size!r}")


def config_class(model: str) -> type:
    check_model(model)
    return _CONFIG_CLASSES[model]


def model_config(model: str, size: str, *, vocab_size: int, pad_token_id: int, seq_len: int,
                 overrides: dict | None = None):
    """The encoder config (the discriminator's for ELECTRA) for a model and size.

    The vocabulary and padding id come from the tokenizer; the position table holds ``seq_len``
    tokens (RoBERTa's positions start after ``pad_token_id``). ``overrides`` (from ``--config``)
    replace any field, by transformers' field names.
    """
    check_model(model, size)
    cls = _CONFIG_CLASSES[model]
    fields = dict(_SHAPES[size], vocab_size=vocab_size, pad_token_id=pad_token_id,
                  max_position_embeddings=max(512, seq_len) + (pad_token_id + 1 if model == "roberta" else 0))
    if model in _EMBEDDING:
        fields["embedding_size"] = _EMBEDDING[model][size]
    if model == "albert":
        fields["hidden_act"] = "gelu_new"
    for key, value in (overrides or {}).items():
        if key in ("vocab_size", "pad_token_id") and value != fields[key]:
            raise ValueError(f"--config: {key}={value} contradicts the tokenizer's {fields[key]}; leave it out")
        fields[key] = value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--config: unknown fields {unknown} for {cls.__name__}")
    config = cls(**fields)
    needed = seq_len + (pad_token_id + 1 if model == "roberta" else 0)
    if config.max_position_embeddings < needed:
        raise ValueError(f"--seq-len: {seq_len} tokens need max_position_embeddings >= {needed}, the config has "
                         f"{config.max_position_embeddings}")
    return config


def read_overrides(path: str | None) -> dict:
    """``--config file.json``: a JSON object of config fields; ELECTRA may add ``generator_fraction``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a JSON object of config fields, got {type(data).__name__}")
    return data


def build_model(model: str, config, *, generator_fraction: float = 1 / 3, rtd_weight: float = 50.0) -> nn.Module:
    """The pretraining model: BertForPreTraining, AlbertForPreTraining, RobertaForMaskedLM or
    ElectraPretrainingModel (generator ``generator_fraction`` as wide, shared token embeddings)."""
    check_model(model)
    if model == "bert":
        return models.BertForPreTraining(config)
    if model == "albert":
        return models.AlbertForPreTraining(config)
    if model == "roberta":
        return models.RobertaForMaskedLM(config)
    generator = models.make_generator_config(config, generator_fraction)
    return models.ElectraPretrainingModel(config, generator, rtd_weight=rtd_weight)


def loss_parts(model_name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-part mean losses of one batch: {"mlm_loss", "nsp_loss" | "sop_loss" | "rtd_loss"}.

    ``model`` may be wrapped (DDP); ``batch`` holds input_ids, attention_mask, labels and, for
    sentence pairs, token_type_ids and pair_labels.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if model_name == "bert":
        out = model(ids, mask, batch["token_type_ids"], labels=labels, next_sentence_label=batch["pair_labels"])
        return {"mlm_loss": out.mlm_loss, "nsp_loss": out.nsp_loss}
    if model_name == "albert":
        out = model(ids, mask, batch["token_type_ids"], labels=labels, sentence_order_label=batch["pair_labels"])
        return {"mlm_loss": out.mlm_loss, "sop_loss": out.sop_loss}
    if model_name == "roberta":
        return {"mlm_loss": model(ids, mask, labels=labels).loss}
    out = model(ids, labels, mask)
    return {"mlm_loss": out.mlm_loss, "rtd_loss": out.rtd_loss}


def parts_of(model_name: str) -> tuple[str, ...]:
    """The loss parts a model's objective has, in logging order."""
    check_model(model_name)
    objective = OBJECTIVES[model_name]
    if model_name == "electra":
        return ("mlm_loss", "rtd_loss")
    return ("mlm_loss",) + ((f"{objective.pairs}_loss",) if objective.pairs else ())


def part_weights(model_name: str, rtd_weight: float = 50.0) -> dict[str, float]:
    """How the parts add up to the loss that is minimized (ELECTRA: MLM + rtd_weight x RTD)."""
    return {p: rtd_weight if p == "rtd_loss" else 1.0 for p in parts_of(model_name)}


def part_counts(batch: dict[str, torch.Tensor], parts: tuple[str, ...]) -> torch.Tensor:
    """(len(parts) + 1,) float64: what each part's mean is over (labelled tokens for MLM, rows for
    NSP/SOP, real tokens for RTD), then the batch's real tokens."""
    tokens = batch["attention_mask"].sum().double()
    per_part = {"mlm_loss": (batch["labels"] != -100).sum().double(), "rtd_loss": tokens,
                "nsp_loss": torch.tensor(float(batch["input_ids"].shape[0]), dtype=torch.float64)}
    per_part["sop_loss"] = per_part["nsp_loss"]
    return torch.stack([per_part[p] for p in parts] + [tokens])


def hf_parts(model_name: str, model: nn.Module) -> dict[str, nn.Module]:
    """The bertfast models to export as transformers ones: "" = the folder itself, "generator" = a
    subfolder (ELECTRA's generator)."""
    if model_name == "electra":
        return {"": model.discriminator, "generator": model.generator}
    return {"": model}
