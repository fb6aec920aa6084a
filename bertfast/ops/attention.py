"""Bidirectional multi-head attention, padded (key padding mask) or packed (varlen).

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h] | real keys) * z[b, h, i, j] / (1 - p) * v[b, j, h]

Keys where ``key_padding_mask`` is False (or past a packed sequence's end) get zero weight; a row
whose keys are all padding gives a zero output and zero gradients; NaN/Inf stored at padded keys
or values never reaches anything. Dropout ``z`` is a counter-based hash of (seed, batch, head,
query position, key position) shared by every backend (``bertfast.kernels.attention``), so the
backward regenerates it and the same seed gives the same result on every backend and layout.

The op is the ``torch.library`` custom op ``bertfast::attention_forward`` with its backward
``bertfast::attention_backward`` and fake implementations, so ``torch.compile`` traces through it.
"""

from __future__ import annotations

import torch

from bertfast.ops import checks, rng, triton_support
from bertfast.ops.dispatch import Op

OP = Op("attention")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    deterministic: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over padded (batch, seq, heads, head_dim) or packed (tokens, heads, head_dim) tensors.

    Args:
        q: (B, Tq, H, D) queries, or (total_tokens, H, D) packed with ``cu_seqlens``.
        k, v: (B, Tk, H, D) keys and values, or (total_tokens, H, D) packed; dtype and device of ``q``.
            Strided views (e.g. of one fused QKV projection) are read in place when the last
            stride is 1.
        key_padding_mask: (B, Tk) bool, True = attend to this key; None = no padding. Padded only.
        cu_seqlens: (B + 1,) int32/int64 offsets of the packed sequences: sequence b is rows
            cu_seqlens[b]:cu_seqlens[b + 1] of q, k and v (self-attention). Requires ``max_seqlen``.
        max_seqlen: the longest packed sequence (an int, known to the caller without a sync).
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval mode).
        scale: softmax scale, default ``D ** -0.5``.
        seed: dropout seed (int or int64 tensor of one element); default: drawn from torch's
            generator, so ``torch.manual_seed`` makes runs repeatable.
        deterministic: a backward without atomics (bitwise repeatable on a GPU; a little slower).
        backend: force a backend ("torch", "triton", "cuda"); see ``bertfast.ops.dispatch``.

    Returns:
        Same shape as ``q``, in its dtype.
    """
    name = OP.name
    varlen = cu_seqlens is not None
    ndim = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seq_len, heads, head_dim)"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        checks.tensor(name, arg, t, ndim=ndim, kind="float")
    for arg, t in (("k", k), ("v", v)):
        checks.same_dtype(name, arg, t, "q", q)
        checks.same_device(name, arg, t, "q", q)
    if varlen:
        checks.shape(name, "k", k, tuple(q.shape), f"{layout} of q (packed self-attention)")
        checks.shape(name, "v", v, tuple(q.shape), f"{layout} of q (packed self-attention)")
        checks.nonempty(name, "q", q, (0,), "the token dim")
        _check_packing(name, q, cu_seqlens, max_seqlen, key_padding_mask)
    else:
        B, _, H, D = q.shape
        checks.shape(name, "k", k, (B, None, H, D), f"{layout} matching q")
        checks.shape(name, "v", v, tuple(k.shape), "the shape of k")
        checks.nonempty(name, "q", q, (0,), "the batch dim")
        checks.nonempty(name, "q", q, (1,), "the sequence dim")
        checks.nonempty(name, "k", k, (1,), "the sequence dim")
        if key_padding_mask is not None:
            checks.tensor(name, "key_padding_mask", key_padding_mask, kind="bool")
            checks.shape(name, "key_padding_mask", key_padding_mask, (B, k.shape[1]), "(batch, key_seq_len)")
            checks.same_device(name, "key_padding_mask", key_padding_mask, "q", q)
        max_seqlen = 0
    checks.nonempty(name, "q", q, (-1,), "head_dim")
    checks.probability(name, "dropout_p", dropout_p)
    D = q.shape[-1]
    if scale is None:
        scale = D**-0.5
    elif not float(scale) > 0:
        raise ValueError(f"{name}: `scale` must be a positive number, got {scale}")
    seed_tensor = rng.seed_tensor(name, seed, q.device) if dropout_p > 0 else None

    facts = {"device": q.device.type, "dtype": q.dtype, "head_dim": D, "dropout": dropout_p > 0, "varlen": varlen}
    chosen = OP.select(backend, facts).name
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if chosen == "torch":
        # Plain PyTorch ops under autograd: it keeps the probabilities for the backward instead of
        # recomputing them (about 2x faster on a CPU than the custom op's recomputing backward);
        # torch.compile traces these ops directly. The custom op below serves the kernels.
        out, _ = OP.backends["torch"].impl(q, k, v, key_padding_mask, cu_seqlens, int(max_seqlen), float(dropout_p),
                                           float(scale), seed_tensor, need_lse=False)
        return out
    out, _ = attention_forward(q, k, v, key_padding_mask, cu_seqlens, int(max_seqlen), float(dropout_p),
                               float(scale), seed_tensor, chosen, bool(deterministic))
    return out


def _check_packing(name, q, cu_seqlens, max_seqlen, key_padding_mask) -> None:
    checks.tensor(name, "cu_seqlens", cu_seqlens, ndim=1, kind="int")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
    checks.same_device(name, "cu_seqlens", cu_seqlens, "q", q)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: `cu_seqlens` needs batch + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if key_padding_mask is not None:
        raise ValueError(f"{name}: `key_padding_mask` cannot be combined with `cu_seqlens`: packed "
                         "sequences hold only real tokens")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"{name}: `max_seqlen` must be a positive int with `cu_seqlens`, got {max_seqlen!r}")
    key = ("cu_seqlens", q.shape[0], max_seqlen)
    if checks.value_checks_enabled() and cu_seqlens.device.type != "meta" and not checks.already_accepted(
            cu_seqlens, key):
        # One read (one sync on a GPU), once per offsets tensor: every layer of an unpadded encoder
        # passes the same cu_seqlens, and only the first call reads it.
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(),
                                                      lengths.max()]).tolist()
        if first != 0 or last != q.shape[0] or shortest < 0:
            raise ValueError(f"{name}: `cu_seqlens` must rise from 0 to total_tokens = {q.shape[0]}, got "
                             f"first {first}, last {last}, smallest step {shortest}")
        if longest > max_seqlen:
            raise ValueError(f"{name}: `max_seqlen` is {max_seqlen} but `cu_seqlens` holds a sequence of {longest}")
        checks.accept(cu_seqlens, key)


# ------------------------------------------------------------------------------------------------
# The custom ops: the backend name travels as an argument, chosen before tracing reaches them.


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, int]:
    rows = q.shape[0] if varlen else q.shape[0] * q.shape[1]
    return (q.shape[-2], rows)  # (heads, rows)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Softmax statistics and lse: float32, or float64 for float64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("bertfast::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, max_seqlen: int, dropout_p: float, scale: float,
                      seed: torch.Tensor | None, backend: str,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, contiguous; lse (heads, rows) float32 (float64 for float64), +inf for rows without keys)."""
    return OP.backends[backend].impl(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, backend, deterministic):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=_compute_dtype(q))


@torch.library.custom_op("bertfast::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                       max_seqlen: int, dropout_p: float, scale: float, seed: torch.Tensor | None, backend: str,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                              seed, deterministic)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, backend,
      deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.args = (max_seqlen, dropout_p, scale, backend, deterministic)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, dropout_p, scale, backend, deterministic = ctx.args
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                                    scale, seed, backend, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# torch backend: the reference, any dtype (float64 too) on any device


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, rows: int, cols: int,
                      dropout_p: float) -> torch.Tensor:
    """(batch, heads, rows, cols) bool: the entries attention dropout keeps, the same bits as the
    Triton kernels draw (kernels/attention.py: mix32(mix32(key_bh ^ i) ^ j) >> 8 >= threshold)."""
    return rng.keep_mask(seed, batch * heads, rows, cols, dropout_p).view(batch, heads, rows, cols)


def _scores(q, k, v, key_padding_mask, scale):
    """(B, H, Tq, Tk) scores in the compute dtype, and K, V as (B, H, T, D) with padded rows zeroed
    (so NaN/Inf stored there reaches neither outputs nor gradients). Padded keys hold the finite
    finfo.min, as transformers does: a row without real keys then has uniform weights over zeroed
    values, so its output and gradients are exactly zero, and no -inf - -inf makes a NaN."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
        k = k.masked_fill(~keep, 0.0)
        v = v.masked_fill(~keep, 0.0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # Softmax in float32 for half inputs; float32/float64 stay as they are.
    compute = _compute_dtype(q)
    scores = scores.to(compute)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(compute).min)
    return q, k, v, scores


def _dropout_scale(seed, dropout_p, batch, heads, rows, cols, dtype):
    """z / (1 - p) as a (B, H, Tq, Tk) tensor, or None without dropout."""
    if dropout_p == 0.0:
        return None
    keep = dropout_keep_mask(seed, batch, heads, rows, cols, dropout_p)
    return keep.to(dtype) / (1.0 - dropout_p)


def _forward_padded(q, k, v, key_padding_mask, dropout_p, scale, seed, need_lse=True):
    B, Tq, H, _ = q.shape
    _, _, v_, scores = _scores(q, k, v, key_padding_mask, scale)
    lse = None
    if need_lse:
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
        if key_padding_mask is not None:  # the kernels' convention: +inf for a row without real keys
            lse = lse.masked_fill(~key_padding_mask.any(-1)[:, None, None], float("inf"))
    probs = torch.softmax(scores, dim=-1)
    z = _dropout_scale(seed, dropout_p, B, H, Tq, k.shape[1], probs.dtype)
    if z is not None:
        probs = probs * z
    out = torch.matmul(probs.to(v.dtype), v_)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), lse


def _backward_padded(dout, q, k, v, key_padding_mask, dropout_p, scale, seed):
    """The backward of ``_forward_padded`` written out, in the order autograd would run it:
    dv = (p z)^T dout; dp = (dout v^T) z; ds = p (dp - rowsum(p dp)); dq = (scale ds) k;
    dk = (scale ds)^T q; padded keys get no gradient."""
    B, Tq, H, _ = q.shape
    q_, k_, v_, scores = _scores(q, k, v, key_padding_mask, scale)
    probs = torch.softmax(scores, dim=-1)  # recomputed: more exact than exp(s - lse)
    do = dout.transpose(1, 2)  # (B, H, Tq, D)
    dp = torch.matmul(do, v_.transpose(-1, -2)).to(probs.dtype)  # (B, H, Tq, Tk)
    z = _dropout_scale(seed, dropout_p, B, H, Tq, k.shape[1], probs.dtype)
    pz = probs if z is None else probs * z
    if z is not None:
        dp = dp * z
    dv = torch.matmul(pz.to(v.dtype).transpose(-1, -2), do)
    ds = (probs * (dp - (probs * dp).sum(-1, keepdim=True)) * scale).to(q.dtype)
    dq = torch.matmul(ds, k_)
    dk = torch.matmul(ds.transpose(-1, -2), q_)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]
        dk, dv = dk.masked_fill(~keep, 0.0), dv.masked_fill(~keep, 0.0)
    return tuple(x.transpose(1, 2).contiguous() for x in (dq, dk, dv))


def _packed_index(cu_seqlens, max_seqlen, total):
    """Gather indices (B, max_seqlen) from the packed layout, the validity mask, and per token
    its (sequence, position) to scatter back."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(max_seqlen, device=cu.device)
    valid = pos[None, :] < lengths[:, None]  # (B, max_seqlen)
    gather = (cu[:-1, None] + pos[None, :]).clamp(max=total - 1)
    token = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], token, right=True)
    return gather, valid, seq, token - cu[seq]


@OP.register("torch")
def attention_torch(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed, need_lse=True):
    """The reference forward: (out, lse or None), any dtype (float64 too) on any device, differentiable
    by autograd; ``attention_torch_backward`` is its backward written out (for the custom op)."""
    if cu_seqlens is None:
        out, lse = _forward_padded(q, k, v, key_padding_mask, dropout_p, scale, seed, need_lse)
        return out, None if lse is None else lse.permute(1, 0, 2).reshape(_lse_shape(q, False))  # (H, B * Tq)
    gather, valid, seq, pos = _packed_index(cu_seqlens, max_seqlen, q.shape[0])
    out, lse = _forward_padded(q[gather], k[gather], v[gather], valid, dropout_p, scale, seed, need_lse)
    return out[seq, pos], None if lse is None else lse[seq, :, pos].transpose(0, 1).contiguous()


def attention_torch_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                             seed, deterministic):
    if cu_seqlens is None:
        return _backward_padded(dout, q, k, v, key_padding_mask, dropout_p, scale, seed)
    gather, valid, seq, pos = _packed_index(cu_seqlens, max_seqlen, q.shape[0])
    # Queries past a sequence's end get dout = 0, so they add nothing to dk, dv of real keys.
    dout_padded = dout[gather].masked_fill(~valid[:, :, None, None], 0.0)
    grads = _backward_padded(dout_padded, q[gather], k[gather], v[gather], valid, dropout_p, scale, seed)
    return tuple(g[seq, pos] for g in grads)


# ------------------------------------------------------------------------------------------------
# triton backend




def _triton_refusal(facts) -> str | None:
    reason = triton_support.refusal(facts)
    if reason is not None:
        return reason
    D = facts["head_dim"]
    if not (8 <= D <= 128 and D % 8 == 0):
        return f"head_dim must be a multiple of 8 in [8, 128] (got {D})"
    return None


@OP.register("triton", refuse=_triton_refusal)
def attention_triton(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed):
    from bertfast.kernels.attention import attention_fwd

    return attention_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed)


def attention_triton_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale,
                              seed, deterministic):
    from bertfast.kernels.attention import attention_bwd

    return attention_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, scale, seed,
                         deterministic)


# Each backend's backward, beside its forward registered in OP.
_BACKWARD = {"torch": attention_torch_backward, "triton": attention_triton_backward}
