"""The fused decoder + cross-entropy (+ Gumbel-max sampling) kernels against the torch backends.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md): the kernel's error
against the float64 reference is at most 2x the torch backend's error in the same dtype, plus a few
ulps. Through the ops (``mlm_loss``, ``generator_sample``) every gradient is compared: hidden, the
head's dense and LayerNorm parameters, the decoder weight and bias. Sampling draws the same
counter-based noise in both backends, so the tokens are compared directly: they must be equal
except where two tokens' scores tie to within the logits' round-off.

The interpreter runs each (row block, vocabulary chunk) step in Python, so the shapes are picked to
keep this file near a minute: the many-row case (1151) has a small vocabulary, the 30522 vocabulary
few rows (and, at kernel level, wide explicit tiles).
"""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import ops
from bertfast.kernels import vocab_loss as K
from bertfast.ops.generator_sample import generator_sample
from bertfast.ops.mlm_loss import _fused_torch, _fused_torch_backward, head_logits_torch, vocab_cross_entropy
from bertfast.ops.sample_tokens import gumbel_uniforms
from kernel_helpers import DEVICE, DTYPES, max_error, within_rule

PARAMS = ("dense_weight", "dense_bias", "norm_weight", "norm_bias", "decoder_weight", "decoder_bias")


def make_problem(B, T, H, E, V, M, seed=0):
    """float64 inputs: hidden (B, T, H), labels with exactly M masked positions (row-major anywhere in
    (B, T)), input_ids, an int attention mask with padding at the end of the last row, head parameters
    scaled so the logits spread over a few units (a peaked but not one-hot softmax)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    where = torch.randperm(B * T, generator=g)[:M]
    labels.view(-1)[where] = torch.randint(0, V, (M,), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if T > 2:
        mask[-1, -2:] = 0
    params = {"dense_weight": randn(E, H, scale=H**-0.5), "dense_bias": randn(E, scale=0.1),
              "norm_weight": 1.0 + randn(E, scale=0.1), "norm_bias": randn(E, scale=0.1),
              "decoder_weight": randn(V, E, scale=0.6), "decoder_bias": randn(V, scale=0.2)}
    return randn(B, T, H), labels, input_ids, mask, params


def to(x, dtype):
    return x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)


def leaf(x, dtype):
    """A fresh leaf that requires grad (never the caller's tensor: ``to`` may return it unchanged)."""
    return to(x, dtype).detach().clone().requires_grad_()


def run_mlm(backend, dtype, hidden, labels, params, gout, **kw):
    """(loss, grads of hidden and every parameter) of ops.mlm_loss on one backend in ``dtype``."""
    leaves = [leaf(hidden, dtype)] + [leaf(params[n], dtype) for n in PARAMS]
    with bertfast.record_backends() as trace:
        loss = ops.mlm_loss(leaves[0], to(labels, None), *leaves[1:], backend=backend, **kw)
    assert trace[0] == ("mlm_loss", backend), trace
    if loss.numel() > 0:
        loss.backward(to(gout, loss.dtype) if loss.dim() else None)
    if loss.numel() > 0:
        assert all(x.grad is not None for x in leaves)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return [loss.detach()] + grads


def compare_mlm(dtype, hidden, labels, params, **kw):
    M = int((labels != -100).sum())
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(M, generator=g, dtype=torch.float64)  # used by reduction="none"
    ref = run_mlm("torch", torch.float64, hidden, labels, params, gout, **kw)
    same = run_mlm("torch", dtype, hidden, labels, params, gout, **kw)
    kernel = run_mlm("triton", dtype, hidden, labels, params, gout, **kw)
    for name, r, s, k in zip(("loss", "hidden") + PARAMS, ref, same, kernel, strict=True):
        within_rule(k, s, r, f"{name} ({dtype}, {kw})")


# ------------------------------------------------------------------------------------------------
# mlm_loss through the op: forward and every gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlm_loss_seven_rows_vocab_1000(dtype):
    hidden, labels, _, _, params = make_problem(2, 9, 64, 96, 1000, M=7, seed=1)
    compare_mlm(dtype, hidden, labels, params)


def test_mlm_loss_one_row_sum_label_smoothing():
    hidden, labels, _, _, params = make_problem(1, 5, 48, 40, 1000, M=1, seed=2)
    compare_mlm(torch.float32, hidden, labels, params, reduction="sum", label_smoothing=0.1)


def test_mlm_loss_wide_head_none_reduction():
    # E = 768: several BLOCK_K steps in every logits dot and several E blocks in both gradients
    hidden, labels, _, _, params = make_problem(2, 6, 32, 768, 300, M=7, seed=3)
    compare_mlm(torch.float16, hidden, labels, params, reduction="none", label_smoothing=0.1, approximate="tanh")


def test_mlm_loss_1151_rows():
    # Many row blocks, a ragged last one; a small vocabulary keeps the interpreter quick.
    hidden, labels, _, _, params = make_problem(3, 400, 24, 40, 150, M=1151, seed=4)
    compare_mlm(torch.float16, hidden, labels, params, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mlm_loss_without_masked_tokens(reduction):
    hidden, labels, _, _, params = make_problem(2, 5, 16, 40, 50, M=0, seed=5)
    out = run_mlm("triton", torch.float32, hidden, labels, params, torch.zeros(0), reduction=reduction)
    loss, grads = out[0], out[1:]
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and float(loss) == 0.0
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


# ------------------------------------------------------------------------------------------------
# generator_sample: the same loss, and the torch backend's tokens


def run_generator(backend, dtype, hidden, labels, input_ids, mask, params, seed, temperature=1.0):
    leaves = [leaf(hidden, dtype)] + [leaf(params[n], dtype) for n in PARAMS]
    with bertfast.record_backends() as trace:
        loss, corrupted, replaced = generator_sample(leaves[0], to(labels, None), to(input_ids, None), *leaves[1:],
                                                     attention_mask=to(mask, None), seed=seed,
                                                     temperature=temperature, backend=backend)
    assert trace[0] == ("generator_sample", backend), trace
    loss.backward()
    return loss.detach(), [x.grad for x in leaves], corrupted, replaced


def gumbel_scores(hidden, labels, params, seed, temperature):
    """float64 logits / T + the backends' Gumbel noise at the masked positions: (M, V)."""
    logits = head_logits(hidden, labels, params).cpu()
    u = gumbel_uniforms(logits.shape, "cpu", seed).double()
    return logits / temperature - torch.log(-torch.log(u))


def assert_same_tokens(kernel, expected, scores, tol):
    """Equal tokens, except where the two picks' float64 scores are within ``tol`` (a round-off tie)."""
    differ = kernel != expected
    gap = (scores.gather(1, expected[:, None]) - scores.gather(1, kernel[:, None]))[:, 0].abs()
    assert (gap[differ] <= tol).all(), f"tokens differ beyond a tie: rows {differ.nonzero()[:, 0].tolist()}"
    assert int(differ.sum()) <= max(1, 0.05 * len(differ)), f"{int(differ.sum())} of {len(differ)} tokens differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_generator_sample_matches_torch(dtype):
    hidden, labels, input_ids, mask, params = make_problem(3, 7, 40, 96, 1000, M=9, seed=6)
    labels[-1, -2:] = -100  # no label on padding
    temperature = 0.7
    ref = run_generator("torch", torch.float64, hidden, labels, input_ids, mask, params, 123, temperature)
    same = run_generator("torch", dtype, hidden, labels, input_ids, mask, params, 123, temperature)
    kernel = run_generator("triton", dtype, hidden, labels, input_ids, mask, params, 123, temperature)
    within_rule(kernel[0], same[0], ref[0], f"loss ({dtype})")
    for name, r, s, k in zip(("hidden",) + PARAMS, ref[1], same[1], kernel[1], strict=True):
        within_rule(k, s, r, f"{name} ({dtype})")

    selected = (labels != -100).to(DEVICE)
    assert torch.equal(kernel[2][~selected], to(input_ids, None)[~selected])
    scores = gumbel_scores(hidden, labels, params, 123, temperature)
    # a tie within round-off: twice the torch backend's logit error in this dtype, over T, and a few ulps
    logits_err = max_error(head_logits(hidden, labels, params, dtype).cpu(), head_logits(hidden, labels, params))
    tol = 2 * logits_err / temperature + 1e-5 * scores.abs().max().item()
    assert_same_tokens(kernel[2][selected].cpu(), same[2][selected].cpu(), scores, tol)
    original = torch.where(selected, to(labels, None), to(input_ids, None))
    assert torch.equal(kernel[3], (kernel[2] != original) & to(mask, None).bool())

    if dtype == torch.float32:
        return  # the seed checks once (the float16 launch is the quicker one under the interpreter)
    again = run_generator("triton", dtype, hidden, labels, input_ids, mask, params, 123, temperature)
    assert torch.equal(again[2], kernel[2])
    other = run_generator("triton", dtype, hidden, labels, input_ids, mask, params, 124, temperature)
    assert not torch.equal(other[2], kernel[2])


def head_logits(hidden, labels, params, dtype=torch.float64):
    """The torch backend's (M, V) logits in ``dtype``."""
    p = [to(params[n], dtype) for n in PARAMS]
    return head_logits_torch(to(hidden, dtype)[to(labels, None) != -100], *p, "none", 1e-12)


def test_generator_sample_without_masked_tokens():
    hidden, labels, input_ids, mask, params = make_problem(2, 5, 16, 40, 50, M=0, seed=8)
    loss, grads, corrupted, replaced = run_generator("triton", torch.float32, hidden, labels, input_ids, mask, params,
                                                     0)
    assert float(loss) == 0.0 and all((g == 0).all() for g in grads)
    assert torch.equal(corrupted, to(input_ids, None)) and not replaced.any()


# ------------------------------------------------------------------------------------------------
# The launchers directly: every candidate config, and the 30522 vocabulary


def kernel_problem(M, E, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, E, generator=g, dtype=torch.float64)
    w = torch.randn(V, E, generator=g, dtype=torch.float64) * (2.0 / E**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, V, (M,), generator=g)
    grad = torch.randn(M, generator=g, dtype=torch.float64)
    return h, w, b, t, grad


def check_launchers(dtype, h, w, b, t, grad, eps, seed, temperature, fwd_config=None, bwd_configs=None):
    cast = [to(x, dtype) for x in (h, w, b)]
    ref = _fused_torch(h, w, b, t, eps, seed, temperature)
    same = _fused_torch(*cast, to(t, None), eps, to(seed, None), temperature)  # on the kernel's device
    loss, lse, samples = K.vocab_ce_fwd(*cast, to(t, None), eps, to(seed, None), temperature, config=fwd_config)
    within_rule(loss, same[0], ref[0], f"loss {fwd_config}")
    within_rule(lse, same[1], ref[1], f"lse {fwd_config}")
    scores = (torch.nn.functional.linear(h, w, b) / temperature
              - torch.log(-torch.log(gumbel_uniforms((h.shape[0], w.shape[0]), "cpu", seed).double())))
    logits_err = max_error(torch.nn.functional.linear(*cast).cpu(), torch.nn.functional.linear(h, w, b))
    assert_same_tokens(samples.cpu(), same[2].cpu(), scores, 2 * logits_err / temperature + 1e-5 * scores.abs().max())

    ref_grads = _fused_torch_backward(grad, h, w, b, t, ref[1], eps)
    same_grads = _fused_torch_backward(to(grad, torch.float32), *cast, to(t, None), same[1], eps)
    grads = K.vocab_ce_bwd(to(grad, torch.float32), *cast, to(t, None), lse, eps, configs=bwd_configs)
    for name, r, s, k in zip(("dh", "dW", "db"), ref_grads, same_grads, grads, strict=True):
        within_rule(k, s, r, f"{name} {bwd_configs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_candidate_config(dtype):
    # E = 96: three BLOCK_K=32 steps or a ragged one of 64; two E blocks where block_e = 64.
    # V = 300: a ragged vocabulary tail in every tile width.
    h, w, b, t, grad = kernel_problem(37, 96, 300, dtype, seed=9)
    fwd = K.candidate_configs("fwd", 96, dtype)
    dh, dw = K.candidate_configs("bwd_dh", 96, dtype), K.candidate_configs("bwd_dw", 96, dtype)
    for i in range(max(len(fwd), len(dh), len(dw))):
        check_launchers(dtype, h, w, b, t, grad, 0.1, torch.tensor([i]), 1.3, fwd_config=fwd[i % len(fwd)],
                        bwd_configs=(dh[i % len(dh)], dw[i % len(dw)]))


def test_vocab_30522():
    # Wide explicit tiles (the kernel code is the same; the interpreter steps each tile in Python).
    h, w, b, t, grad = kernel_problem(7, 40, 30522, torch.float32, seed=10)
    wide = K.Config(16, 2048, 64, 64, 4, 1)
    check_launchers(torch.float32, h, w, b, t, grad, 0.0, torch.tensor([77]), 1.0, fwd_config=wide,
                    bwd_configs=(wide, wide))


# ------------------------------------------------------------------------------------------------
# The custom op's registrations, and the static report's list


def test_custom_op_registrations():
    h, w, b, t, _ = kernel_problem(5, 16, 37, torch.float32, seed=11)
    args = (leaf(h, torch.float32), leaf(w, torch.float32), leaf(b, torch.float32), to(t, None), 0.1, to(torch.tensor([3]), None), 1.0, "triton")
    torch.library.opcheck(vocab_cross_entropy, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_aot_launches_name_every_argument():
    launches = K.aot_launches()
    assert {(x.kernel_name, x.dtype) for x in launches} == {
        (k.fn.__name__ if hasattr(k, "fn") else k.__name__, d)
        for k in (K._vocab_ce_fwd_kernel, K._vocab_ce_bwd_dh_kernel, K._vocab_ce_bwd_dw_kernel)
        for d in ("float16", "bfloat16", "float32")}
    for x in launches:
        assert set(x.args) | set(x.constexprs) == set(x.kernel.arg_names), x.config
