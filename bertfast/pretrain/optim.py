"""Optimizers and the learning-rate schedule for pretraining: LAMB, AdamW/LAMB with no-decay
parameter groups, linear warmup then linear decay.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2), per parameter
tensor x with gradient g at step t (t = 1, 2, ...), per group (lr, b1, b2, eps, wd, adapt):

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                v_hat = v / (1 - b2^t)       (m, v without bias_correction)
    u = m_hat / (sqrt(v_hat) + eps) + wd x
    ratio = ||x||_2 / ||u||_2 if adapt and both norms > 0 else 1      (clamped to max_trust_ratio)
    x = x - lr ratio u

With adapt=False and wd=0 this is Adam (eps outside the square root, as torch.optim.Adam).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lamb")

__all__ = ["OPTIMIZERS", "Lamb", "WarmupLinearDecay", "decay_groups", "make_optimizer", "warmup_linear_decay"]


def _number(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name}: must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{where}{name}: must not be NaN")
    return value


def _check_hyperparameters(group: dict, where: str = "") -> None:
    """Raise ValueError/TypeError naming the first bad key of ``group`` (keys it lacks are skipped)."""
    if "lr" in group and not _number(where, "lr", group["lr"]) >= 0.0:
        raise ValueError(f"{where}lr: must be >= 0, got {group['lr']}")
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}betas: must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= _number(where, f"betas[{i}]", beta) < 1.0:
                raise ValueError(f"{where}betas[{i}]: must be in [0, 1), got {beta}")
    if "eps" in group and not _number(where, "eps", group["eps"]) > 0.0:
        raise ValueError(f"{where}eps: must be > 0, got {group['eps']}")
    if "weight_decay" in group and not _number(where, "weight_decay", group["weight_decay"]) >= 0.0:
        raise ValueError(f"{where}weight_decay: must be >= 0, got {group['weight_decay']}")
    ratio = group.get("max_trust_ratio")
    if ratio is not None and not _number(where, "max_trust_ratio", ratio) > 0.0:
        raise ValueError(f"{where}max_trust_ratio: must be > 0 or None, got {ratio}")
    for key in ("adapt", "bias_correction"):
        if key in group and not isinstance(group[key], bool):
            raise TypeError(f"{where}{key}: must be a bool, got {group[key]!r}")
    if group.get("foreach") not in (None, True, False):
        raise TypeError(f"{where}foreach: must be None or a bool, got {group['foreach']!r}")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2).

    The update is in the module docstring. Param-group keys: lr, betas, eps, weight_decay,
    bias_correction, max_trust_ratio, foreach, and ``adapt`` (default True; False = no layer-wise
    trust ratio for that group: BERT's LAMB excludes biases and LayerNorm weights from both decay
    and adaptation, see ``decay_groups``).

    State per parameter: ``step`` (float32 scalar tensor on the CPU, as torch.optim.Adam keeps it),
    ``exp_avg`` m and ``exp_avg_sq`` v (the parameter's dtype and device). Parameters whose grad is
    None are skipped (their step does not advance). ``foreach=None`` takes the foreach path when
    every parameter of a group is on CUDA, else the per-tensor loop; both compute the same
    operations in the same order, and the foreach path never synchronizes with the device.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, bias_correction: bool = True, foreach: bool | None = None,
                 max_trust_ratio: float | None = None):
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, list) else betas, "eps": eps,
                    "weight_decay": weight_decay, "bias_correction": bias_correction, "foreach": foreach,
                    "max_trust_ratio": max_trust_ratio, "adapt": True}
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's rules), then check its hyperparameters and parameter dtypes."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}] "
        try:
            _check_hyperparameters(group, where)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{where}params: Lamb does not support complex parameters ({p.dtype})")
                if not p.is_floating_point():
                    raise TypeError(f"{where}params: must be floating point, got {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _gather(self, group: dict):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            if p.is_complex():  # a parameter changed dtype after construction
                raise TypeError(f"params: Lamb does not support complex parameters ({p.dtype})")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state["step"]
            if not isinstance(step, torch.Tensor) or step.device.type != "cpu" or step.dtype != torch.float32:
                # an int step, or one moved to a device by a checkpoint loader: a CPU float32 tensor
                # again, so reading t never waits on the device
                state["step"] = step = torch.tensor(float(step), dtype=torch.float32)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(step)
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            update = _lamb_foreach if foreach else _lamb_loop
            beta1, beta2 = group["betas"]
            update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                   eps=group["eps"], weight_decay=group["weight_decay"], adapt=group["adapt"],
                   bias_correction=group["bias_correction"], max_trust_ratio=group["max_trust_ratio"])
        return loss


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # norms of bf16/fp16 tensors accumulate and are returned in float32; float64 stays float64
    return torch.promote_types(dtype, torch.float32)


def _trust_ratio(w: torch.Tensor, n: torch.Tensor, max_trust_ratio: float | None) -> torch.Tensor:
    """w / n where both norms are > 0, else 1 (elementwise over norms of any shape); on device."""
    ratio = torch.where((w > 0) & (n > 0), w / n, torch.ones_like(w))
    if max_trust_ratio is not None:
        ratio = ratio.clamp(max=max_trust_ratio)
    return ratio


def _lamb_loop(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, adapt,
               bias_correction, max_trust_ratio) -> None:
    for x, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step += 1
        m.lerp_(g, 1 - beta1)  # m + (1 - b1)(g - m), as torch's Adam
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if bias_correction:
            t = step.item()  # a CPU tensor: no device sync
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            u = (m / (1 - beta1 ** t)).div_(denom)
        else:
            u = m / v.sqrt().add_(eps)
        if weight_decay != 0:
            u.add_(x, alpha=weight_decay)
        if adapt:
            dtype = _norm_dtype(x.dtype)
            w = torch.linalg.vector_norm(x, dtype=dtype)
            n = torch.linalg.vector_norm(u, dtype=dtype)
            u.mul_(_trust_ratio(w, n, max_trust_ratio))
        x.add_(u, alpha=-lr)


def _lamb_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, adapt,
                  bias_correction, max_trust_ratio) -> None:
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for (_, dtype), index in buckets.items():
        xs = [params[i] for i in index]
        gs = [grads[i] for i in index]
        ms = [exp_avgs[i] for i in index]
        vs = [exp_avg_sqs[i] for i in index]
        ss = [steps[i] for i in index]
        torch._foreach_add_(ss, 1.0)
        # lerp, not mul_ + add_: CPU foreach mul_ rounds a scalar to bf16 (0.9 -> 0.8984)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        if bias_correction:
            ts = [s.item() for s in ss]  # CPU tensors: no device sync; steps may differ within a bucket
            denoms = torch._foreach_div(vs, [1 - beta2 ** t for t in ts])
            torch._foreach_sqrt_(denoms)
            torch._foreach_add_(denoms, eps)
            us = torch._foreach_div(ms, [1 - beta1 ** t for t in ts])
            torch._foreach_div_(us, denoms)
        else:
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_add_(denoms, eps)
            us = torch._foreach_div(ms, denoms)
        del denoms
        if weight_decay != 0:
            torch._foreach_add_(us, xs, alpha=weight_decay)
        if adapt:
            norm_dtype = _norm_dtype(dtype)
            w = torch.stack(torch._foreach_norm(xs, 2, dtype=norm_dtype))  # (len(xs),)
            n = torch.stack(torch._foreach_norm(us, 2, dtype=norm_dtype))
            torch._foreach_mul_(us, list(_trust_ratio(w, n, max_trust_ratio).unbind(0)))
        torch._foreach_add_(xs, us, alpha=-lr)


def _is_norm_layer(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm, BatchNorm*, GroupNorm, bertfast.nn.LayerNorm, ...: by class name, so
    # custom norm layers count too
    return "norm" in type(module).__name__.lower()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters into (at most) two optimizer groups:

    - ``{"params": [...], "weight_decay": weight_decay}``: tensors of rank >= 2 (matrices,
      embeddings) that do not belong to a norm layer;
    - ``{"params": [...], "weight_decay": 0.0, "adapt": False}``: biases, LayerNorm/norm weights and
      every other tensor of rank < 2 (no decay, and no LAMB trust ratio).

    Each Parameter appears once (tied weights: ``named_parameters`` removes duplicates), in
    ``named_parameters`` order; parameters with requires_grad=False are left out, and so are empty
    groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = _number("", "weight_decay", weight_decay)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    in_norm = {id(p) for module in model.modules() if _is_norm_layer(module)
               for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in in_norm else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "adapt": False})
    return groups


def _fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    return ("fused" in inspect.signature(torch.optim.AdamW).parameters
            and all(p.is_cuda and p.is_floating_point() for p in params))


def make_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float = 0.01,
                   betas=(0.9, 0.999), eps: float = 1e-6) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of ``OPTIMIZERS``) over ``decay_groups(model, weight_decay)``.

    "adamw": torch.optim.AdamW, fused when every parameter is on CUDA, else torch's default
    (foreach). "lamb": ``Lamb``, foreach when every parameter is on CUDA, else its per-tensor loop.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    _check_hyperparameters({"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
    groups = decay_groups(model, weight_decay)
    if not groups:
        raise ValueError("model: has no parameters with requires_grad=True to optimize")
    params = [p for group in groups for p in group["params"]]
    on_cuda = all(p.is_cuda for p in params)
    if key == "adamw":
        for group in groups:
            group.pop("adapt", None)  # a LAMB-only key
        extra = {"fused": True} if _fused_adamw_supported(params) else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra)
    return Lamb(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                foreach=True if on_cuda else None)


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}: must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}") from None


class WarmupLinearDecay:
    """LR factor at scheduler step s: s / warmup_steps for s < warmup_steps, then
    max(0, (total_steps - s) / max(1, total_steps - warmup_steps)) (transformers'
    get_linear_schedule_with_warmup). A plain class, so LambdaLR's state_dict holds its two ints."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def __repr__(self) -> str:
        return f"WarmupLinearDecay(warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"


def warmup_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int,
                        total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with ``WarmupLinearDecay(warmup_steps, total_steps)`` for every group: lr(s) =
    base_lr * factor(s); call ``scheduler.step()`` after each ``optimizer.step()``. Its state_dict
    (last_epoch, base_lrs, the two ints) round-trips, so a resumed run continues exactly."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    warmup_steps = _int("warmup_steps", warmup_steps)
    total_steps = _int("total_steps", total_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps: must be <= total_steps ({total_steps}), got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup_steps, total_steps))
