"""The fused embedding kernels (kernels/embedding.py) against the torch backend of ops.embedding.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md): the kernel's error
against the float64 torch backend is at most 2x the torch backend's error in the same dtype, plus
a few ulps; forward and the gradient of every input. Dropout draws the same counter-based bits on
both backends, so dropout cases are compared directly too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, within_rule

from bertfast import ops
from bertfast.ops import rng

NAMES = ("word_weight", "position_weight", "token_type_weight", "norm_weight", "norm_bias", "projection_weight",
         "projection_bias", "inputs_embeds")


def make_inputs(B, T, E, H=None, vocab=1000, types=2, positions=None, dtype=torch.float32, seed=0, embeds=False,
                padding_idx=0, roberta=False):
    """Ids (padding id used in row 0), tables, LayerNorm and projection parameters (float64 values
    rounded to ``dtype``); RoBERTa: (B, T) positions from position_padding_idx + 1, padding at 1."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    ids = torch.randint(0, vocab, (B, T), generator=g)
    if padding_idx is not None:
        ids[0, -1] = padding_idx
        if T > 2:
            ids[0, 1] = padding_idx  # the padding row used twice, still no gradient
    if roberta:
        real = (ids != padding_idx).long()
        position_ids = torch.cumsum(real, 1) * real + padding_idx  # padding tokens get position padding_idx
        positions = positions or T + padding_idx + 1
    else:
        position_ids = torch.arange(T)[None]  # (1, T): shared by every row
        positions = positions or T + 3
    kw = {
        "input_ids": None if embeds else ids.to(DEVICE),
        "position_ids": position_ids.to(DEVICE),
        "token_type_ids": torch.randint(0, types, (B, T), generator=g).to(DEVICE),
        "word_weight": randn(vocab, E), "position_weight": randn(positions, E), "token_type_weight": randn(types, E),
        "norm_weight": (1.0 + 0.1 * torch.randn(E, generator=g, dtype=torch.float64)).to(DEVICE, dtype),
        "norm_bias": randn(E, scale=0.1),
        "projection_weight": randn(H, E, scale=E**-0.5) if H else None,
        "projection_bias": randn(H, scale=0.1) if H else None,
        "inputs_embeds": randn(B, T, E) if embeds else None,
    }
    options = {"padding_idx": padding_idx, "position_padding_idx": padding_idx if roberta else None}
    return kw, options


def run(kw, options, backend, dout, dtype=None, **extra):
    """Output and the gradient of every float input (None where absent), in ``dtype`` (default: as given)."""
    tensors = {k: v.detach().to(dtype or v.dtype).requires_grad_() if v is not None and v.is_floating_point() else v
               for k, v in kw.items()}
    out = ops.embedding(tensors["input_ids"], tensors["position_ids"], tensors["token_type_ids"],
                        *(tensors[n] for n in NAMES[:5]), projection_weight=tensors["projection_weight"],
                        projection_bias=tensors["projection_bias"], inputs_embeds=tensors["inputs_embeds"],
                        backend=backend, **options, **extra)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [None if tensors[n] is None else tensors[n].grad for n in NAMES]


def compare(kw, options, dtype, **extra):
    """Kernel and torch backend in ``dtype`` vs the torch backend in float64: output, every gradient."""
    B, T = kw["token_type_ids"].shape
    width = kw["word_weight"].shape[1] if kw["projection_weight"] is None else kw["projection_weight"].shape[0]
    dout = torch.randn(B, T, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    ref = run(kw, options, "torch", dout, torch.float64, **extra)
    same = run(kw, options, "torch", dout, **extra)
    kernel = run(kw, options, "triton", dout, **extra)
    for what, r, t, k in zip(("out",) + NAMES, ref, same, kernel, strict=True):
        assert (r is None) == (k is None), what
        if r is not None:
            within_rule(k, t, r, what)
    return kernel


def assert_padding_rows_get_no_gradient(grads, options, kw):
    if kw["input_ids"] is not None and options["padding_idx"] is not None:
        assert (grads[1][options["padding_idx"]] == 0).all()
    if options["position_padding_idx"] is not None:
        assert (grads[2][options["position_padding_idx"]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,E,H,vocab,dropout", [
    (1, 1, 40, 96, 1000, 0.0),  # one token
    (1, 7, 40, 1000, 30522, 0.2),  # few tokens, wide H: the forward splits the columns into groups
    (7, 165, 96, 96, 1000, 0.1),  # 1155 tokens: many token blocks, split token loops for dP
])
def test_projected_matches_torch(dtype, B, T, E, H, vocab, dropout):
    kw, options = make_inputs(B, T, E, H, vocab=vocab, dtype=dtype, seed=T)
    grads = compare(kw, options, dtype, dropout_p=dropout, seed=11)
    assert_padding_rows_get_no_gradient(grads, options, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,E,dropout", [
    (1, 7, 768, 0.1),  # BERT base width
    (3, 5, 1000, 0.0),  # not a power of two: 24 masked columns in a 1024 tile
    (1, 1151, 96, 0.3),  # 1151 tokens (prime): a ragged last block
])
def test_unprojected_matches_torch(dtype, B, T, E, dropout):
    kw, options = make_inputs(B, T, E, dtype=dtype, seed=E)
    grads = compare(kw, options, dtype, dropout_p=dropout, seed=3)
    assert_padding_rows_get_no_gradient(grads, options, kw)


@pytest.mark.parametrize("H", [None, 96])
def test_inputs_embeds_gradient(H):
    kw, options = make_inputs(3, 9, 40, H, embeds=True, seed=5)
    compare(kw, options, torch.float32, dropout_p=0.25, seed=2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_roberta_positions_padding_rows_get_no_gradient(deterministic):
    """(B, T) positions counted from padding_idx + 1, padding tokens at position padding_idx (= 1),
    one token type; the padding rows of both tables get exactly zero gradient."""
    kw, options = make_inputs(4, 11, 40, 96, types=1, padding_idx=1, roberta=True, seed=8)
    assert (kw["position_ids"] == 1).any()
    grads = compare(kw, options, torch.float32, deterministic=deterministic)
    assert_padding_rows_get_no_gradient(grads, options, kw)


@pytest.mark.parametrize("H", [None, 96])
def test_deterministic_is_bitwise_repeatable_and_agrees_with_atomics(H):
    # Four ids (one of them padding) over 165 tokens: runs of equal ids longer than the segment
    # kernel's BLOCK_Q (32), and positions shared by 5 rows.
    kw, options = make_inputs(5, 33, 40, H, vocab=4, seed=4)
    from bertfast.kernels.embedding import SEGMENT_BLOCK_Q

    assert torch.bincount(kw["input_ids"].flatten()).max() > SEGMENT_BLOCK_Q
    dout = torch.randn(5, 33, H or 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    first = run(kw, options, "triton", dout, dropout_p=0.1, seed=9, deterministic=True)
    second = run(kw, options, "triton", dout, dropout_p=0.1, seed=9, deterministic=True)
    for what, a, b in zip(("out",) + NAMES, first, second, strict=True):
        assert (a is None and b is None) or torch.equal(a, b), what
    ref = run(kw, options, "torch", dout, torch.float64, dropout_p=0.1, seed=9)
    same = run(kw, options, "torch", dout, dropout_p=0.1, seed=9)
    atomic = run(kw, options, "triton", dout, dropout_p=0.1, seed=9, deterministic=False)
    for what, r, t, d, a in zip(("out",) + NAMES, ref, same, first, atomic, strict=True):
        if r is not None:
            within_rule(d, t, r, f"deterministic {what}")
            within_rule(a, t, r, f"atomic {what}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_drops_the_torch_backend_elements(dtype):
    """Without a projection the kernel's zeros are exactly rng.keep_mask's dropped elements of the
    (B * T, E) rows, and both backends agree; a seed repeats, another seed changes the mask."""
    B, T, E, p = 3, 13, 96, 0.3
    kw, _ = make_inputs(B, T, E, dtype=dtype, padding_idx=None, seed=6)
    args = [kw[k] for k in ("input_ids", "position_ids", "token_type_ids")] + [kw[n] for n in NAMES[:5]]
    out = ops.embedding(*args, dropout_p=p, seed=1234, backend="triton")
    ref = ops.embedding(*args, dropout_p=p, seed=1234, backend="torch")
    keep = rng.keep_mask(torch.tensor([1234], device=DEVICE), 1, B * T, E, p).view(B, T, E)
    assert torch.equal(out != 0, keep) and torch.equal(ref != 0, keep)
    assert torch.equal(out, ops.embedding(*args, dropout_p=p, seed=1234, backend="triton"))
    assert not torch.equal(out, ops.embedding(*args, dropout_p=p, seed=1235, backend="triton"))
    torch.manual_seed(0)
    a = ops.embedding(*args, dropout_p=p, backend="triton")
    torch.manual_seed(0)
    assert torch.equal(a, ops.embedding(*args, dropout_p=p, backend="triton"))


def test_launcher_configs_and_zero_variance_rows():
    """Other tile shapes (several column groups per token block, a single-column dP split) give the
    torch result; constant rows (zero variance) stay finite."""
    from bertfast.kernels.embedding import Config, embedding_bwd, embedding_fwd

    kw, _ = make_inputs(2, 7, 40, 96, vocab=30, seed=2)
    kw["word_weight"][5] = 0.0
    kw["input_ids"][1, :3] = 5
    kw["position_weight"].zero_()
    kw["token_type_weight"].zero_()  # tokens with id 5: x = 0, variance 0
    args = (kw["input_ids"], kw["position_ids"], kw["token_type_ids"], *(kw[n] for n in NAMES[:5]))
    out, mean, rstd = embedding_fwd(*args, 1e-12, projection_weight=kw["projection_weight"],
                                    projection_bias=kw["projection_bias"], config=Config(16, 16, 4))
    expected = ops.embedding(*args, projection_weight=kw["projection_weight"], projection_bias=kw["projection_bias"],
                             eps=1e-12, backend="torch")
    within_rule(out.view(expected.shape), expected, expected.double(), "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = embedding_bwd(dout, *args, mean, rstd, projection_weight=kw["projection_weight"],
                          projection_bias=kw["projection_bias"], configs=(Config(16, 16, 4), Config(16, 16, 4)))
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert torch.isfinite(rstd).all() and (mean.view(2, 7)[1, :3] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_strided_inputs_give_the_contiguous_results(deterministic):
    """Views with a row stride (tables sliced from wider ones, every other id column) are read in
    place; transposed tables are copied. Same values, same results, bit for bit."""
    kw, options = make_inputs(3, 8, 40, 96, vocab=60, seed=12)
    dout = torch.randn(3, 8, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    contiguous = run(kw, options, "triton", dout, deterministic=deterministic, dropout_p=0.2, seed=1)
    strided = dict(kw)
    wide = torch.zeros(60, 45, dtype=kw["word_weight"].dtype, device=DEVICE)
    wide[:, 2:42] = kw["word_weight"]
    strided["word_weight"] = wide[:, 2:42]  # row stride 45
    strided["position_weight"] = kw["position_weight"].t().contiguous().t()  # column-major
    ids = torch.zeros(3, 16, dtype=torch.int64, device=DEVICE)
    ids[:, ::2] = kw["input_ids"]
    strided["input_ids"] = ids[:, ::2]  # id stride 2
    strided["projection_weight"] = kw["projection_weight"].t().contiguous().t()
    assert strided["word_weight"].stride(0) == 45 and strided["input_ids"].stride(1) == 2
    for what, a, b in zip(("out",) + NAMES, contiguous,
                          run(strided, options, "triton", dout, deterministic=deterministic, dropout_p=0.2, seed=1),
                          strict=True):
        assert (a is None and b is None) or torch.equal(a, b), what


@pytest.mark.skipif(DEVICE == "cpu" and not hasattr(torch, "get_autocast_dtype"), reason="no autocast dtype query")
def test_autocast_projection_runs_in_the_autocast_dtype():
    """float32 parameters under autocast: the projection's dot and output in the autocast dtype, as
    F.linear under autocast; the gradients in the parameters' float32."""
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # bfloat16 dots are broken in the interpreter
    kw, options = make_inputs(2, 9, 40, 96, seed=3)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(2, 9, 96, generator=g, dtype=torch.float64).to(DEVICE)
    ref = run(kw, options, "torch", dout, torch.float64)
    with torch.autocast(DEVICE, dtype=half):
        same = run(kw, options, "torch", dout)
        kernel = run(kw, options, "triton", dout)
    assert kernel[0].dtype == same[0].dtype == half
    for what, r, t, k in zip(("out",) + NAMES, ref, same, kernel, strict=True):
        if r is not None:
            assert k.dtype == t.dtype, what
            within_rule(k, t, r, what)


def test_refusals_name_the_reason_and_auto_dispatch_falls_back():
    kw, _ = make_inputs(1, 5, 300, 64, seed=1)
    args = [kw[k] for k in ("input_ids", "position_ids", "token_type_ids")] + [kw[n] for n in NAMES[:5]]
    with pytest.raises(ops.BackendUnavailableError, match="embedding_size must be <= 256 with a projection"):
        ops.embedding(*args, projection_weight=kw["projection_weight"], backend="triton")
    with ops.record_backends() as ran, ops.use_backend("triton", "torch"):
        ops.embedding(*args, projection_weight=kw["projection_weight"])
        ops.embedding(*args)  # E = 300 without a projection: the kernel takes it
    assert ran == [("embedding", "torch"), ("embedding", "triton")]
    mixed = list(args)
    mixed[6] = mixed[6].double()
    with torch.autocast(DEVICE, enabled=True), pytest.raises(ops.BackendUnavailableError, match="share one dtype"):
        ops.embedding(*mixed, backend="triton")
