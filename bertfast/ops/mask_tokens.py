"""MLM masking on the device the batch lives on (dynamic masking out of the data loader).

Bernoulli mode of the project's masking spec (the full spec, n-gram mode included, is in
``bertfast.data.masking``). With ``key = mix32(mix32(seed) ^ row_key[r])`` per row and

    bits(j, purpose) = mix32(mix32(key ^ j) ^ purpose),    top24(b) = b >> 8   (uint32 arithmetic)

a unit (a maskable token, or with ``word_ids`` a maximal run of maskable tokens of one word) is
chosen iff ``top24(bits(start, SELECT)) < T(probability)``, ``T(p) = min(round(p * 2^24), 2^24)``.
A chosen token j gets ``labels[j] = id`` and, with ``a = top24(bits(j, ACTION))``, becomes
``mask_token_id`` if ``a < T(mask_fraction)``, else ``below(bits(j, RANDOM_TOKEN), vocab_size)`` (uniform
over the vocabulary) if ``a < T(mask_fraction + random_fraction)``, else stays; other tokens get
``labels = -100``. Every backend (torch, cuda, and the C++ kernel of the data layer) gives the same
bits for a seed.

The integer helpers here (``thresholds``, ``ngram_cdf``, ``special_table``, ``validate``) are shared
with ``bertfast.data.masking``. No autograd: the outputs are integers.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import torch

from bertfast.ops import checks, cuda_support, rng
from bertfast.ops.dispatch import Op

OP = Op("mask_tokens")

SELECT, ACTION, RANDOM_TOKEN, ORDER, NGRAM = 0, 1, 2, 3, 4
IGNORE_INDEX = -100
ONE = 1 << 24  # thresholds are out of 2^24 (the top 24 hash bits)
_U32 = 0xFFFFFFFF
# mask_fraction + random_fraction may pass 1 by float round-off (0.7 + 0.2 + 0.1); T() clamps it.
_SUM_SLACK = 1e-9


def threshold(p: float) -> int:
    """T(p) = min(round(p * 2^24), 2^24): P(top24(bits) < T(p)) = T(p) / 2^24 exactly."""
    return min(round(float(p) * ONE), ONE)


def thresholds(probability: float, mask_fraction: float, random_fraction: float) -> tuple[int, int, int]:
    """(select, mask, random) integer thresholds: T(probability), T(mask_fraction),
    T(mask_fraction + random_fraction)."""
    return threshold(probability), threshold(mask_fraction), threshold(mask_fraction + random_fraction)


@functools.lru_cache(maxsize=16)
def ngram_cdf(max_ngram: int) -> tuple[int, ...]:
    """(max_ngram,) cumulative thresholds of the span length n in units, P(n) = (1/n) / sum_m 1/m:
    cdf[i] = round(2^24 * sum_{m<=i+1} 1/m / sum_{m<=max_ngram} 1/m), the last forced to 2^24.
    n is the smallest with top24(bits(start, NGRAM)) < cdf[n-1]."""
    if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"{OP.name}: `max_ngram` must be an int >= 1, got {max_ngram!r}")
    harmonic = [0.0]
    for m in range(1, max_ngram + 1):
        harmonic.append(harmonic[-1] + 1.0 / m)
    cdf = [round(ONE * harmonic[i + 1] / harmonic[max_ngram]) for i in range(max_ngram)]
    cdf[-1] = ONE
    return tuple(cdf)


def as_int(name: str, arg: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high); bools, floats and tensors are refused."""
    if isinstance(value, (bool, torch.Tensor)) or not hasattr(value, "__index__"):
        raise TypeError(f"{name}: `{arg}` must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if not low <= value < high:
        raise ValueError(f"{name}: `{arg}` must be in [{low}, {high}), got {value}")
    return value


def _fraction(name: str, arg: str, value) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: `{arg}` must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"{name}: `{arg}` must be in [0, 1], got {value}")
    return float(value)


@functools.lru_cache(maxsize=32)
def _table(special: tuple[int, ...], vocab_size: int, device: str) -> torch.Tensor:
    table = torch.zeros(vocab_size, dtype=torch.uint8)
    if special:
        table[list(special)] = 1
    return table.to(device)


def special_table(special: tuple[int, ...], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(vocab_size,) uint8 on ``device``: 1 at the ids never masked. Cached: do not write to it."""
    return _table(special, vocab_size, str(torch.device(device)))


@functools.lru_cache(maxsize=64)  # a loader passes the same ids every call; errors are not cached
def _special_ids(name: str, ids: tuple, types: tuple, vocab_size: int) -> tuple[int, ...]:
    """The ids sorted and unique, each an int in [0, vocab_size). ``types`` is part of the cache key:
    True == 1 and 1.0 == 1, and those must not pass as a cached 1."""
    return tuple(sorted({as_int(name, "special_token_ids", i, 0, vocab_size) for i in ids}))


class Checked(NamedTuple):
    """The validated scalars of a call."""

    seed: int
    vocab_size: int
    mask_token_id: int
    special: tuple[int, ...]  # sorted, unique
    select_threshold: int
    mask_threshold: int
    random_threshold: int


def validate(name: str, input_ids, row_keys, seed, vocab_size, mask_token_id, special_token_ids, probability,
             mask_fraction, random_fraction, word_ids, *, read_values: bool = True) -> Checked:
    """Every check of a masking call, each error naming its argument. ``read_values`` reads the ids
    and row keys once (min and max) to prove them in range; the C++ kernel checks them during its own
    pass instead."""
    checks.tensor(name, "input_ids", input_ids, ndim=2)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: `input_ids` must have dtype int32 or int64, got {input_ids.dtype}")
    checks.nonempty(name, "input_ids", input_ids, (0,), "the batch dim")
    checks.nonempty(name, "input_ids", input_ids, (1,), "the sequence dim")
    B, T = input_ids.shape
    checks.tensor(name, "row_keys", row_keys)
    if row_keys.dtype != torch.int64:
        raise TypeError(f"{name}: `row_keys` must have dtype int64, got {row_keys.dtype}")
    checks.shape(name, "row_keys", row_keys, (B,), "(batch,) of input_ids")
    checks.same_device(name, "row_keys", row_keys, "input_ids", input_ids)
    if word_ids is not None:
        checks.tensor(name, "word_ids", word_ids)
        if word_ids.dtype != torch.int32:
            raise TypeError(f"{name}: `word_ids` must have dtype int32, got {word_ids.dtype}")
        checks.shape(name, "word_ids", word_ids, (B, T), "(batch, seq_len) of input_ids")
        checks.same_device(name, "word_ids", word_ids, "input_ids", input_ids)
    seed = as_int(name, "seed", seed, 0, 1 << 32)
    vocab_size = as_int(name, "vocab_size", vocab_size, 1, 1 << 31)
    mask_token_id = as_int(name, "mask_token_id", mask_token_id, 0, vocab_size)
    if isinstance(special_token_ids, torch.Tensor):
        special_token_ids = special_token_ids.reshape(-1).tolist()
    try:
        ids = tuple(special_token_ids)
        special = _special_ids(name, ids, tuple(map(type, ids)), vocab_size)
    except TypeError as e:
        if "special_token_ids" in str(e):
            raise
        raise TypeError(f"{name}: `special_token_ids` must be a collection of ints, got "
                        f"{type(special_token_ids).__name__}") from None
    probability = _fraction(name, "probability", probability)
    mask_fraction = _fraction(name, "mask_fraction", mask_fraction)
    random_fraction = _fraction(name, "random_fraction", random_fraction)
    if mask_fraction + random_fraction > 1.0 + _SUM_SLACK:
        raise ValueError(f"{name}: `mask_fraction` + `random_fraction` must be <= 1, got "
                         f"{mask_fraction} + {random_fraction}")
    if read_values and checks.value_checks_enabled() and row_keys.device.type != "meta":
        lo, hi = torch.aminmax(row_keys)
        if int(lo) < 0 or int(hi) > _U32:
            raise ValueError(f"{name}: `row_keys` holds {int(lo) if int(lo) < 0 else int(hi)}, outside [0, 2^32): "
                             "row keys are uint32 values (see bertfast.data.masking.dynamic_row_keys)")
    if read_values:
        checks.index_range(name, "input_ids", input_ids, vocab_size, "token ids must index the vocabulary")
    return Checked(seed, vocab_size, mask_token_id, special, *thresholds(probability, mask_fraction, random_fraction))


def mask_tokens(
    input_ids: torch.Tensor,
    row_keys: torch.Tensor,
    seed: int,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    word_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch for MLM (Bernoulli mode: BERT / RoBERTa / Hugging Face), on its own device.

    Args:
        input_ids: (B, T) int32 or int64 token ids in [0, vocab_size). Read once more by the range
            check (one min/max reduction; on a GPU one synchronisation), skipped under torch.compile or
            with ``bertfast.ops.checks.VALUE_CHECKS = False``.
        row_keys: (B,) int64 holding uint32 keys, one per row (``bertfast.data.masking.dynamic_row_keys``
            for a fresh mask per call, ``static_row_keys`` for a fixed mask per sequence).
        seed: int in [0, 2^32).
        vocab_size: random replacements are uniform over [0, vocab_size).
        mask_token_id: the [MASK] id.
        special_token_ids: ids never masked (padding, [CLS], [SEP], ...).
        probability: chance that a unit (token or word) is chosen.
        mask_fraction, random_fraction: of the chosen tokens, the share replaced by [MASK] and by a
            random id (the rest stay); their sum <= 1.
        word_ids: None (each token is a unit), or (B, T) int32 word index per token, < 0 = never mask;
            a word's consecutive maskable tokens are chosen together (whole-word masking).

    Returns:
        (masked_ids (B, T) like input_ids, labels (B, T) int64: the original id where chosen, else -100).
    """
    name = OP.name
    c = validate(name, input_ids, row_keys, seed, vocab_size, mask_token_id, special_token_ids, probability,
                 mask_fraction, random_fraction, word_ids)
    facts = {"device": input_ids.device.type, "dtype": input_ids.dtype}
    impl = OP.select(backend, facts).impl
    table = special_table(c.special, c.vocab_size, input_ids.device)
    with torch.no_grad():
        return impl(input_ids, row_keys, word_ids, table, c.seed, c.vocab_size, c.mask_token_id,
                    c.select_threshold, c.mask_threshold, c.random_threshold)


def _int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 tensors with the same 32 bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _top24(b: torch.Tensor) -> torch.Tensor:
    return (b >> 8) & 0xFFFFFF  # logical shift of the int32-held uint32


@OP.register("torch")
def mask_tokens_torch(input_ids, row_keys, word_ids, special, seed, vocab_size, mask_token_id, select_threshold,
                      mask_threshold, random_threshold):
    """Vectorised spec on any device. special: (vocab_size,) uint8 table on the ids' device."""
    B, T = input_ids.shape
    device = input_ids.device
    seed_mix = rng.mix32_int(seed)
    if seed_mix >= 1 << 31:
        seed_mix -= 1 << 32  # the same 32 bits as an int32
    keys = rng.mix32(_int32_bits(row_keys) ^ seed_mix)  # (B,) stream_key(seed, row_key)
    cols = torch.arange(T, device=device, dtype=torch.int32)
    h = rng.mix32(keys[:, None] ^ cols[None, :])  # (B, T) mix32(key ^ j), shared by the purposes
    maskable = special[input_ids] == 0  # (B, T)
    select = _top24(rng.mix32(h))  # h ^ SELECT = h
    if word_ids is not None:
        maskable &= word_ids >= 0
        continues = torch.zeros_like(maskable)
        continues[:, 1:] = maskable[:, :-1] & (word_ids[:, 1:] == word_ids[:, :-1])
        starts = maskable & ~continues
        # A unit's tokens take the select bits of its first column: the last start at or before them.
        positions = torch.arange(T, device=device, dtype=torch.int64).expand(B, T)
        start = torch.cummax(torch.where(starts, positions, 0), dim=1).values
        select = torch.gather(select, 1, start)
    chosen = maskable & (select < select_threshold)
    action = _top24(rng.mix32(h ^ ACTION))
    random_bits = rng.mix32(h ^ RANDOM_TOKEN).to(torch.int64) & 0xFFFFFFFF
    random_ids = ((random_bits * vocab_size) >> 32).to(input_ids.dtype)  # below(bits, vocab): < 2^63, exact
    masked = torch.where(chosen & (action < random_threshold), random_ids, input_ids)
    masked = masked.masked_fill(chosen & (action < mask_threshold), mask_token_id)
    labels = torch.where(chosen, input_ids.to(torch.int64), IGNORE_INDEX)
    return masked, labels


# ------------------------------------------------------------------------------------------------
# cuda backend: csrc/cuda/masking.cu through a torch.library op (a fake implementation lets
# torch.compile trace past the raw-pointer call).


@OP.register("cuda", refuse=lambda facts: cuda_support.refusal(facts, dtypes=None))  # ids: dtype checked above
def mask_tokens_cuda(input_ids, row_keys, word_ids, special, seed, vocab_size, mask_token_id, select_threshold,
                     mask_threshold, random_threshold):
    return mask_tokens_cuda_op(input_ids, row_keys, word_ids, special, seed, vocab_size, mask_token_id,
                               select_threshold, mask_threshold, random_threshold)


# The launch's device context and stream handle (the tests swap both to run this path on the CPU).
def _device(device: torch.device):
    return torch.cuda.device(device)


def _stream(device: torch.device) -> int:
    return cuda_support.stream(device)


@torch.library.custom_op("bertfast::mask_tokens_cuda", mutates_args=())
def mask_tokens_cuda_op(input_ids: torch.Tensor, row_keys: torch.Tensor, word_ids: torch.Tensor | None,
                        special: torch.Tensor, seed: int, vocab_size: int, mask_token_id: int, select_threshold: int,
                        mask_threshold: int, random_threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch: contiguous inputs (it indexes rows * cols densely), outputs made here."""
    ids = input_ids.contiguous()
    keys = row_keys.contiguous()
    words = None if word_ids is None else word_ids.contiguous()
    table = special.contiguous()
    out = torch.empty_like(ids)
    labels = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    rows, cols = ids.shape
    with _device(ids.device):
        cuda_support.module().mask_tokens(
            ids.data_ptr(), out.data_ptr(), labels.data_ptr(), keys.data_ptr(),
            0 if words is None else words.data_ptr(), table.data_ptr(), rows, cols, ids.dtype == torch.int32, seed,
            vocab_size, mask_token_id, select_threshold, mask_threshold, random_threshold, _stream(ids.device))
    return out, labels


@mask_tokens_cuda_op.register_fake
def _(input_ids, row_keys, word_ids, special, seed, vocab_size, mask_token_id, select_threshold, mask_threshold,
      random_threshold):
    return torch.empty_like(input_ids), input_ids.new_empty(input_ids.shape, dtype=torch.int64)
