"""Inputs and the comparison of an rtd_loss kernel backend (triton, cuda, or the emulated cuda one)
with the torch backend, shared by every kernel test of the op (the rule for the loss sums: see
tests/triton_kernels/test_rtd_loss_kernel.py's docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kernel_helpers import within_rule

from bertfast import ops

PARAMS = ("dense_weight", "dense_bias", "prediction_weight", "prediction_bias")
LOSS_WEIGHT = 50.0  # ELECTRA's weight of the RTD loss: the loss gradient reaches the op as 50
SUMS = ("loss", "dprediction_bias")  # checked from the kernel's input z


def make_inputs(B, T, H, dtype, seed=0, labels="int", mask="ragged", *, device):
    """hidden, the head's parameters (scaled so logits spread over a few units), labels and mask.

    mask: None, "ragged" (row 0 full, others random lengths >= 1), "empty_row" (ragged, last row
    all padding) or "all_padding"."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    tensors = {"hidden": randn(B, T, H), "dense_weight": randn(H, H, scale=H**-0.5), "dense_bias": randn(H, scale=0.5),
                   "prediction_weight": randn(1, H, scale=3 * H**-0.5), "prediction_bias": randn(1)}
    y = None
    if labels is not None:
        y = torch.randint(0, 2, (B, T), generator=g)
        y = {"int": y, "bool": y.bool(), "int32": y.int()}[labels].to(device)
    m = None
    if mask is not None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        if mask == "empty_row":
            lengths[-1] = 0
        if mask == "all_padding":
            lengths[:] = 0
        m = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return tensors, y, m


def run(tensors, labels, mask, backend, approximate, dlogits, loss_weight, dtype=None):
    """(logits, loss, grads of hidden and the parameters) of loss_weight * loss + sum(logits * dlogits)
    (a term is left out when its weight is None; a 0-dim dlogits means logits.sum()); ``dtype`` casts
    the inputs first."""
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_() for k, v in tensors.items()}
    logits, loss = ops.rtd_loss(leaves["hidden"], *(leaves.get(k) for k in PARAMS), labels, mask,
                                approximate=approximate, backend=backend)
    out = {"logits": logits.detach(), "loss": None if loss is None else loss.detach()}
    total = 0
    if loss_weight is not None:
        total = total + loss_weight * loss
    if dlogits is not None:
        total = total + ((logits * dlogits.to(logits.dtype)).sum() if dlogits.dim() else logits.sum())
    grads = torch.autograd.grad(total, list(leaves.values()))
    out.update({f"d{k}": gr for k, gr in zip(leaves, grads, strict=True)})
    return out


def head_from_z(tensors, labels, mask, approximate, dlogits, loss_weight, compute, autocast=False):
    """(torch backend in ``compute``, float64 reference), both of the head alone on the kernel's input
    z = F.linear(hidden, W_dense) in ``compute`` (as the triton backend computes it, casting first
    under autocast): the op's torch backend with hidden = z and the dense weight the identity, whose
    F.linear(z, I, b) rounds z + b once, as the torch backend's GEMM with its bias does."""
    z = F.linear(tensors["hidden"].to(compute), tensors["dense_weight"].to(compute))
    head = {**tensors, "hidden": z, "dense_weight": torch.eye(z.shape[-1], dtype=tensors["dense_weight"].dtype,
                                                                device=z.device)}
    with torch.autocast(z.device.type, dtype=compute, enabled=autocast):  # float32 parameters on float16 z
        same_dtype = run(head, labels, mask, "torch", approximate, dlogits, loss_weight)
    ref = run(head, labels, mask, "torch", approximate, dlogits, loss_weight, dtype=torch.float64)
    return same_dtype, ref


def check_all(kernel, same_dtype, ref, head_same_dtype, head_ref):
    """within_rule for every result: the sums against the head from z (module docstring), the rest
    against the whole op."""
    for name, k in kernel.items():
        if k is None:
            continue
        assert k.dtype == same_dtype[name].dtype, name
        if name in SUMS:
            assert k.dtype == head_same_dtype[name].dtype, name
            within_rule(k, head_same_dtype[name], head_ref[name], name)
        else:
            within_rule(k, same_dtype[name], ref[name], name)


# (B, T, H, approximate, labels, mask, grads): rows 1, 7, 15, 1155; hidden 96, 768, 1000; both GELU forms.
def compare(backend, tensors, labels, mask, dtype, approximate="none", grads="both", seed=5):
    """``backend`` and the torch backend in ``dtype`` vs the torch backend in float64."""
    B, T = tensors["hidden"].shape[:2]
    g = torch.Generator().manual_seed(seed)
    dlogits = torch.randn(B, T, generator=g, dtype=torch.float64).to(tensors["hidden"].device) if grads in ("both", "logits") else None
    loss_weight = LOSS_WEIGHT if grads in ("both", "loss") and labels is not None else None
    ref = run(tensors, labels, mask, "torch", approximate, dlogits, loss_weight, dtype=torch.float64)
    same_dtype = run(tensors, labels, mask, "torch", approximate, dlogits, loss_weight)
    with ops.record_backends() as trace:
        kernel = run(tensors, labels, mask, backend, approximate, dlogits, loss_weight)
    assert trace == [("rtd_loss", backend)]
    assert kernel["logits"].dtype == dtype
    assert (kernel["loss"] is None) == (labels is None)
    check_all(kernel, same_dtype, ref, *head_from_z(tensors, labels, mask, approximate, dlogits, loss_weight, dtype))
    return kernel
