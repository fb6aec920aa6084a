"""The drop-in modules of ``bertfast.nn`` against what they replace (STYLE.md 9 and 10).

- ``LayerNorm`` vs ``torch.nn.LayerNorm``: constructor, parameters, state_dict, extra_repr, outputs and
  gradients; the residual / dropout extension vs ``LayerNorm(dropout(x) + residual)``.
- ``LinearGELU`` vs ``nn.Linear`` + ``nn.GELU(approximate)``.
- ``Embeddings`` vs transformers' Bert/Albert/Electra/RobertaEmbeddings (RoBERTa's padding-aware
  positions included), ragged padding.
- ``SelfAttention`` vs transformers' ``BertSelfAttention`` on eager attention with the 4D additive
  mask transformers builds, against our (B, T) bool key padding mask.

Float64 comparisons are tight (1e-12); float32 ones follow STYLE 7: our error against a float64
reference is at most 2x the replaced module's error in float32, plus a small atol.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bertfast

TIGHT = dict(rtol=1e-12, atol=1e-12)


def assert_float64_equal(ours: torch.Tensor, theirs: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(ours, theirs, **TIGHT, msg=lambda m: f"{what}: {m}")


def assert_within_reference(ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor, what: str = "",
                            atol: float = 1e-6) -> None:
    """STYLE 7: |ours - ref| <= 2 |theirs - ref| + atol, ``reference`` computed in float64."""
    assert ours.dtype == theirs.dtype, what
    err_ours = (ours.double() - reference).abs().max().item()
    err_theirs = (theirs.double() - reference).abs().max().item()
    assert err_ours <= 2 * err_theirs + atol, f"{what}: error {err_ours:.3g} vs replaced module's {err_theirs:.3g}"


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm-like weights around 1) so that no term is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        around_one = p.dim() == 1 and name.endswith("weight")  # LayerNorm scales
        p.copy_(1.0 + 0.3 * noise if around_one else noise)
    return module


def param_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


def assert_same_grads(ours: nn.Module, theirs: nn.Module, dtype_check=assert_float64_equal) -> None:
    g_ours, g_theirs = param_grads(ours), param_grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_ours:
        assert (g_ours[name] is None) == (g_theirs[name] is None), name
        if g_ours[name] is not None:
            dtype_check(g_ours[name], g_theirs[name], f"grad of {name}")


def check_to_keeps_parameter_objects(module: nn.Module, run) -> None:
    """``.to(dtype)``, ``.double()``, ``.float()`` convert in place: same Parameter objects, new dtype;
    ``run(module)`` still works and answers in the new dtype."""
    before = dict(module.named_parameters())
    for convert, dtype in ((lambda m: m.to(torch.float64), torch.float64), (lambda m: m.float(), torch.float32),
                           (lambda m: m.double(), torch.float64), (lambda m: m.to(dtype=torch.float32), torch.float32)):
        assert convert(module) is module
        after = dict(module.named_parameters())
        assert after.keys() == before.keys()
        for name, p in after.items():
            assert p is before[name], f"{name} was replaced by .to()"
            assert p.dtype == dtype, name
        out = run(module)
        assert out.dtype == dtype


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------
AFFINE = [(True, True), (True, False), (False, True), (False, False)]  # (elementwise_affine, bias)
AFFINE_IDS = [f"affine={a}-bias={b}" for a, b in AFFINE]


def test_layer_norm_constructor_matches_torch():
    ours = inspect.signature(bertfast.nn.LayerNorm.__init__).parameters
    theirs = inspect.signature(nn.LayerNorm.__init__).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    assert issubclass(bertfast.nn.LayerNorm, nn.LayerNorm)


@pytest.mark.parametrize("affine,bias", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("normalized_shape", [33, (33,), [33], torch.Size([33])], ids=["int", "tuple", "list", "Size"])
def test_layer_norm_parameters_state_dict_and_repr_match_torch(normalized_shape, affine, bias):
    kwargs = dict(eps=1e-3, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    ours, theirs = bertfast.nn.LayerNorm(normalized_shape, **kwargs), nn.LayerNorm(normalized_shape, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype == torch.float64, n
        assert torch.equal(p, q), n  # same init (ones / zeros)
    assert (ours.weight is None) == (theirs.weight is None) and (ours.bias is None) == (theirs.bias is None)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)
    assert ours.normalized_shape == theirs.normalized_shape and ours.eps == theirs.eps
    assert ours.elementwise_affine == theirs.elementwise_affine


def test_layer_norm_factory_kwargs_and_reset_parameters():
    for device in ("cpu", "meta", torch.device("meta")):
        ours = bertfast.nn.LayerNorm(8, device=device, dtype=torch.float16)
        theirs = nn.LayerNorm(8, device=device, dtype=torch.float16)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert p.device == q.device and p.dtype == q.dtype == torch.float16
    ln = randomize(bertfast.nn.LayerNorm(8), seed=0)
    ln.reset_parameters()
    assert torch.equal(ln.weight, torch.ones(8)) and torch.equal(ln.bias, torch.zeros(8))


@pytest.mark.parametrize("affine,bias", AFFINE, ids=AFFINE_IDS)
def test_layer_norm_state_dict_loads_both_ways_strictly(affine, bias):
    theirs = randomize(nn.LayerNorm(17, elementwise_affine=affine, bias=bias), seed=1)
    ours = bertfast.nn.LayerNorm(17, elementwise_affine=affine, bias=bias)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    back = nn.LayerNorm(17, elementwise_affine=affine, bias=bias)
    back.load_state_dict(randomize(ours, seed=2).state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def _pair_ln(n, eps, affine, bias, dtype, seed):
    theirs = randomize(nn.LayerNorm(n, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype), seed)
    ours = bertfast.nn.LayerNorm(n, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


LN_SHAPES = [(1151, 7), (2, 3, 33), (5, 1), (130,), (3, 4, 5, 6)]


def _ln_run(module, x, g, residual=None):
    """Forward + backward; returns the output and the grads of x (and residual)."""
    x = x.detach().clone().requires_grad_()
    r = None if residual is None else residual.detach().clone().requires_grad_()
    y = module(x) if r is None else module(x, residual=r)
    y.backward(g)
    return y.detach(), x.grad, (None if r is None else r.grad)


@pytest.mark.parametrize("affine,bias", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=[str(s) for s in LN_SHAPES])
@pytest.mark.parametrize("eps", [1e-5, 1e-12, 0.5])
def test_layer_norm_matches_torch_float64(shape, affine, bias, eps):
    ours, theirs = _pair_ln(shape[-1], eps, affine, bias, torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    y_o, gx_o, _ = _ln_run(ours, x, up)
    y_t, gx_t, _ = _ln_run(theirs, x, up)
    assert_float64_equal(y_o, y_t, "output")
    assert_float64_equal(gx_o, gx_t, "grad x")
    if affine:
        assert_same_grads(ours, theirs)


@pytest.mark.parametrize("affine,bias", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=[str(s) for s in LN_SHAPES])
def test_layer_norm_matches_torch_float32(shape, affine, bias):
    ours, theirs = _pair_ln(shape[-1], 1e-5, affine, bias, torch.float32, seed=5)
    reference = nn.LayerNorm(shape[-1], eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    reference.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g) * 3 + 1
    up = torch.randn(shape, generator=g)
    y_o, gx_o, _ = _ln_run(ours, x, up)
    y_t, gx_t, _ = _ln_run(theirs, x, up)
    y_r, gx_r, _ = _ln_run(reference, x.double(), up.double())
    assert_within_reference(y_o, y_t, y_r, "output")
    assert_within_reference(gx_o, gx_t, gx_r, "grad x", atol=1e-5)
    for (name, p_o), p_t, p_r in zip(ours.named_parameters(), theirs.parameters(), reference.parameters()):
        assert_within_reference(p_o.grad, p_t.grad, p_r.grad, f"grad {name}", atol=1e-4)


def test_layer_norm_non_contiguous_input_matches_contiguous():
    ours, theirs = _pair_ln(9, 1e-5, True, True, torch.float64, seed=7)
    x = torch.randn(9, 4, 6, dtype=torch.float64).transpose(0, 2)  # (6, 4, 9), last dim strided
    assert not x.is_contiguous()
    assert_float64_equal(ours(x), theirs(x.contiguous()), "transposed input")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine,bias", AFFINE[:2] + AFFINE[3:], ids=AFFINE_IDS[:2] + AFFINE_IDS[3:])
def test_layer_norm_residual_equals_norm_of_sum(dtype, affine, bias):
    ours, theirs = _pair_ln(21, 1e-6, affine, bias, dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    shape = (3, 11, 21)
    x, r, up = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    y_o, gx_o, gr_o = _ln_run(ours, x, up, residual=r)
    # The replaced code: dropout (p = 0 here) -> add residual -> LayerNorm.
    xs = x.detach().clone().requires_grad_()
    rs = r.detach().clone().requires_grad_()
    y_t = theirs(xs + rs)
    y_t.backward(up)
    if dtype == torch.float64:
        assert_float64_equal(y_o, y_t.detach(), "output")
        assert_float64_equal(gx_o, xs.grad, "grad x")
        assert_float64_equal(gr_o, rs.grad, "grad residual")
        if affine:
            assert_same_grads(ours, theirs)
    else:
        torch.testing.assert_close(y_o, y_t.detach())
        torch.testing.assert_close(gx_o, xs.grad)
        torch.testing.assert_close(gr_o, rs.grad)
    # dropout_p = 0 is exactly no dropout, in train and in eval mode.
    for mode in (ours.train, ours.eval):
        mode()
        assert torch.equal(ours(x, residual=r, dropout_p=0.0), y_o)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_layer_norm_dropout_is_statistically_right(p):
    """y = LN(dropout(x) + r). With z = dropout(x) + r: dL/dx = dL/dz * mask / (1 - p) and
    dL/dr = dL/dz, so grad_x / grad_r recovers each element's dropout factor exactly."""
    n_rows, n = 96, 64
    ours, theirs = _pair_ln(n, 1e-5, True, True, torch.float64, seed=10)
    g = torch.Generator().manual_seed(11)
    x, r, up = (torch.randn(n_rows, n, generator=g, dtype=torch.float64) for _ in range(3))
    x.requires_grad_(), r.requires_grad_()
    torch.manual_seed(12)
    y = ours(x, residual=r, dropout_p=p)
    y.backward(up)
    assert (r.grad.abs() > 1e-9).float().mean() > 0.999
    usable = r.grad.abs() > 1e-9
    factor = torch.where(usable, x.grad / r.grad, torch.full_like(x, float("nan")))
    dropped = factor == 0  # exact: dropped elements get exactly no gradient
    kept = usable & ~dropped
    # Kept elements are scaled by 1 / (1 - p).
    torch.testing.assert_close(factor[kept], torch.full_like(factor[kept], 1 / (1 - p)), rtol=1e-9, atol=0)
    # The dropped fraction is p, within 5 standard deviations of a binomial count.
    count, total = dropped.sum().item(), usable.sum().item()
    sigma = (total * p * (1 - p)) ** 0.5
    assert abs(count - p * total) < 5 * sigma, f"dropped {count} of {total}, expected {p * total:.0f} +- {sigma:.0f}"
    # Not a per-row or per-column pattern: both rows and columns differ in what they drop.
    assert dropped.float().mean(1).std() > 0 and dropped.float().mean(0).std() > 0
    assert len({tuple(row.tolist()) for row in dropped}) > n_rows // 2
    # The output is the replaced module on the recovered dropout of x.
    mask = torch.where(dropped, 0.0, torch.full_like(x, 1.0 / (1 - p)))  # float64 scale
    assert_float64_equal(y.detach(), theirs(x.detach() * mask + r.detach()).detach(), "output with dropout")
    # A fresh call draws a fresh mask; the same seed draws the same one.
    torch.manual_seed(12)
    assert torch.equal(ours(x, residual=r, dropout_p=p), y)
    assert not torch.equal(ours(x, residual=r, dropout_p=p), y)


def test_layer_norm_to_keeps_parameter_objects():
    ln = randomize(bertfast.nn.LayerNorm(10), seed=13)
    check_to_keeps_parameter_objects(ln, lambda m: m(torch.randn(2, 10, dtype=m.weight.dtype)))


# ------------------------------------------------------------------------------------------------
# LinearGELU
# ------------------------------------------------------------------------------------------------
APPROX = ["none", "tanh"]


def test_linear_gelu_constructor_extends_linear():
    ours = inspect.signature(bertfast.nn.LinearGELU.__init__).parameters
    theirs = inspect.signature(nn.Linear.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert [p.default for p in list(ours.values())[:len(theirs)]] == [p.default for p in theirs.values()]
    assert ours["approximate"].default == "none"
    assert issubclass(bertfast.nn.LinearGELU, nn.Linear)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", APPROX)
def test_linear_gelu_state_dict_and_repr(approximate, bias):
    ours = bertfast.nn.LinearGELU(13, 29, bias=bias, approximate=approximate, dtype=torch.float64)
    linear = nn.Linear(13, 29, bias=bias, dtype=torch.float64)
    assert list(ours.state_dict()) == list(linear.state_dict())
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in linear.named_parameters()]
    assert ours.extra_repr() == f"{linear.extra_repr()}, approximate={approximate!r}"
    randomize(linear, seed=14)
    ours.load_state_dict(linear.state_dict(), strict=True)
    back = nn.Linear(13, 29, bias=bias, dtype=torch.float64)
    back.load_state_dict(randomize(ours, seed=15).state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    for device in ("cpu", "meta"):
        m = bertfast.nn.LinearGELU(4, 6, bias=bias, device=device, dtype=torch.bfloat16, approximate=approximate)
        assert all(p.device.type == device and p.dtype == torch.bfloat16 for p in m.parameters())


def _pair_linear_gelu(approximate, bias, dtype, seed):
    linear = randomize(nn.Linear(19, 37, bias=bias, dtype=dtype), seed)
    theirs = nn.Sequential(linear, nn.GELU(approximate=approximate))
    ours = bertfast.nn.LinearGELU(19, 37, bias=bias, dtype=dtype, approximate=approximate)
    ours.load_state_dict(linear.state_dict(), strict=True)
    return ours, theirs, linear


def _fwd_bwd(module, x, up):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(up)
    return y.detach(), x.grad


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(5, 19), (2, 7, 19), (1, 19)], ids=str)
def test_linear_gelu_matches_linear_then_gelu(shape, approximate, bias):
    g = torch.Generator().manual_seed(16)
    # float64: tight.
    ours, theirs, linear = _pair_linear_gelu(approximate, bias, torch.float64, seed=17)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    up = torch.randn(*shape[:-1], 37, generator=g, dtype=torch.float64)
    y_o, gx_o = _fwd_bwd(ours, x, up)
    y_t, gx_t = _fwd_bwd(theirs, x, up)
    assert_float64_equal(y_o, y_t, "output")
    assert_float64_equal(gx_o, gx_t, "grad x")
    for (name, p), q in zip(ours.named_parameters(), linear.parameters()):
        assert_float64_equal(p.grad, q.grad, f"grad {name}")
    # float32: within 2x the replaced modules' error against the float64 run above.
    ours32, theirs32, linear32 = _pair_linear_gelu(approximate, bias, torch.float32, seed=17)
    y_o32, gx_o32 = _fwd_bwd(ours32, x.float(), up.float())
    y_t32, gx_t32 = _fwd_bwd(theirs32, x.float(), up.float())
    assert_within_reference(y_o32, y_t32, y_t, "output float32")
    assert_within_reference(gx_o32, gx_t32, gx_t, "grad x float32", atol=1e-5)
    for (name, p), q, ref in zip(ours32.named_parameters(), linear32.parameters(), linear.parameters()):
        assert_within_reference(p.grad, q.grad, ref.grad, f"grad {name} float32", atol=1e-5)


def test_linear_gelu_approximations_differ():
    # The flag is honoured (the two forms differ by up to ~1e-3 near |z| = 2).
    x = torch.linspace(-4, 4, 101 * 19, dtype=torch.float64).reshape(101, 19)
    ours = {a: _pair_linear_gelu(a, True, torch.float64, seed=18)[0] for a in APPROX}
    assert (ours["none"](x) - ours["tanh"](x)).abs().max() > 1e-5


def test_linear_gelu_to_keeps_parameter_objects():
    m = randomize(bertfast.nn.LinearGELU(6, 10, approximate="tanh"), seed=19)
    check_to_keeps_parameter_objects(m, lambda mod: mod(torch.randn(3, 6, dtype=mod.weight.dtype)))


# ------------------------------------------------------------------------------------------------
# Embeddings vs transformers
# ------------------------------------------------------------------------------------------------
EMB_FAMILIES = ["bert", "albert", "electra", "roberta"]
VOCAB, HIDDEN, E, MAX_POS = 37, 24, 10, 20
PAD = {"bert": 0, "albert": 3, "electra": 0, "roberta": 2}  # non-default pads check padding_idx is honoured


def hf_embeddings(family: str, dtype=torch.float64) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=2, num_hidden_layers=1,
                  intermediate_size=32, max_position_embeddings=MAX_POS, layer_norm_eps=1e-7,
                  hidden_dropout_prob=0.3, pad_token_id=PAD[family])
    if family == "bert":
        from transformers.models.bert.modeling_bert import BertEmbeddings as cls
        config = transformers.BertConfig(type_vocab_size=3, **common)
    elif family == "albert":
        from transformers.models.albert.modeling_albert import AlbertEmbeddings as cls
        config = transformers.AlbertConfig(type_vocab_size=3, embedding_size=E, **common)
    elif family == "electra":
        from transformers.models.electra.modeling_electra import ElectraEmbeddings as cls
        config = transformers.ElectraConfig(type_vocab_size=3, embedding_size=E, **common)
    else:
        from transformers.models.roberta.modeling_roberta import RobertaEmbeddings as cls
        config = transformers.RobertaConfig(type_vocab_size=1, **common)
    torch.manual_seed(0)
    return randomize(cls(config).to(dtype), seed=20).eval()


def our_embeddings(family: str, theirs: nn.Module) -> bertfast.nn.Embeddings:
    width = theirs.word_embeddings.embedding_dim
    ours = bertfast.nn.Embeddings(
        VOCAB, width, MAX_POS, theirs.token_type_embeddings.num_embeddings, pad_token_id=PAD[family],
        layer_norm_eps=theirs.LayerNorm.eps, hidden_dropout_prob=theirs.dropout.p,
        position_padding_idx=PAD[family] if family == "roberta" else None,
        dtype=theirs.word_embeddings.weight.dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval()


def ragged_ids(family: str, batch=3, seq=9) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids without padding tokens except: row 1 ends in 3 pads, row 2 in 6, row 0 has one pad mid-way."""
    g = torch.Generator().manual_seed(21)
    pad = PAD[family]
    ids = torch.randint(0, VOCAB - 1, (batch, seq), generator=g)
    ids = ids + (ids >= pad).long()  # skip the pad id
    ids[1, -3:] = pad
    ids[2, -6:] = pad
    ids[0, 4] = pad
    types = torch.randint(0, 1 if family == "roberta" else 3, (batch, seq), generator=g)
    return ids, types


def _emb_run(module, up, projection=None, **inputs):
    """Forward + backward through embeddings (and a projection); returns output and grad of inputs_embeds."""
    if projection is not None:
        y = module(**inputs, projection=projection) if isinstance(module, bertfast.nn.Embeddings) \
            else projection(module(**inputs))
    else:
        y = module(**inputs)
    y.backward(up)
    emb = inputs.get("inputs_embeds")
    return y.detach(), (None if emb is None else emb.grad)


def _emb_cases(family, dtype):
    ids, types = ragged_ids(family)
    B, T = ids.shape
    g = torch.Generator().manual_seed(22)
    width = E if family in ("albert", "electra") else HIDDEN
    embeds = torch.randn(B, T, width, generator=g, dtype=dtype)
    positions = torch.randint(0, MAX_POS, (B, T), generator=g)
    longest = MAX_POS - (PAD[family] + 1 if family == "roberta" else 0)
    return {
        "ids": dict(input_ids=ids),
        "ids+types": dict(input_ids=ids, token_type_ids=types),
        "ids+positions(B,T)": dict(input_ids=ids, token_type_ids=types, position_ids=positions),
        "ids+positions(1,T)": dict(input_ids=ids, position_ids=positions[:1]),
        "inputs_embeds": dict(inputs_embeds=embeds.requires_grad_()),
        # The longest sequence the position table holds (RoBERTa's positions start at pad + 1).
        "longest": dict(input_ids=torch.randint(PAD[family] + 1, VOCAB, (2, longest), generator=g)),
    }


EMB_CASES = list(_emb_cases("bert", torch.float64))


@pytest.mark.parametrize("family", EMB_FAMILIES)
def test_embeddings_state_dict_keys_equal_transformers(family):
    theirs = hf_embeddings(family)
    ours = our_embeddings(family, theirs)
    # Same keys (RoBERTa's module defines position_embeddings last: the order may differ).
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs_params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        assert p.shape == theirs_params[n].shape and torch.equal(p, theirs_params[n]), n
    assert ours.word_embeddings.padding_idx == theirs.word_embeddings.padding_idx
    assert ours.position_embeddings.padding_idx == theirs.position_embeddings.padding_idx
    back = hf_embeddings(family)
    back.load_state_dict(randomize(ours, seed=23).state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("case", EMB_CASES)
@pytest.mark.parametrize("family", EMB_FAMILIES)
def test_embeddings_match_transformers_float64(family, case):
    theirs = hf_embeddings(family)
    ours = our_embeddings(family, theirs)
    inputs_o = _emb_cases(family, torch.float64)[case]
    inputs_t = _emb_cases(family, torch.float64)[case]
    lead = inputs_o.get("input_ids", inputs_o.get("inputs_embeds"))
    up = torch.randn(*lead.shape[:2], theirs.word_embeddings.embedding_dim,
                     generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    y_o, ge_o = _emb_run(ours, up, **inputs_o)
    y_t, ge_t = _emb_run(theirs, up, **inputs_t)
    assert_float64_equal(y_o, y_t, "output")
    assert_same_grads(ours, theirs)
    if ge_o is not None:
        assert_float64_equal(ge_o, ge_t, "grad inputs_embeds")
    # Padding rows get no gradient, as in nn.Embedding(padding_idx=...).
    if "input_ids" in inputs_o:
        assert torch.equal(ours.word_embeddings.weight.grad[PAD[family]], torch.zeros_like(up[0, 0]))


def test_roberta_positions_are_padding_aware():
    theirs = hf_embeddings("roberta")
    ours = our_embeddings("roberta", theirs)
    ids, _ = ragged_ids("roberta")
    pad = PAD["roberta"]
    expected = theirs.create_position_ids_from_input_ids(ids, pad)
    got = ours.default_position_ids(ids, *ids.shape, ids.device)
    assert torch.equal(got.expand_as(expected), expected)
    assert (got[ids == pad] == pad).all() and got[0, 0] == pad + 1
    assert ours.max_sequence_length == MAX_POS - pad - 1
    # The position row of the padding index gets no gradient.
    ours(ids).sum().backward()
    assert torch.equal(ours.position_embeddings.weight.grad[pad], torch.zeros(HIDDEN, dtype=torch.float64))


@pytest.mark.parametrize("family", ["albert", "electra"])
def test_factorized_embeddings_with_projection_match(family):
    theirs = hf_embeddings(family)
    ours = our_embeddings(family, theirs)
    projection = randomize(nn.Linear(E, HIDDEN, dtype=torch.float64), seed=25)
    ids, types = ragged_ids(family)
    up = torch.randn(*ids.shape, HIDDEN, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    y_o, _ = _emb_run(ours, up, projection=projection, input_ids=ids, token_type_ids=types)
    grads_o = {n: p.grad.clone() for n, p in projection.named_parameters()}
    projection.zero_grad()
    y_t, _ = _emb_run(theirs, up, projection=projection, input_ids=ids, token_type_ids=types)
    assert y_o.shape == (*ids.shape, HIDDEN)
    assert_float64_equal(y_o, y_t, "projected output")
    assert_same_grads(ours, theirs)
    for n, p in projection.named_parameters():
        assert_float64_equal(grads_o[n], p.grad, f"grad projection.{n}")


@pytest.mark.parametrize("family", EMB_FAMILIES)
def test_embeddings_match_transformers_float32(family):
    reference = hf_embeddings(family)
    theirs = hf_embeddings(family, dtype=torch.float32)
    theirs.load_state_dict({k: v.float() for k, v in reference.state_dict().items()}, strict=True)
    reference.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()}, strict=True)
    ours = our_embeddings(family, theirs)
    ids, types = ragged_ids(family)
    up = torch.randn(*ids.shape, theirs.word_embeddings.embedding_dim, generator=torch.Generator().manual_seed(27))
    y_o, _ = _emb_run(ours, up, input_ids=ids, token_type_ids=types)
    y_t, _ = _emb_run(theirs, up, input_ids=ids, token_type_ids=types)
    y_r, _ = _emb_run(reference, up.double(), input_ids=ids, token_type_ids=types)
    assert y_o.dtype == torch.float32
    assert_within_reference(y_o, y_t, y_r, "output")
    theirs_params, reference_params = dict(theirs.named_parameters()), dict(reference.named_parameters())
    for n, p in ours.named_parameters():
        assert_within_reference(p.grad, theirs_params[n].grad, reference_params[n].grad, f"grad {n}", atol=1e-5)


def test_embeddings_to_keeps_parameter_objects():
    ours = our_embeddings("roberta", hf_embeddings("roberta"))
    ids, _ = ragged_ids("roberta")
    check_to_keeps_parameter_objects(ours, lambda m: m(ids))


def test_embeddings_and_self_attention_factory_kwargs():
    for device in ("cpu", "meta"):
        emb = bertfast.nn.Embeddings(VOCAB, E, MAX_POS, 2, pad_token_id=1, device=device, dtype=torch.float16)
        att = bertfast.nn.SelfAttention(ATT_HIDDEN, ATT_HEADS, device=device, dtype=torch.float16)
        for module in (emb, att):
            for name, p in module.named_parameters():
                assert p.device.type == device and p.dtype == torch.float16, name


def test_embeddings_dropout_only_in_train_mode():
    ours = our_embeddings("bert", hf_embeddings("bert"))
    ids, _ = ragged_ids("bert")
    ours.eval()
    y_eval = ours(ids)
    assert torch.equal(ours(ids), y_eval)
    ours.train()
    y_train = ours(ids)
    zeros = (y_train == 0) & (y_eval != 0)
    assert 0.15 < zeros.double().mean() < 0.45  # hidden_dropout_prob = 0.3
    torch.testing.assert_close(y_train[~zeros], (y_eval / 0.7)[~zeros], **TIGHT)


# ------------------------------------------------------------------------------------------------
# SelfAttention vs transformers' BertSelfAttention (eager)
# ------------------------------------------------------------------------------------------------
ATT_HIDDEN, ATT_HEADS = 36, 3  # head_dim 12


def hf_self_attention(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertSelfAttention

    config = transformers.BertConfig(hidden_size=ATT_HIDDEN, num_attention_heads=ATT_HEADS, num_hidden_layers=1,
                                     intermediate_size=16, vocab_size=11, attention_probs_dropout_prob=0.2,
                                     attn_implementation="eager")
    assert config._attn_implementation == "eager"
    torch.manual_seed(0)
    return randomize(BertSelfAttention(config).to(dtype), seed=28).eval(), config


def our_self_attention(theirs):
    ours = bertfast.nn.SelfAttention(ATT_HIDDEN, ATT_HEADS, attention_probs_dropout_prob=theirs.dropout.p,
                                     dtype=theirs.query.weight.dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval()


def ragged_mask(batch=4, seq=7) -> torch.Tensor:
    """(B, T) long, 1 = real token: full, 2 pads, 5 pads, 6 pads (every row keeps a real key)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pads in zip(range(1, batch), (2, 5, 6)):
        mask[row, seq - pads:] = 0
    return mask


def hf_mask(config, x, mask2d):
    """The 4D additive mask transformers' BertModel builds for eager attention."""
    from transformers.masking_utils import create_bidirectional_mask

    mask4d = create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=mask2d)
    assert mask4d.shape == (x.shape[0], 1, x.shape[1], x.shape[1]) and mask4d.dtype == x.dtype
    assert (mask4d[mask2d[:, None, None, :].expand_as(mask4d) == 0] == torch.finfo(x.dtype).min).all()
    return mask4d


def _att_run(module, x, up, mask):
    x = x.detach().clone().requires_grad_()
    out = module(x, key_padding_mask=mask) if isinstance(module, bertfast.nn.SelfAttention) \
        else module(x, attention_mask=mask)[0]
    out.backward(up)
    return out.detach(), x.grad


def test_self_attention_state_dict_equals_transformers():
    theirs, _ = hf_self_attention()
    ours = our_self_attention(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.num_attention_heads == theirs.num_attention_heads
    assert ours.attention_head_size == theirs.attention_head_size
    back, _ = hf_self_attention()
    back.load_state_dict(randomize(ours, seed=29).state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


@pytest.mark.parametrize("masked", [True, False], ids=["ragged", "no-mask"])
def test_self_attention_matches_transformers_float64(masked):
    theirs, config = hf_self_attention()
    ours = our_self_attention(theirs)
    g = torch.Generator().manual_seed(30)
    x = torch.randn(4, 7, ATT_HIDDEN, generator=g, dtype=torch.float64)
    up = torch.randn(4, 7, ATT_HIDDEN, generator=g, dtype=torch.float64)
    mask2d = ragged_mask()
    y_o, gx_o = _att_run(ours, x, up, mask2d.bool() if masked else None)
    y_t, gx_t = _att_run(theirs, x, up, hf_mask(config, x, mask2d) if masked else None)
    assert_float64_equal(y_o, y_t, "output")
    assert_float64_equal(gx_o, gx_t, "grad hidden_states")
    assert_same_grads(ours, theirs)


def test_self_attention_matches_transformers_float32():
    reference, config = hf_self_attention()
    theirs, _ = hf_self_attention(torch.float32)
    theirs.load_state_dict({k: v.float() for k, v in reference.state_dict().items()}, strict=True)
    reference.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()}, strict=True)
    ours = our_self_attention(theirs)
    g = torch.Generator().manual_seed(31)
    x = torch.randn(4, 7, ATT_HIDDEN, generator=g)
    up = torch.randn(4, 7, ATT_HIDDEN, generator=g)
    mask2d = ragged_mask()
    y_o, gx_o = _att_run(ours, x, up, mask2d.bool())
    y_t, gx_t = _att_run(theirs, x, up, hf_mask(config, x, mask2d))
    y_r, gx_r = _att_run(reference, x.double(), up.double(), hf_mask(config, x.double(), mask2d))
    assert y_o.dtype == torch.float32
    assert_within_reference(y_o, y_t, y_r, "output")
    assert_within_reference(gx_o, gx_t, gx_r, "grad hidden_states", atol=1e-5)
    for (n, p), q, r in zip(ours.named_parameters(), theirs.parameters(), reference.parameters()):
        assert_within_reference(p.grad, q.grad, r.grad, f"grad {n}", atol=1e-5)


def test_self_attention_dropout_only_in_train_mode():
    theirs, _ = hf_self_attention()
    ours = our_self_attention(theirs)
    x = torch.randn(2, 5, ATT_HIDDEN, dtype=torch.float64)
    ours.eval()
    y_eval = ours(x)
    assert torch.equal(ours(x), y_eval)
    ours.train()
    torch.manual_seed(32)
    assert not torch.equal(ours(x), y_eval)


def test_self_attention_to_keeps_parameter_objects():
    theirs, _ = hf_self_attention(torch.float32)
    ours = our_self_attention(theirs)
    mask = ragged_mask().bool()
    check_to_keeps_parameter_objects(
        ours, lambda m: m(torch.randn(4, 7, ATT_HIDDEN, dtype=m.query.weight.dtype), key_padding_mask=mask))
