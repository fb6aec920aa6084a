"""bertfast attention as a transformers attention implementation.

    import bertfast, transformers
    bertfast.register_hf_attention()                                   # once per process
    model = transformers.AutoModel.from_config(cfg, attn_implementation="bertfast")

Every self-attention of BERT, ALBERT, RoBERTa and ELECTRA then runs ``bertfast.ops.attention``
(with its backend dispatch; ``bertfast.record_backends()`` shows which backend ran).

Two functions are registered under the same name, because transformers (>= 5) builds the mask once
per forward with the *mask* function registered under ``config._attn_implementation`` and calls the
*attention* function with that mask; with no mask function of that name, it hands ``None`` and padding
would be silently ignored:

- ``attention_mask`` (for ``transformers.AttentionMaskInterface``) returns a ``(B, 1, 1, Tk)`` bool
  key padding mask (True = attend), or None without padding. For the plain bidirectional mask
  (the only one these encoders build) it slices the 2D padding mask, with nothing materialised;
  any other mask pattern is built by ``transformers.masking_utils.sdpa_mask`` and accepted only if
  every query row equals the first one (a key-padding mask), else refused.
- ``attention_forward`` (for ``transformers.AttentionInterface``) turns the mask into the op's
  ``(B, Tk)`` key padding mask (a view for the masks above) and calls the op on transposed views of
  ``(B, heads, T, head_dim)`` query/key/value.

Not served, with an error saying so: causal attention (decoders, ``is_causal=True``), masks that are
not key padding (causal, sliding-window, additive bias), ``output_attentions=True`` (the op computes
no attention weights), soft-capping, position bias, grouped key/value heads, flex ``BlockMask``.
One difference from transformers' eager attention: a query whose keys are ALL padding (an all-padding
row of the batch) gives zeros here, where eager averages every value uniformly.

transformers is imported only inside functions: ``import bertfast`` works without it.
"""

from __future__ import annotations

import torch

from bertfast import ops

DEFAULT_NAME = "bertfast"

# kwargs of transformers attention functions that this implementation cannot honour
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "sliding_window", "s_aux")


class UnsupportedAttentionError(NotImplementedError):
    """transformers asked the bertfast attention for something it cannot compute; the message says what."""


def _unsupported(what: str, instead: str = "attn_implementation='eager' or 'sdpa'") -> UnsupportedAttentionError:
    return UnsupportedAttentionError(
        f"bertfast attention supports only bidirectional attention with a key padding mask; "
        f"unsupported: {what}. Use {instead} for this model or call.")


def _reduce_to_key_padding(mask: torch.Tensor, what: str) -> torch.Tensor:
    """(B, H|1, Tq|1, Tk) bool -> (B, Tk) bool, after checking every head and query row is equal."""
    first = mask[:, :1, :1, :]
    # Data-dependent check, once per mask (per forward for masks from `attention_mask`).
    if (mask.shape[1] != 1 or mask.shape[2] != 1) and not bool((mask == first).all()):
        raise _unsupported(f"{what} whose rows differ between queries or heads (a causal, sliding-window "
                           f"or custom mask), not a key-padding mask")
    return first[:, 0, 0, :]


def key_padding_mask(attention_mask, batch: int, kv_length: int) -> torch.Tensor | None:
    """The op's (B, Tk) bool key padding mask (True = attend) for a mask handed to an attention function.

    Accepted: None; the (B, 1, 1, Tk) bool mask of ``attention_mask`` below; any 4D bool mask
    (True = attend) or additive float mask (0 = attend, a large negative number = masked, as
    transformers' eager masks) of shape (B|1, H|1, Tq|1, Tk) that is the same for every query and
    head; a (B, Tk) bool mask. Anything else raises, naming what it is.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise _unsupported(f"attention_mask of type {type(attention_mask).__name__} (e.g. a flex BlockMask)")
    mask = attention_mask
    if mask.ndim == 2:
        if mask.dtype != torch.bool:
            raise _unsupported(f"a 2D attention_mask of dtype {mask.dtype} (expected bool, True = attend)")
        mask = mask[:, None, None, :]
    elif mask.ndim != 4:
        raise _unsupported(f"a {mask.ndim}D attention_mask of shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise _unsupported(f"a 4D attention_mask of dtype {mask.dtype} (expected bool or an additive float mask)")
        keep = mask == 0
        # transformers fills masked entries with finfo(dtype).min (or -inf); anything in between is a bias.
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((keep | blocked).all()):
            raise _unsupported("an additive attention_mask with values other than 0 and -inf/finfo.min "
                               "(an attention bias)")
        mask = keep
    if mask.shape[-1] != kv_length:
        raise ValueError(f"attention: attention_mask has {mask.shape[-1]} keys (last dim of shape "
                         f"{tuple(attention_mask.shape)}), but the key states have {kv_length}")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"attention: attention_mask has batch {mask.shape[0]} (shape {tuple(attention_mask.shape)}), "
                         f"expected {batch} or 1")
    kpm = _reduce_to_key_padding(mask, "an attention_mask")
    return kpm.expand(batch, kv_length)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function running ``bertfast.ops.attention``.

    Args:
        module: the calling attention module (read for ``is_causal`` and ``config.output_attentions``).
        query: (B, H, Tq, D); key, value: (B, H, Tk, D).
        attention_mask: see ``key_padding_mask``; None = attend to every key.
        dropout: attention-probability dropout (transformers passes 0.0 in eval mode).
        scaling: softmax scale; None = D ** -0.5.

    Returns:
        ((B, Tq, H, D) attention output, None): no attention weights are computed.
    """
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise _unsupported("output_attentions=True (the fused attention op computes no attention weights)",
                           instead="attn_implementation='eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal:
        raise _unsupported(f"causal attention (is_causal=True on {type(module).__name__}: a decoder)")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise _unsupported(f"`{name}`")
    if key.shape[1] != query.shape[1]:
        raise _unsupported(f"grouped key/value heads ({query.shape[1]} query heads, {key.shape[1]} key heads)")
    batch, kv_length = key.shape[0], key.shape[2]
    kpm = key_padding_mask(attention_mask, batch, kv_length)
    # (B, H, T, D) -> (B, T, H, D): strided views, the op accepts them without a copy.
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        key_padding_mask=kpm, dropout_p=dropout, scale=scaling)
    return out, None  # (B, Tq, H, D)


def attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers ``AttentionMaskInterface`` function: a (B, 1, 1, Tk) bool key padding mask, or None.

    Called by ``transformers.masking_utils.create_bidirectional_mask`` / ``create_causal_mask`` with
    ``batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask`` and
    extras, like ``sdpa_mask``.
    """
    from transformers import masking_utils

    mask_function = kwargs.get("mask_function")
    padding = kwargs.get("attention_mask")
    plain = (not args and mask_function is not None
             and mask_function is getattr(masking_utils, "bidirectional_mask_function", None)
             and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0
             and "kv_length" in kwargs and (padding is None or (isinstance(padding, torch.Tensor) and padding.ndim == 2)))
    if plain:
        # Bidirectional + 2D padding: key j of row b is attended iff padding[b, j]; sdpa_mask would
        # expand exactly this over every query (padding shorter than kv_length counts as masked).
        if padding is None:
            return None
        kv_length = kwargs["kv_length"]
        padding = padding.to(torch.bool)
        if padding.shape[1] < kv_length:
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[1]), value=False)
        return padding[:, None, None, :kv_length]  # (B, 1, 1, Tk)
    # Any other pattern: let transformers materialise it, then keep it only if it is a key-padding
    # mask. Never let it skip: sdpa_mask returns None for "use is_causal" and, with no padding, for
    # any pattern when allow_is_bidirectional_skip is set (create_causal_mask may set it).
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    mask = masking_utils.sdpa_mask(*args, **kwargs)
    kind = getattr(mask_function, "__name__", "custom")
    return _reduce_to_key_padding(mask, f"a mask built from mask_function {kind}")[:, None, None, :]


def _same_function(a, b) -> bool:
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", None)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None))


def register(name: str = DEFAULT_NAME) -> None:
    """Register the bertfast attention and its mask function with transformers under ``name``.

    Idempotent. Refuses a name that transformers already maps to a different function (e.g. "sdpa").
    Needs a transformers with ``AttentionInterface`` (not 4.48.x); ``AttentionMaskInterface`` (transformers >= 5,
    and late 4.x) is registered where it exists. Without it the models build their own 4D masks,
    which ``key_padding_mask`` converts.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: `name` must be a non-empty string, got {name!r}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("register: bertfast's transformers attention needs transformers "
                          "(pip install 'bertfast[hf]')") from e
    attention_interface = getattr(transformers, "AttentionInterface", None)
    if attention_interface is None:
        raise ImportError(f"register: transformers {transformers.__version__} has no AttentionInterface; "
                          f"upgrade transformers to use attn_implementation={name!r}, or use "
                          f"bertfast.patch(model), which works from transformers 4.48")
    mask_interface = getattr(transformers, "AttentionMaskInterface", None)
    pairs = [(attention_interface, attention_forward)]
    if mask_interface is not None:
        pairs.append((mask_interface, attention_mask))
    for interface, fn in pairs:
        current = interface().get(name)
        if current is not None and not _same_function(current, fn):
            raise ValueError(f"register: transformers {interface.__name__} already maps {name!r} to "
                             f"{getattr(current, '__qualname__', current)}; pick another name")
    for interface, fn in pairs:
        interface.register(name, fn)
