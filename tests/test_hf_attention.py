"""bertfast attention as a transformers attention implementation (``attn_implementation="bertfast"``):
the transformers models themselves, with only their attention swapped, equal the same weights run with
"eager": outputs and every parameter gradient, ragged padding, float64 to 1e-10 and float32 to 1e-5
(normwise relative, as test_hf_parity.py); padding is honoured (never silently dropped); what cannot
be served (output_attentions, causal/decoder use, non-key-padding masks) raises a clear error."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import EXTRA, SIZES, assert_grads_close, assert_rel_close, ragged_batch, randomize_

import bertfast
from bertfast import hf_attention

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AttentionMaskInterface"):
    pytest.skip("transformers without AttentionMaskInterface", allow_module_level=True)
from transformers import masking_utils

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# class name -> the public Auto class that builds it from a config
AUTO = {
    "BertModel": "AutoModel", "BertForPreTraining": "AutoModelForPreTraining",
    "AlbertModel": "AutoModel", "AlbertForPreTraining": "AutoModelForPreTraining",
    "AlbertForMaskedLM": "AutoModelForMaskedLM",
    "RobertaModel": "AutoModel", "RobertaForMaskedLM": "AutoModelForMaskedLM",
    "ElectraModel": "AutoModel", "ElectraForPreTraining": "AutoModelForPreTraining",
    "ElectraForMaskedLM": "AutoModelForMaskedLM",
}
OUTPUTS = ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits",
           "sop_logits")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    bertfast.register_hf_attention()


def model_type(class_name: str) -> str:
    return next(t for t in EXTRA if class_name.lower().startswith(t))


def build(class_name: str, attn: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """A transformers model built from a config (no download), every parameter random (seeded).
    Each model gets its own config: from_config writes `_attn_implementation` into the config it is given."""
    mtype = model_type(class_name)
    config = transformers.AutoConfig.for_model(mtype, **{**SIZES, **EXTRA[mtype], **overrides})
    model = getattr(transformers, AUTO.get(class_name, "AutoModel")).from_config(copy.deepcopy(config),
                                                                                attn_implementation=attn)
    assert type(model).__name__ == class_name
    assert model.config._attn_implementation == attn
    model.to(dtype)
    randomize_(model, seed)
    return model


def inputs(mtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    ids, mask, types = ragged_batch(mtype, seed=seed)
    mask[2, 2:] = 0  # a row that is mostly padding
    ids[2, 2:] = EXTRA[mtype].get("pad_token_id", 0)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        kwargs["token_type_ids"] = types * mask
    return kwargs


def outputs(out) -> dict[str, torch.Tensor]:
    return {n: out[n] for n in OUTPUTS if n in out and out[n] is not None}


def real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real-token positions of a (B, T, ...) output."""
    return t[mask.bool()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("class_name", list(AUTO))
def test_outputs_and_gradients_equal_eager(class_name, dtype):
    ours = build(class_name, "bertfast", dtype).train()  # train mode, dropout 0: the training path
    eager = build(class_name, "eager", dtype).train()
    eager.load_state_dict(ours.state_dict())
    kwargs = inputs(model_type(class_name))

    with bertfast.record_backends() as trace:
        out_ours = outputs(ours(**kwargs))
    out_eager = outputs(eager(**kwargs))
    assert trace and all(op == "attention" for op, _ in trace)
    assert set(out_ours) == set(out_eager) and out_ours
    for name in out_eager:
        assert out_ours[name].dtype == dtype
        assert_rel_close(out_ours[name], out_eager[name], TOLERANCE[dtype], f"{class_name}.{name}")

    g = torch.Generator().manual_seed(7)
    weights = {n: torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for n, t in out_eager.items()}
    sum((out_ours[n] * w).sum() for n, w in weights.items()).backward()
    sum((out_eager[n] * w).sum() for n, w in weights.items()).backward()
    assert_grads_close(ours, eager, TOLERANCE[dtype], class_name)


@pytest.mark.parametrize("mtype", list(EXTRA))
def test_attention_op_runs_once_per_layer(mtype):
    model = build(f"{mtype.capitalize()}Model", "bertfast").eval()
    layers = SIZES["num_hidden_layers"] * EXTRA[mtype].get("inner_group_num", 1)
    with bertfast.record_backends() as trace:
        model(**inputs(mtype))
    assert trace == [("attention", "torch")] * layers


@pytest.mark.parametrize("mtype", list(EXTRA))
def test_padded_tokens_do_not_reach_real_tokens(mtype):
    """Changing padded ids, or writing NaN into padded positions' hidden states, leaves every
    real-token output unchanged."""
    name = f"{mtype.capitalize()}Model"
    model = build(name, "bertfast").eval()
    kwargs = inputs(mtype)
    mask = kwargs["attention_mask"]
    expected = model(**kwargs).last_hidden_state

    other = dict(kwargs)
    g = torch.Generator().manual_seed(5)
    noise = torch.randint(2, SIZES["vocab_size"], mask.shape, generator=g)
    other["input_ids"] = torch.where(mask.bool(), kwargs["input_ids"], noise)
    changed = model(**other).last_hidden_state
    assert not torch.equal(changed[~mask.bool()], expected[~mask.bool()])  # the padded ids did change something
    assert_rel_close(real(changed, mask), real(expected, mask), TOLERANCE[torch.float64], "changed padded ids")

    def poison(module, args, output):
        return output.masked_fill(~mask.bool()[:, :, None], float("nan"))

    handle = model.embeddings.register_forward_hook(poison)
    try:
        poisoned = model(**kwargs).last_hidden_state
    finally:
        handle.remove()
    assert torch.isnan(poisoned[~mask.bool()]).all()
    assert_rel_close(real(poisoned, mask), real(expected, mask), TOLERANCE[torch.float64], "NaN in padding")


def test_padding_is_not_silently_ignored():
    """The DESIGN pitfall: the attention function registered without a mask function is called with
    attention_mask=None, so the model attends to padding. With `register()` it does not."""
    transformers.AttentionInterface.register("bertfast_test_no_mask_fn", hf_attention.attention_forward)
    assert "bertfast_test_no_mask_fn" not in transformers.AttentionMaskInterface()
    assert transformers.AttentionMaskInterface()["bertfast"] is hf_attention.attention_mask
    assert transformers.AttentionInterface()["bertfast"] is hf_attention.attention_forward

    kwargs = inputs("bert")
    mask = kwargs["attention_mask"]
    eager = build("BertModel", "eager").eval()
    ours = build("BertModel", "bertfast").eval()
    no_mask_fn = build("BertModel", "bertfast_test_no_mask_fn").eval()
    expected = real(eager(**kwargs).last_hidden_state, mask)
    assert_rel_close(real(ours(**kwargs).last_hidden_state, mask), expected, TOLERANCE[torch.float64], "bertfast")
    ignored = real(no_mask_fn(**kwargs).last_hidden_state, mask)
    assert (ignored - expected).abs().max() > 1e-3  # padding silently ignored
    no_padding = {**kwargs, "attention_mask": torch.ones_like(mask)}
    assert_rel_close(ignored, real(eager(**no_padding).last_hidden_state, mask), TOLERANCE[torch.float64],
                     "attention-only registration == no mask at all")


def test_prebuilt_4d_masks_are_key_padding():
    """A 4D mask given by the user reaches the attention function as is: bool (True = attend) and
    additive float (0 / finfo.min) key-padding masks give the 2D mask's result."""
    model = build("BertModel", "bertfast").eval()
    kwargs = inputs("bert")
    mask = kwargs["attention_mask"].bool()
    expected = model(**kwargs).last_hidden_state
    T = mask.shape[1]
    as_bool = mask[:, None, None, :].expand(-1, 1, T, T)
    as_float = torch.zeros(as_bool.shape, dtype=torch.float64).masked_fill(~as_bool, torch.finfo(torch.float64).min)
    for four_d in (as_bool, as_float, mask[:, None, None, :]):
        got = model(**{**kwargs, "attention_mask": four_d}).last_hidden_state
        assert_rel_close(real(got, mask), real(expected, mask), TOLERANCE[torch.float64], f"4D {four_d.dtype}")


def test_from_pretrained_with_bertfast_attention(tmp_path):
    saved = build("ElectraForPreTraining", "eager").eval()
    saved.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path, attn_implementation="bertfast",
                                                                  dtype=torch.float64).eval()
    assert loaded.config._attn_implementation == "bertfast"
    kwargs = inputs("electra")
    with bertfast.record_backends() as trace:
        got = loaded(**kwargs).logits
    assert trace == [("attention", "torch")] * SIZES["num_hidden_layers"]
    assert_rel_close(got, saved(**kwargs).logits, TOLERANCE[torch.float64], "from_pretrained")


def test_output_attentions_is_refused():
    kwargs = inputs("bert")
    model = build("BertModel", "bertfast").eval()
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="output_attentions=True"):
        model(**kwargs, output_attentions=True)
    from_config = build("BertModel", "bertfast", output_attentions=True).eval()
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="output_attentions=True"):
        from_config(**kwargs)


def test_decoder_use_is_refused():
    config = transformers.BertConfig(**SIZES, is_decoder=True)
    decoder = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="bertfast").eval()
    ids = inputs("bert")["input_ids"]
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="causal"):
        decoder(input_ids=ids, use_cache=False)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="causal"):
        decoder(input_ids=ids[:, :1], use_cache=False)  # one query: the mask is key padding, the module is causal


def test_attention_function_refusals():
    module = torch.nn.Module()
    module.is_causal = False
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)  # (B, H, T, D)
    key_padding = torch.ones(2, 5, dtype=torch.bool)
    out, weights = hf_attention.attention_forward(module, q, q, q, key_padding[:, None, None, :])
    assert weights is None and out.shape == (2, 5, 3, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="not a key-padding mask"):
        hf_attention.attention_forward(module, q, q, q, causal)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="causal attention"):
        hf_attention.attention_forward(module, q, q, q, None, is_causal=True)
    bias = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="attention bias"):
        hf_attention.attention_forward(module, q, q, q, bias)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="softcap"):
        hf_attention.attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="grouped key/value heads"):
        hf_attention.attention_forward(module, q, q[:, :1], q[:, :1], None)
    with pytest.raises(ValueError, match="attention_mask has 4 keys"):
        hf_attention.attention_forward(module, q, q, q, key_padding[:, None, None, :4])


def test_mask_function_matches_sdpa_mask():
    """The cheap (B, 1, 1, Tk) mask is sdpa_mask's (B, 1, Tq, Tk) mask with its equal rows folded,
    for the plain bidirectional mask (no materialisation) and for any other key-padding pattern
    (built by sdpa_mask, then checked); a causal pattern is refused."""
    padding = ragged_batch("bert")[1].bool()
    B, T = padding.shape
    base = {"batch_size": B, "q_length": T, "kv_length": T, "q_offset": 0, "kv_offset": 0, "attention_mask": padding,
            "allow_is_causal_skip": False, "allow_is_bidirectional_skip": True, "device": "cpu"}
    expected = masking_utils.sdpa_mask(**base, mask_function=masking_utils.bidirectional_mask_function)
    plain = hf_attention.attention_mask(**base, mask_function=masking_utils.bidirectional_mask_function)
    assert plain.shape == (B, 1, 1, T) and torch.equal(plain.expand_as(expected), expected)

    def first_keys(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < T - 3

    custom = masking_utils.and_masks(masking_utils.bidirectional_mask_function, first_keys)
    expected = masking_utils.sdpa_mask(**base, mask_function=custom)
    got = hf_attention.attention_mask(**base, mask_function=custom)
    assert got.shape == (B, 1, 1, T) and torch.equal(got.expand_as(expected), expected)
    with pytest.raises(hf_attention.UnsupportedAttentionError, match="causal_mask_function"):
        hf_attention.attention_mask(**{**base, "attention_mask": None},
                                    mask_function=masking_utils.causal_mask_function)
    assert hf_attention.attention_mask(**{**base, "attention_mask": None},
                                       mask_function=masking_utils.bidirectional_mask_function) is None


def test_register_is_idempotent_and_guards_other_names():
    bertfast.register_hf_attention()
    bertfast.register_hf_attention("bertfast")
    assert transformers.AttentionInterface()["bertfast"] is hf_attention.attention_forward
    with pytest.raises(ValueError, match="already maps 'sdpa'"):
        bertfast.register_hf_attention("sdpa")
    assert transformers.AttentionInterface()["sdpa"] is not hf_attention.attention_forward
    with pytest.raises(ValueError, match="name"):
        bertfast.register_hf_attention("")


def test_bertfast_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import bertfast, bertfast.hf_attention\n"
            "try:\n    bertfast.register_hf_attention()\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "ImportError: register: bertfast's transformers attention needs transformers" in result.stdout
