"""bertfast.pretrain.optim: LAMB against a plain float64 reference of the paper's update and against
torch's Adam/AdamW, its two code paths, exact state_dict resume, no-decay groups, the factory, and the
warmup + linear decay schedule."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from bertfast.pretrain import optim
from bertfast.pretrain.optim import (
    Lamb,
    decay_groups,
    make_optimizer,
    warmup_linear_decay,
)

PATHS = [pytest.param(False, id="loop"), pytest.param(True, id="foreach")]


# ------------------------------------------------------------------------------------------------
# the reference: the paper's update written plainly, one tensor at a time


class ReferenceLamb:
    """You et al. 2019, Algorithm 2, per tensor: m, v moments; bias-corrected; u = m_hat /
    (sqrt(v_hat) + eps) + wd x; x -= lr * ratio * u with ratio = ||x|| / ||u|| (1 if either is 0)."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-6, bias_correction=True, max_trust_ratio=None):
        self.groups = groups  # [(params, weight_decay, adapt)]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.bias_correction, self.max_trust_ratio = bias_correction, max_trust_ratio
        self.t = 0
        self.m = {id(p): torch.zeros_like(p) for params, _, _ in groups for p in params}
        self.v = {id(p): torch.zeros_like(p) for params, _, _ in groups for p in params}

    def zero_grad(self):
        for params, _, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for params, wd, adapt in self.groups:
            for x in params:
                g = x.grad
                m = self.m[id(x)] = b1 * self.m[id(x)] + (1 - b1) * g
                v = self.v[id(x)] = b2 * self.v[id(x)] + (1 - b2) * g * g
                if self.bias_correction:
                    m = m / (1 - b1 ** self.t)
                    v = v / (1 - b2 ** self.t)
                u = m / (torch.sqrt(v) + self.eps) + wd * x
                ratio = 1.0
                if adapt:
                    w = math.sqrt(float((x.double() ** 2).sum()))
                    n = math.sqrt(float((u.double() ** 2).sum()))
                    if w > 0 and n > 0:
                        ratio = w / n
                    if self.max_trust_ratio is not None:
                        ratio = min(ratio, self.max_trust_ratio)
                x.copy_(x - self.lr * ratio * u)


def _net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_(0.0, 0.1)
    return net.to(dtype)


_GEN = torch.Generator().manual_seed(1)
_X = torch.randn(32, 6, generator=_GEN, dtype=torch.float64)
_Y = torch.randn(32, 3, generator=_GEN, dtype=torch.float64)


def _loss(net: nn.Module) -> torch.Tensor:
    dtype = next(net.parameters()).dtype
    return ((net(_X.to(dtype)) - _Y.to(dtype)) ** 2).mean()


def _train(net: nn.Module, opt, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(net)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _reference_groups(net: nn.Module, weight_decay: float):
    return [(g["params"], g["weight_decay"], g.get("adapt", True)) for g in decay_groups(net, weight_decay)]


def _max_error(net: nn.Module, ref: nn.Module) -> float:
    return max((p.double() - r.double()).abs().max().item() for p, r in zip(net.parameters(), ref.parameters()))


# ------------------------------------------------------------------------------------------------
# the update


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_matches_reference_float64(foreach, bias_correction):
    """30 steps, two groups (decay / no-decay-no-adapt): equal to the reference to float64 round-off."""
    net, ref = _net(), _net()
    opt = Lamb(decay_groups(net, 0.05), lr=0.02, betas=(0.9, 0.99), eps=1e-6, foreach=foreach,
               bias_correction=bias_correction)
    ref_opt = ReferenceLamb(_reference_groups(ref, 0.05), lr=0.02, betas=(0.9, 0.99), eps=1e-6,
                            bias_correction=bias_correction)
    _train(net, opt, 30)
    _train(ref, ref_opt, 30)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["adapt"] is False
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
    assert _max_error(net, _net()) > 0.05  # the parameters did move


@pytest.mark.parametrize("foreach", PATHS)
def test_float32_within_rounding_of_reference(foreach):
    """float32 LAMB vs the float64 reference: at most 2x the error of the plain reference run in
    float32 (the same formulas, float32 round-off), plus a small atol."""
    ref64 = _net()
    _train(ref64, ReferenceLamb(_reference_groups(ref64, 0.05), lr=0.02), 30)
    ref32 = _net(torch.float32)
    _train(ref32, ReferenceLamb(_reference_groups(ref32, 0.05), lr=0.02), 30)
    net = _net(torch.float32)
    _train(net, Lamb(decay_groups(net, 0.05), lr=0.02, foreach=foreach), 30)
    bound = 2 * _max_error(ref32, ref64) + 1e-7  # atol: about 2 float32 ulps of the ~0.5 params
    assert _max_error(net, ref64) <= bound


def test_loop_and_foreach_agree_mixed_dtypes_and_skipped_grads():
    """One group with float64, float32 and bfloat16 tensors (foreach buckets by dtype), some
    gradients None on some steps (per-tensor steps differ): both paths agree after 20 steps."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (7,), (3, 4, 2), (11,), (6, 6)]
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float32, torch.float64]
    start = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    runs = {}
    for foreach in (False, True):
        params = [nn.Parameter(x.clone()) for x in start]
        opt = Lamb(params, lr=0.01, weight_decay=0.1, foreach=foreach)
        grads = torch.Generator().manual_seed(4)
        for step in range(20):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=grads, dtype=torch.float64).to(p.dtype)
                p.grad = None if (step + i) % 4 == 0 else g
            opt.step()
        runs[foreach] = (params, opt)
    (loop, loop_opt), (fe, fe_opt) = runs[False], runs[True]
    for a, b in zip(loop, fe):
        assert a.dtype == b.dtype
        eps = torch.finfo(a.dtype).eps
        assert (a.double() - b.double()).abs().max().item() <= 4 * eps * a.double().abs().max().item()
        sa, sb = loop_opt.state[a], fe_opt.state[b]
        assert sa["step"].item() == sb["step"].item() < 20  # the skipped steps did not count
        assert sa["exp_avg"].dtype == sa["exp_avg_sq"].dtype == a.dtype  # moments in the param dtype


@pytest.mark.parametrize("foreach", PATHS)
def test_bfloat16_within_rounding_of_reference(foreach):
    """bf16 params (bf16 moments, float32 norms) vs the float64 reference on fixed gradients: at
    most 2x the error of the plain reference run in bf16, plus a small atol."""
    gen = torch.Generator().manual_seed(5)
    x0 = [torch.randn(8, 8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in x0] for _ in range(5)]

    def run(dtype, make):
        params = [nn.Parameter(x.to(dtype)) for x in x0]
        opt = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            opt.step()
        return params

    ref64 = run(torch.float64, lambda ps: ReferenceLamb([(ps, 0.01, True)], lr=0.01))
    ref16 = run(torch.bfloat16, lambda ps: ReferenceLamb([(ps, 0.01, True)], lr=0.01))
    ours = run(torch.bfloat16, lambda ps: Lamb(ps, lr=0.01, weight_decay=0.01, foreach=foreach))
    for p, r64, r16 in zip(ours, ref64, ref16):
        assert p.dtype == torch.bfloat16
        err_ref = (r16.double() - r64).abs().max().item()
        assert (p.double() - r64).abs().max().item() <= 2 * err_ref + 1e-6


def _one_step(x0: torch.Tensor, g: torch.Tensor, foreach: bool, **kwargs) -> torch.Tensor:
    x = nn.Parameter(x0.clone())
    x.grad = g.clone()
    Lamb([x], foreach=foreach, **kwargs).step()
    return x.detach()


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("scale", [100.0, 1e-3])
def test_trust_ratio_scales_the_step(foreach, scale):
    """Step 1, wd=0: u = g / (|g| + eps) elementwise, so the step is lr * (||x|| / ||u||) * u: 100x
    (or 1/1000x) the Adam step when ||x|| is 100x (1/1000x) ||u||."""
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(64, generator=gen, dtype=torch.float64)
    x0 = torch.full((64,), scale, dtype=torch.float64)
    u = g / (g.abs() + 1e-6)
    ratio = x0.norm().item() / u.norm().item()
    assert ratio == pytest.approx(scale, rel=1e-3)
    got = _one_step(x0, g, foreach, lr=1e-3, weight_decay=0.0)
    torch.testing.assert_close(got, x0 - 1e-3 * ratio * u, rtol=1e-14, atol=0)
    adam = _one_step(x0, g, foreach, lr=1e-3, weight_decay=0.0, max_trust_ratio=None)
    torch.testing.assert_close(adam, got)  # max_trust_ratio=None leaves the ratio unclamped
    clamped = _one_step(x0, g, foreach, lr=1e-3, weight_decay=0.0, max_trust_ratio=10.0)
    torch.testing.assert_close(clamped, x0 - 1e-3 * min(ratio, 10.0) * u, rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", PATHS)
def test_zero_param_and_zero_grad_use_ratio_one(foreach):
    """||x|| = 0 (a zero-initialized bias): ratio 1, x = -lr u. ||u|| = 0 too (zero grad, wd=0):
    x stays 0, no NaN."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(10, generator=gen, dtype=torch.float64)
    zero = torch.zeros(10, dtype=torch.float64)
    got = _one_step(zero, g, foreach, lr=0.1, weight_decay=0.01)
    torch.testing.assert_close(got, -0.1 * g / (g.abs() + 1e-6), rtol=1e-14, atol=0)
    assert torch.equal(_one_step(zero, zero, foreach, lr=0.1, weight_decay=0.0), zero)
    # ||x|| > 0, ||u|| = 0: ratio 1 as well (and the step is zero)
    ones = torch.ones(10, dtype=torch.float64)
    assert torch.equal(_one_step(ones, zero, foreach, lr=0.1, weight_decay=0.0), ones)


@pytest.mark.parametrize("foreach", PATHS)
def test_lowers_the_loss(foreach):
    net = _net(torch.float32)
    losses = _train(net, Lamb(decay_groups(net, 0.01), lr=0.02, foreach=foreach), 60)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_adaptation_equals_torch_adam_adamw(foreach, weight_decay):
    """adapt=False: x -= lr (m_hat / (sqrt(v_hat) + eps) + wd x), which is torch's Adam (wd=0) and
    AdamW (decoupled wd) with the same eps."""
    net, ref = _net(), _net()
    opt = Lamb([{"params": net.parameters(), "adapt": False}], lr=0.01, eps=1e-6, weight_decay=weight_decay,
               foreach=foreach)
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref_opt = cls(ref.parameters(), lr=0.01, eps=1e-6, weight_decay=weight_decay, foreach=False)
    _train(net, opt, 20)
    _train(ref, ref_opt, 20)
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", PATHS)
def test_state_dict_round_trip_is_exact(foreach):
    """5 steps, save (through torch.save, weights_only load), a new optimizer loads it, 5 more steps:
    identical to 10 uninterrupted steps."""
    def make(net):
        return Lamb(decay_groups(net, 0.05), lr=0.02, foreach=foreach, max_trust_ratio=5.0)

    straight = _net(torch.float32)
    straight_opt = make(straight)
    _train(straight, straight_opt, 10)

    first = _net(torch.float32)
    opt = make(first)
    _train(first, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _net(torch.float32)
    resumed.load_state_dict(saved["model"])
    new_opt = make(resumed)
    new_opt.load_state_dict(saved["optim"])
    assert new_opt.state[next(resumed.parameters())]["step"].dtype == torch.float32
    _train(resumed, new_opt, 5)

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(straight_opt.state[p][key], new_opt.state[q][key])
    assert straight_opt.state[next(straight.parameters())]["step"].item() == 10


def test_int_step_in_state_is_accepted():
    net = _net()
    opt = Lamb(net.parameters(), lr=0.01)
    _train(net, opt, 3)
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():
        s["step"] = int(s["step"].item())
    other = _net()
    other.load_state_dict(net.state_dict())
    reloaded = Lamb(other.parameters(), lr=0.01)
    reloaded.load_state_dict(state)
    _train(net, opt, 2)
    _train(other, reloaded, 2)
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_default_path_on_cpu_is_the_loop(monkeypatch):
    called = []
    monkeypatch.setattr(optim, "_lamb_loop", lambda *a, **k: called.append("loop"))
    monkeypatch.setattr(optim, "_lamb_foreach", lambda *a, **k: called.append("foreach"))
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    Lamb([p]).step()
    Lamb([p], foreach=True).step()
    Lamb([p], foreach=False).step()
    assert called == ["loop", "foreach", "loop"]


def test_closure_grad_none_and_bad_grads():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = Lamb([a, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert torch.equal(b, torch.ones(3)) and b not in opt.state  # grad None: skipped
    assert not torch.equal(a, torch.ones(3))

    s = nn.Parameter(torch.ones(4))
    s.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lamb([s]).step()
    with pytest.raises(TypeError, match="complex"):
        Lamb([nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="complex"):
        Lamb([nn.Parameter(torch.ones(2))]).add_param_group({"params": [torch.ones(2, dtype=torch.complex128)]})


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"max_trust_ratio": 0.0}, "max_trust_ratio"),
    ({"lr": float("nan")}, "lr"),
])
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Lamb([nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_group_arguments():
    opt = Lamb([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match=r"param_groups\[1\] weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": -1.0})
    with pytest.raises(TypeError, match=r"param_groups\[1\] adapt"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "adapt": "no"})
    assert len(opt.param_groups) == 1  # rejected groups are not kept


# ------------------------------------------------------------------------------------------------
# groups, factory, schedule


class _PairNorm(nn.Module):
    """A norm layer whose weight has rank 2: no decay because it is a norm's, not because of its rank."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 4))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.0))  # rank 0
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.embed.weight  # tied
        self.pair = _PairNorm()


def test_decay_groups_split_and_tied_once():
    model = _Tied()
    groups = decay_groups(model, 0.02)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}, {"params", "weight_decay", "adapt"}]
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.02
    assert no_decay["weight_decay"] == 0.0 and no_decay["adapt"] is False

    def ids(params):
        return [id(p) for p in params]

    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight])  # tied embedding once
    # named_parameters order: a module's own parameters before its children's
    assert ids(no_decay["params"]) == ids([model.scale, model.norm.weight, model.norm.bias, model.rms.weight,
                                           model.proj.bias, model.decoder.bias, model.pair.weight])
    every = decay["params"] + no_decay["params"]
    assert len(set(map(id, every))) == len(every) == sum(1 for p in model.parameters() if p.requires_grad)


def test_decay_groups_leave_out_empty_groups_and_check_arguments():
    groups = decay_groups(nn.LayerNorm(4), 0.1)
    assert len(groups) == 1 and groups[0]["adapt"] is False
    assert decay_groups(nn.Linear(3, 3, bias=False), 0.1)[0]["weight_decay"] == 0.1
    assert decay_groups(nn.Linear(3, 3).requires_grad_(False), 0.1) == []
    with pytest.raises(ValueError, match="weight_decay"):
        decay_groups(nn.Linear(2, 2), -0.5)
    with pytest.raises(TypeError, match="model"):
        decay_groups([nn.Parameter(torch.ones(2))], 0.1)


def test_make_optimizer():
    model = _Tied()
    adamw = make_optimizer("adamw", model, lr=1e-3, weight_decay=0.05, eps=1e-8)
    assert type(adamw) is torch.optim.AdamW
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert all("adapt" not in g and not g["fused"] and g["eps"] == 1e-8 for g in adamw.param_groups)
    lamb = make_optimizer("LAMB", model, lr=2e-3, betas=(0.8, 0.9))
    assert type(lamb) is Lamb
    assert [(g["weight_decay"], g["adapt"], g["foreach"]) for g in lamb.param_groups] == [(0.01, True, None),
                                                                                         (0.0, False, None)]
    assert lamb.param_groups[0]["betas"] == (0.8, 0.9) and lamb.param_groups[0]["lr"] == 2e-3
    with pytest.raises(ValueError, match=r"optimizer: unknown 'sgd'.*adamw, lamb"):
        make_optimizer("sgd", model, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer("lamb", model, lr=-1.0)
    with pytest.raises(ValueError, match="model"):
        make_optimizer("adamw", nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


def _lrs(optimizer, scheduler, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_linear_decay_values():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=2.0)
    sched = warmup_linear_decay(opt, warmup_steps=4, total_steps=10)
    factors = [0, 1 / 4, 2 / 4, 3 / 4, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0]
    assert _lrs(opt, sched, 12) == [2.0 * f for f in factors]
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    assert _lrs(opt, warmup_linear_decay(opt, 0, 4), 5) == [1.0, 3 / 4, 2 / 4, 1 / 4, 0.0]
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    assert _lrs(opt, warmup_linear_decay(opt, 3, 3), 5) == [0.0, 1 / 3, 2 / 3, 0.0, 0.0]


def test_warmup_linear_decay_resumes_exactly():
    def make():
        model = _net(torch.float32)
        opt = make_optimizer("lamb", model, lr=0.01)
        return model, opt, warmup_linear_decay(opt, 3, 20)

    _, opt, sched = make()
    straight = _lrs(opt, sched, 12)
    _, opt, sched = make()
    _lrs(opt, sched, 6)
    buffer = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # no functions in the scheduler's state
    assert saved["sched"]["lr_lambdas"][0] == {"warmup_steps": 3, "total_steps": 20}
    _, opt, sched = make()
    opt.load_state_dict(saved["optim"])
    sched.load_state_dict(saved["sched"])
    assert _lrs(opt, sched, 6) == straight[6:]
    assert [g["lr"] for g in opt.param_groups] == [0.01 * (20 - 12) / 17] * 2


@pytest.mark.parametrize("args, error, name", [
    ((-1, 10), ValueError, "warmup_steps"),
    ((0, 0), ValueError, "total_steps"),
    ((11, 10), ValueError, "warmup_steps"),
    ((1.5, 10), TypeError, "warmup_steps"),
    ((1, True), TypeError, "total_steps"),
])
def test_warmup_linear_decay_bad_arguments(args, error, name):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(error, match=name):
        warmup_linear_decay(opt, *args)


def test_warmup_linear_decay_needs_an_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        warmup_linear_decay([nn.Parameter(torch.ones(1))], 1, 2)


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_foreach_matches_cpu_loop_without_syncs():
    cpu = _net(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    cpu_opt = Lamb(decay_groups(cpu, 0.05), lr=0.02, foreach=False)
    gpu_opt = make_optimizer("lamb", gpu, lr=0.02, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-6)
    assert all(g["foreach"] is True for g in gpu_opt.param_groups)
    x, y = _X.float(), _Y.float()
    for _ in range(20):
        for net, opt, device in ((cpu, cpu_opt, "cpu"), (gpu, gpu_opt, "cuda")):
            opt.zero_grad()
            ((net(x.to(device)) - y.to(device)) ** 2).mean().backward()
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                opt.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-4, atol=1e-5)
    adamw = make_optimizer("adamw", gpu, lr=1e-3)
    assert all(g["fused"] for g in adamw.param_groups)
