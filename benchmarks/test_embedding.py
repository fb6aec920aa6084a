"""Token embeddings (gather + LayerNorm + dropout + factorized projection): bertfast vs the
transformers modules it replaces, side by side.

    python -m pytest benchmarks/test_embedding.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds and its output
is finite). ``--benchmark-json=FILE`` keeps ``extra_info``.

Cases: mode (fwd | bwd | fwd+bwd) x model, batch x seq 32 x 512 in bfloat16 on a GPU (4 x 128 in
float32 on a CPU), full-length sequences with two segments (token types 0 then 1). Each model's
embeddings are built from a transformers config (random weights, no downloads), in training mode
with the config's dropout:

  albert    AlbertEmbeddings (vocab 30000, E 128, dropout 0 as ALBERT v2) + the encoder's
            embedding_hidden_mapping_in nn.Linear(128, 768)
  electra   ElectraEmbeddings (vocab 30522, E 128, dropout 0.1) + ElectraModel's
            embeddings_project nn.Linear(128, 256) (ELECTRA-small's discriminator widths)
  bert      BertEmbeddings (vocab 30522, E = H = 768, dropout 0.1), no projection

Implementations (one pytest-benchmark group per case):

  transformers                    the module (+ projection) called as the model calls it:
                                  input_ids and token_type_ids, position ids from its buffer
  bertfast-torch                  bertfast.ops.embedding(..., backend="torch") on the same weights
  bertfast-triton                 bertfast.ops.embedding(..., backend="triton"): the fused kernel,
                                  (tokens, E) never written in the forward; atomics in the backward
  bertfast-triton-deterministic   the same with deterministic=True (the table gradients without
                                  atomics, in a fixed order), where the op has that keyword

Gradients: every parameter (the three tables, the LayerNorm, the projection). Timing, rounds and
peak memory as in test_attention.py (``flops.run_case``). ``extra_info``: bytes
(``flops.embedding_bytes``), GB/s and the fraction of the card's copy bandwidth, peak memory,
``speedup_vs_transformers`` / ``memory_ratio_vs_transformers``, the bertfast backends that ran,
the card and versions. Outputs are checked to be finite, nothing more.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from flops import (
    DTYPE,
    MODES,
    TRITON_NEEDS_CUDA,
    embedding_bytes,
    run_case,
)
from torch import nn

import bertfast

transformers = pytest.importorskip("transformers")

BATCH = {"cuda": (32, 512), "cpu": (4, 128)}  # (B, T)
MODELS = ("albert", "electra", "bert")
IMPLS = ("transformers", "bertfast-torch", "bertfast-triton", "bertfast-triton-deterministic")
BASELINES = ("transformers",)


def hf_config(model: str):
    if model == "albert":
        return transformers.AlbertConfig(vocab_size=30000, embedding_size=128, hidden_size=768, num_attention_heads=12,
                                         intermediate_size=3072, hidden_dropout_prob=0.0)
    if model == "electra":
        return transformers.ElectraConfig(vocab_size=30522, embedding_size=128, hidden_size=256,
                                          num_attention_heads=4, intermediate_size=1024, hidden_dropout_prob=0.1)
    if model == "bert":
        return transformers.BertConfig(vocab_size=30522, hidden_size=768, hidden_dropout_prob=0.1)
    raise ValueError(f"model: unknown model {model!r}")


class HFEmbeddings(nn.Module):
    """transformers' embeddings module and, for the factorized models, the E -> H projection the
    encoder applies next (ALBERT's embedding_hidden_mapping_in, ELECTRA's embeddings_project)."""

    def __init__(self, model: str, config):
        super().__init__()
        if model == "albert":
            from transformers.models.albert.modeling_albert import AlbertEmbeddings as Embeddings
        elif model == "electra":
            from transformers.models.electra.modeling_electra import ElectraEmbeddings as Embeddings
        else:
            from transformers.models.bert.modeling_bert import BertEmbeddings as Embeddings
        self.embeddings = Embeddings(config)
        factorized = getattr(config, "embedding_size", config.hidden_size) != config.hidden_size
        self.projection = nn.Linear(config.embedding_size, config.hidden_size) if factorized else None

    def forward(self, input_ids, token_type_ids):
        e = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, E)
        return self.projection(e) if self.projection is not None else e  # (B, T, H)


def bertfast_embedding(module: HFEmbeddings, config, backend: str, **extra):
    """bertfast.ops.embedding on the transformers module's own parameters."""
    emb, proj = module.embeddings, module.projection

    def forward(input_ids, token_type_ids, position_ids):
        return bertfast.ops.embedding(
            input_ids, position_ids, token_type_ids, emb.word_embeddings.weight, emb.position_embeddings.weight,
            emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias, eps=config.layer_norm_eps,
            dropout_p=config.hidden_dropout_prob, padding_idx=config.pad_token_id,
            projection_weight=None if proj is None else proj.weight,
            projection_bias=None if proj is None else proj.bias, backend=backend, **extra)

    return forward


@functools.lru_cache(maxsize=1)
def built(model: str, device: torch.device, dtype: torch.dtype) -> tuple[HFEmbeddings, object]:
    """The module of ``model`` (seeded), kept for the cases that follow: building a 30522 x 768
    table costs more than timing it on a CPU. The cases never change its weights."""
    config = hf_config(model)
    torch.manual_seed(0)
    return HFEmbeddings(model, config).to(device=device, dtype=dtype).train(), config


CASES = [pytest.param(mode, model, impl, id=f"{mode}-{model}-{impl}")
         for model, mode, impl in itertools.product(MODELS, MODES, IMPLS)]  # one model's cases together


@pytest.mark.parametrize("mode, model, impl", CASES)
def test_embedding(benchmark, device, env_info, mode, model, impl):
    kind = device.type
    if impl.startswith("bertfast-triton") and kind != "cuda":
        pytest.skip(f"needs CUDA: {TRITON_NEEDS_CUDA}")
    extra = {}
    if impl == "bertfast-triton-deterministic":
        extra["deterministic"] = True
    dtype = DTYPE[kind]
    B, T = BATCH[kind]
    module, config = built(model, device, dtype)
    grad = mode != "fwd"
    module.requires_grad_(grad)
    g = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(1, config.vocab_size, (B, T), generator=g, device=device)  # no padding: full rows
    token_type_ids = (torch.arange(T, device=device) >= T // 2).long().expand(B, T).contiguous()  # two segments
    position_ids = torch.arange(T, device=device)[None, :]  # (1, T), as transformers' buffer slice

    if impl == "transformers":
        def forward():
            return module(input_ids, token_type_ids)
    else:
        fn = bertfast_embedding(module, config, impl.split("-")[1], **extra)

        def forward():
            return fn(input_ids, token_type_ids, position_ids)

    E, H = config.embedding_size if model != "bert" else config.hidden_size, config.hidden_size
    out_size = H if module.projection is not None else E
    grad_out = torch.randn(B, T, out_size, generator=g, device=device, dtype=dtype) if grad else None
    itemsize = torch.finfo(dtype).bits // 8
    emb = module.embeddings
    small_tables = (emb.position_embeddings.weight.numel() + emb.token_type_embeddings.weight.numel()) * itemsize
    projection = 0 if module.projection is None else sum(p.numel() for p in module.projection.parameters()) * itemsize
    nbytes = embedding_bytes(
        mode, ids_bytes=input_ids.nbytes + token_type_ids.nbytes + position_ids.nbytes, tokens=B * T,
        embedding_size=E, out_size=out_size, itemsize=itemsize,
        word_table_bytes=emb.word_embeddings.weight.numel() * itemsize, small_tables_bytes=small_tables,
        projection_bytes=projection)

    dtype_name = str(dtype).removeprefix("torch.")
    run_case(benchmark, device, env_info,
             group=f"embedding {mode} {model} B={B} T={T} E={E}->{out_size} {dtype_name}",
             impl=impl, mode=mode, forward=forward, leaves=list(module.parameters()), grad_out=grad_out,
             baselines=BASELINES, nbytes=nbytes,
             info={"model": model, "batch": B, "seq_len": T, "vocab": config.vocab_size, "embedding_size": E,
                   "hidden": H, "projection": module.projection is not None,
                   "dropout_p": config.hidden_dropout_prob})
