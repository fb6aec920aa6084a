"""generator_sample (the ELECTRA generator step) on its torch backend, plain CPU.

The samples follow softmax(logits / temperature) (a chi-square test over many rows with identical
logits); the corruption and replaced-token labels follow their definition; the loss is mlm_loss's;
bad input is refused naming the argument before any backend runs. The fused custom op it shares
with mlm_loss passes torch.library's checks on its torch form, whose hand-written backward matches
autograd. The triton backend is compared with this one in tests/triton_kernels/test_vocab_loss_kernel.py.
"""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast.ops import dispatch
from bertfast.ops.generator_sample import generator_sample
from bertfast.ops.mlm_loss import (_fused_torch, _fused_torch_backward, head_logits_torch, mlm_loss,
                                   vocab_cross_entropy)
from bertfast.ops.sample_tokens import sample_tokens

META = torch.device("meta")
B, T, H, E, V = 3, 8, 12, 10, 17


def problem(B=B, T=T, H=H, E=E, V=V, rate=0.4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    input_ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T // 2:] = 0
    chosen = (torch.rand(B, T, generator=g) < rate) & mask.bool()
    chosen[0, 0] = True
    labels = torch.where(chosen, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))
    params = dict(dense_weight=randn(E, H, scale=H**-0.5), dense_bias=randn(E, scale=0.1),
                  norm_weight=1.0 + randn(E, scale=0.1), norm_bias=randn(E, scale=0.1),
                  decoder_weight=randn(V, E, scale=0.5), decoder_bias=randn(V, scale=0.2))
    return dict(hidden=randn(B, T, H), labels=labels, input_ids=input_ids, **params), mask


def head_logits(kw):
    selected = kw["labels"] != -100
    return head_logits_torch(kw["hidden"][selected], kw["dense_weight"], kw["dense_bias"], kw["norm_weight"],
                             kw["norm_bias"], kw["decoder_weight"], kw["decoder_bias"], "none", 1e-12)


# ------------------------------------------------------------------------------------------------
# The distribution of the samples

# chi-square critical values at alpha = 1e-3, by degrees of freedom (tables; no scipy here)
CHI2_CRITICAL_1E3 = {9: 27.877}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_samples_follow_softmax_over_temperature(temperature):
    # 20000 masked positions with one hidden state: 20000 draws from one distribution over 10 tokens.
    kw, _ = problem(B=40, T=500, H=6, E=8, V=10, seed=1)
    kw["hidden"] = kw["hidden"][:1, :1].expand(40, 500, 6).contiguous()
    kw["labels"] = torch.zeros(40, 500, dtype=torch.long)
    kw["decoder_weight"] = kw["decoder_weight"] * 0.1  # logits near the bias: a spread every cell can sample
    kw["decoder_bias"] = torch.tensor([0.9, 0.0, -0.5, 0.3, -1.0, 0.6, 0.1, -0.2, 0.4, -0.7])
    _, corrupted, _ = generator_sample(**kw, seed=2024, temperature=temperature, backend="torch")
    n = corrupted.numel()
    counts = torch.bincount(corrupted.flatten(), minlength=10).double()
    logits = head_logits(kw)[0].double()
    probs = torch.softmax(logits / temperature, -1)
    expected = probs * n
    assert expected.min() > 20, "every cell needs a sizeable expectation for the chi-square approximation"
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 <= CHI2_CRITICAL_1E3[9], (chi2, counts.tolist(), expected.tolist())
    # and it is a real test: the same counts against the untempered distribution fail it
    wrong = torch.softmax(logits, -1) * n
    assert float(((counts - wrong) ** 2 / wrong).sum()) > CHI2_CRITICAL_1E3[9]


# ------------------------------------------------------------------------------------------------
# Loss, corruption, replaced labels, seeds


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_outputs_follow_their_definition(temperature):
    kw, mask = problem(seed=3)
    loss, corrupted, replaced = generator_sample(**kw, attention_mask=mask, seed=5, temperature=temperature,
                                                 backend="torch")
    selected = kw["labels"] != -100
    # the loss is the mean MLM loss
    expected_loss = mlm_loss(kw["hidden"], kw["labels"], *(kw[n] for n in list(kw)[3:]), backend="torch")
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    # the samples are sample_tokens' on the masked positions' logits, same seed
    sampled = sample_tokens(head_logits(kw), seed=5, temperature=temperature, backend="torch")
    assert torch.equal(corrupted[selected], sampled)
    assert torch.equal(corrupted[~selected], kw["input_ids"][~selected])
    assert corrupted.dtype == kw["input_ids"].dtype and replaced.dtype == torch.bool
    original = torch.where(selected, kw["labels"], kw["input_ids"])
    assert torch.equal(replaced, (corrupted != original) & mask.bool())
    assert not replaced[~selected].any() and not replaced[~mask.bool()].any()


def test_seeds_and_global_generator():
    kw, mask = problem(B=4, T=30, V=50, rate=0.5, seed=4)
    a = generator_sample(**kw, seed=1, backend="torch")[1]
    assert torch.equal(a, generator_sample(**kw, seed=1, backend="torch")[1])
    assert torch.equal(a, generator_sample(**kw, seed=torch.tensor([1]), backend="torch")[1])
    assert not torch.equal(a, generator_sample(**kw, seed=2, backend="torch")[1])
    torch.manual_seed(8)
    c = generator_sample(**kw, backend="torch")[1]
    torch.manual_seed(8)
    assert torch.equal(c, generator_sample(**kw, backend="torch")[1])


def test_gradient_flows_through_the_loss_only():
    kw, mask = problem(seed=6, dtype=torch.float64)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if v.is_floating_point()}
    loss, corrupted, replaced = generator_sample(**kw, attention_mask=mask, seed=0, backend="torch")
    assert not corrupted.requires_grad and not replaced.requires_grad
    grads = torch.autograd.grad(loss, list(leaves.values()))
    names = list(leaves)
    expected = torch.autograd.grad(mlm_loss(*(kw[n] for n in ("hidden", "labels")), *(kw[n] for n in names[1:]),
                                            backend="torch"), list(leaves.values()))
    for name, g, e in zip(names, grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


def test_no_masked_token_gives_zero_loss_and_no_replacement():
    kw, mask = problem(seed=7)
    kw["labels"] = torch.full((B, T), -100)
    kw["hidden"].requires_grad_()
    loss, corrupted, replaced = generator_sample(**kw, attention_mask=mask, seed=0, backend="torch")
    assert loss.shape == () and float(loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(loss, kw["hidden"])
    assert (grad == 0).all()
    assert torch.equal(corrupted, kw["input_ids"]) and not replaced.any()


# ------------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, before any backend runs


def _with(**changes):
    kw, mask = problem(seed=9)
    kw.update(attention_mask=mask, seed=0)
    kw.update(changes)
    return kw


BAD = [
    ("hidden", dict(hidden=torch.randn(B * T, H))),
    ("labels", dict(labels=torch.zeros(B, T + 1, dtype=torch.long))),
    ("labels", dict(labels=torch.full((B, T), V))),  # outside the vocabulary
    ("labels", dict(labels=torch.zeros(B, T))),  # float
    ("input_ids", dict(input_ids=torch.zeros(B, T))),  # float
    ("input_ids", dict(input_ids=torch.zeros(B, T - 1, dtype=torch.long))),
    ("input_ids", dict(input_ids=torch.zeros(B, T, dtype=torch.long, device=META))),
    ("attention_mask", dict(attention_mask=torch.ones(B, T + 1, dtype=torch.bool))),
    ("attention_mask", dict(attention_mask=torch.ones(B, T))),  # float
    ("dense_weight", dict(dense_weight=torch.randn(E, H + 1))),
    ("decoder_weight", dict(decoder_weight=torch.randn(V, E + 1))),
    ("decoder_bias", dict(decoder_bias=torch.randn(V + 1))),
    ("norm_weight", dict(norm_weight=torch.randn(E - 1))),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=float("nan"))),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed=torch.tensor([1, 2]))),
    ("approximate", dict(approximate="sigmoid")),
]


@pytest.mark.parametrize("arg,changes", BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(arg, changes):
    with bertfast.record_backends() as trace, pytest.raises((TypeError, ValueError), match=rf"`{arg}`"):
        generator_sample(**_with(**changes))
    assert trace == []


def test_triton_refuses_cpu_tensors_and_says_why():
    with pytest.raises(dispatch.BackendUnavailableError, match="generator_sample") as info:
        generator_sample(**_with(), backend="triton")
    assert "triton:" in str(info.value) and "torch: not requested" in str(info.value)


# ------------------------------------------------------------------------------------------------
# The fused custom op (decoder + cross-entropy + sampling) shared with mlm_loss


def _fused_args(dtype=torch.float64, seed=None, eps=0.1):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 5, generator=g, dtype=dtype)
    w = torch.randn(9, 5, generator=g, dtype=dtype)
    b = torch.randn(9, generator=g, dtype=dtype)
    t = torch.randint(0, 9, (6,), generator=g)
    return h, w, b, t, eps, seed


def test_fused_op_torch_form_passes_opcheck():
    h, w, b, t, eps, _ = _fused_args(torch.float32)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, eps, torch.tensor([4]), 0.8, "torch")
    torch.library.opcheck(vocab_cross_entropy, args)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_op_torch_form_matches_cross_entropy_and_autograd(eps):
    h, w, b, t, _, _ = _fused_args()
    loss, lse, samples = _fused_torch(h, w, b, t, eps, None, 1.0)
    logits = torch.nn.functional.linear(h, w, b)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, t, reduction="none",
                                                                       label_smoothing=eps))
    torch.testing.assert_close(lse, logits.logsumexp(-1))
    assert samples.shape == (0,)
    grad = torch.randn(6, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    expected = torch.autograd.grad((_fused_torch(*leaves, t, eps, None, 1.0)[0] * grad).sum(), leaves)
    for got, want in zip(_fused_torch_backward(grad, h, w, b, t, lse, eps), expected, strict=True):
        torch.testing.assert_close(got, want)
