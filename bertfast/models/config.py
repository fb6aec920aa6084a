"""Config dataclasses of the four encoders, with the field names of the transformers configs.

Field names equal transformers' so that conversion is a field-by-field copy; ``from_hf`` refuses
settings bertfast does not implement (decoder mode, cross attention, relative positions, other
activations) instead of silently ignoring them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

from bertfast.ops.bias_gelu import approximate_of


@dataclass
class EncoderConfig:
    """Fields shared by BERT, RoBERTa, ALBERT and ELECTRA (defaults: BERT-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    HF_MODEL_TYPE = "bert"  # transformers' model_type this config converts to

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"num_attention_heads: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads} (head_dim must be an integer)")
        approximate_of(self.hidden_act, "hidden_act")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id: {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps: must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        """Width of the embedding tables (E): hidden_size unless the model factorizes them."""
        return getattr(self, "embedding_size", self.hidden_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} for {cls.__name__}")
        return cls(**d)

    # --- transformers conversion -------------------------------------------------------------
    def hf_kwargs(self) -> dict:
        """The fields as transformers config keyword arguments."""
        return self.to_dict()

    def to_hf(self):
        """The equivalent ``transformers`` config (needs the ``[hf]`` extra)."""
        import transformers

        cfg = transformers.AutoConfig.for_model(self.HF_MODEL_TYPE, **self.hf_kwargs())
        return cfg

    @classmethod
    def from_hf(cls, hf_config):
        """Build from a transformers config; refuses what bertfast does not implement."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type != cls.HF_MODEL_TYPE:
            raise ValueError(f"hf_config: {cls.__name__} converts model_type {cls.HF_MODEL_TYPE!r}, got {model_type!r}")
        if getattr(hf_config, "is_decoder", False):
            raise ValueError("hf_config: is_decoder=True (causal decoder mode) is not supported by bertfast encoders")
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("hf_config: add_cross_attention=True is not supported by bertfast encoders")
        position_type = getattr(hf_config, "position_embedding_type", "absolute")
        if position_type not in (None, "absolute"):
            raise ValueError(f"hf_config: position_embedding_type={position_type!r}; bertfast implements 'absolute'")
        values = {}
        for f in fields(cls):
            if hasattr(hf_config, f.name):
                values[f.name] = getattr(hf_config, f.name)
        if values.get("pad_token_id") is None:
            raise ValueError("hf_config: pad_token_id is None; bertfast needs a padding token id")
        return cls(**values)
