"""The post-LayerNorm transformer layer shared by BERT, RoBERTa and ELECTRA, and the pieces all
four encoders share (pooler, MLM head math, weight init). Module and attribute names follow
transformers' ``modeling_bert.py`` so that state_dict keys are identical."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertfast import ops
from bertfast.models import inputs
from bertfast.models.config import EncoderConfig
from bertfast.models.outputs import MaskedLMOutput
from bertfast.nn import LayerNorm, LinearGELU, Packing, SelfAttention
from bertfast.ops.bias_gelu import approximate_of


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): transformers' BertSelfOutput / BertOutput."""

    def __init__(self, in_features: int, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p if self.training else 0.0
        return self.LayerNorm(self.dense(hidden_states), residual=input_tensor, dropout_p=p)


class Attention(nn.Module):
    """``self`` (Q, K, V, attention) + ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob)
        self.output = ResidualOutput(config.hidden_size, config)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        return self.output(self.self(hidden_states, key_padding_mask), hidden_states)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = LinearGELU(config.hidden_size, config.intermediate_size,
                                approximate=approximate_of(config.hidden_act))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class TransformerLayer(nn.Module):
    """Post-LN layer: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.intermediate_size, config)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        attention_output = self.attention(hidden_states, key_padding_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, key_padding_mask)
        return hidden_states


def wants_unpadding(unpad: bool | None, key_padding_mask: torch.Tensor | None, hidden: torch.Tensor) -> bool:
    """``unpad`` True/False forces the choice; None (the default) unpads CUDA batches (``encode``
    then runs a batch without padding padded). Never while torch.compile traces: the real-token
    count is data, and a compiled graph must not depend on it (the padded path compiles with
    dynamic shapes instead)."""
    if key_padding_mask is None or unpad is False or torch.compiler.is_compiling():
        return False
    return hidden.is_cuda if unpad is None else True


def encode(encoder: nn.Module, hidden: torch.Tensor, key_padding_mask: torch.Tensor | None,
           unpad: bool | None) -> torch.Tensor:
    """Run ``encoder(hidden, mask)`` padded, or unpadded: pack the real tokens once, run every layer
    on (total_tokens, H) with varlen attention, unpack at the end. Unpadded, the real tokens'
    outputs equal the padded path's and padded positions hold zeros."""
    if not wants_unpadding(unpad, key_padding_mask, hidden):
        return encoder(hidden, key_padding_mask)
    packing = Packing.of(key_padding_mask)  # the mask is read here once, not again to test for padding
    if unpad is None and packing.total == packing.batch * packing.seq_len:
        return encoder(hidden, None)  # no padding: nothing to remove, no mask to apply
    return packing.unpack(encoder(packing.pack(hidden), packing))


def set_unpad(model: nn.Module, unpad: bool | None) -> nn.Module:
    """Set the unpadding policy of every encoder inside ``model`` (see ``wants_unpadding``)."""
    for module in model.modules():
        if hasattr(module, "unpad"):
            module.unpad = unpad
    return model


class Pooler(nn.Module):
    """tanh(dense(first token)): BERT's pooler."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


def mlm_logits(hidden: torch.Tensor, dense: nn.Linear, norm: nn.LayerNorm, decoder_weight: torch.Tensor,
               decoder_bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """Vocabulary logits of the MLM head at every position: (..., H) -> (..., vocab)."""
    h = ops.bias_gelu(F.linear(hidden, dense.weight), dense.bias, approximate)
    h = ops.layer_norm(h, norm.weight, norm.bias, norm.eps)
    return F.linear(h, decoder_weight, decoder_bias)


def mlm_loss(hidden: torch.Tensor, labels: torch.Tensor, dense: nn.Linear, norm: nn.LayerNorm,
             decoder_weight: torch.Tensor, decoder_bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """Mean MLM loss over positions with a label (!= -100), computed only at those positions."""
    return ops.mlm_loss(hidden, labels, dense.weight, dense.bias, norm.weight, norm.bias, decoder_weight,
                        decoder_bias, approximate=approximate, eps=norm.eps)


def tie_mlm_decoder(head: nn.Module, word_embeddings: nn.Embedding, tie: bool) -> None:
    """transformers' tying: decoder.weight is the word embedding table and decoder.bias is the
    head's ``bias`` (one parameter under two names). Untied (tie_word_embeddings=False) both stay
    separate and ``head.bias`` is unused, exactly as transformers 5 leaves them."""
    if tie:
        head.decoder.weight = word_embeddings.weight
        head.decoder.bias = head.bias


def wants_logits(labels: torch.Tensor | None, return_logits: bool | None) -> bool:
    """Full (B, T, vocab) logits are made when asked for, or by default when there is no loss."""
    return labels is None if return_logits is None else return_logits


class MaskedLMModel(nn.Module):
    """The forward shared by the ``*ForMaskedLM`` classes: encoder, then the MLM head only at
    labelled positions; full ``logits`` without ``labels`` or with ``return_logits=True``.

    Subclasses provide ``encoder_model()``, ``mlm_logits(hidden)`` and ``mlm_loss(hidden, labels)``.
    """

    def encoder_model(self) -> nn.Module:
        raise NotImplementedError

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool | None = None) -> MaskedLMOutput:
        """labels (B, T): original ids at masked positions, -100 elsewhere."""
        inputs.labels(type(self).__name__, "labels", labels, input_ids, inputs_embeds, per_token=True,
                      classes=self.config.vocab_size, ignore_index=-100)
        out = self.encoder_model()(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        hidden = out.last_hidden_state
        return MaskedLMOutput(
            loss=self.mlm_loss(hidden, labels) if labels is not None else None,
            logits=self.mlm_logits(hidden) if wants_logits(labels, return_logits) else None,
        )


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT init: normal(0, std) weights, zero biases, zero padding rows, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
