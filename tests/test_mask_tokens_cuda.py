"""On-device dynamic masking (csrc/cuda/masking.cu): the cuda backend of the mask_tokens op gives
exactly the torch backend's masks (the spec is bit-exact, so equality is the only rule); and, without a
GPU, the launcher's argument checks.

The op (bertfast/ops/mask_tokens.py) is imported inside the tests."""

from __future__ import annotations

import pytest
import torch

from bertfast.ops.dispatch import BackendUnavailableError
from helpers import cuda_module, gpu

VOCAB = 1000
MASK_ID = 4
SPECIAL = (0, 1, 2, 3, MASK_ID)  # pad, cls, sep, unk, mask
TILE = 256  # the kernel's widest block: columns per tile
DEVICE = "cuda"


def make_batch(B, T, dtype, seed, words=None, special_rate=0.1):
    """ids with ~special_rate special tokens, padding after ragged lengths, row keys, word ids.

    words: None; "short" (random word lengths 1-4, -1 on some tokens); "long" (words of up to 300
    tokens, so units cross the kernel's 256-column tiles, and specials right at tile edges split some);
    "one" (a single word id per row: every run of maskable tokens is one unit)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, (B, T), generator=g)
    ids = torch.where(torch.rand(B, T, generator=g) < special_rate,
                      torch.randint(0, len(SPECIAL), (B, T), generator=g), ids)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    row_keys = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64)
    word_ids = None
    if words == "short":
        starts = torch.rand(B, T, generator=g) < 0.45
        starts[:, 0] = True
        word_ids = (torch.cumsum(starts.int(), dim=1) - 1).int()
        word_ids[torch.rand(B, T, generator=g) < 0.05] = -1
    elif words == "long":
        lengths = torch.randint(1, 300, (B, T), generator=g)
        word_ids = torch.zeros(B, T, dtype=torch.int32)
        for b in range(B):
            col, w = 0, 0
            while col < T:
                n = int(lengths[b, col])
                word_ids[b, col:col + n] = w
                col, w = col + n, w + 1
        for edge in range(TILE, T, TILE):  # a special just before, at, or after some tile edges
            ids[:, edge + (edge // TILE) % 3 - 1] = 1
    elif words == "one":
        word_ids = torch.zeros(B, T, dtype=torch.int32)
    return ids.to(dtype), row_keys, word_ids


def both_backends(ids, row_keys, word_ids, seed, probability, **kw):
    from bertfast.ops.mask_tokens import mask_tokens

    args = dict(vocab_size=VOCAB, mask_token_id=MASK_ID, special_token_ids=SPECIAL, probability=probability,
                word_ids=None if word_ids is None else word_ids.to(DEVICE), **kw)
    ids, row_keys = ids.to(DEVICE), row_keys.to(DEVICE)
    cuda = mask_tokens(ids, row_keys, seed, backend="cuda", **args)
    torch_ = mask_tokens(ids, row_keys, seed, backend="torch", **args)
    return cuda, torch_


def assert_identical(cuda, torch_, ids):
    (c_ids, c_labels), (t_ids, t_labels) = cuda, torch_
    assert c_ids.dtype == t_ids.dtype == ids.dtype and c_labels.dtype == t_labels.dtype == torch.int64
    assert c_ids.device.type == DEVICE
    assert torch.equal(c_ids.cpu(), t_ids.cpu())
    assert torch.equal(c_labels.cpu(), t_labels.cpu())


# ------------------------------------------------------------------------------------------------
# On a GPU


@gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("words", [None, "short", "long", "one"])
@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (17, 130), (4, 700), (2, 1030)])
@pytest.mark.parametrize("probability", [0.15, 0.5])
def test_cuda_equals_torch(B, T, words, dtype, probability):
    ids, row_keys, word_ids = make_batch(B, T, dtype, seed=B * T + (words is not None), words=words)
    cuda, torch_ = both_backends(ids, row_keys, word_ids, seed=B + T, probability=probability)
    assert_identical(cuda, torch_, ids)
    if B * T > 100:  # something was masked, and something was not
        labels = cuda[1]
        assert (labels != -100).any() and (labels == -100).any()


@gpu
@pytest.mark.parametrize("words", [None, "short"])
def test_rows_of_special_tokens_stay_unmasked(words):
    ids, row_keys, word_ids = make_batch(5, 300, torch.int64, seed=3, words=words)
    ids[1] = 0  # all padding
    ids[3] = torch.arange(300) % len(SPECIAL)  # all special
    cuda, torch_ = both_backends(ids, row_keys, word_ids, seed=7, probability=0.5)
    assert_identical(cuda, torch_, ids)
    for row in (1, 3):
        assert (cuda[1][row] == -100).all() and torch.equal(cuda[0][row].cpu(), ids[row])


@gpu
def test_fractions_and_seeds():
    """All [MASK], all random, all unchanged, and the default split, over several seeds."""
    ids, row_keys, word_ids = make_batch(6, 257, torch.int32, seed=4, words="short")
    for seed in (0, 1, 2**32 - 1):
        for mask_fraction, random_fraction in ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.8, 0.1)):
            cuda, torch_ = both_backends(ids, row_keys, word_ids, seed, 0.3, mask_fraction=mask_fraction,
                                         random_fraction=random_fraction)
            assert_identical(cuda, torch_, ids)


@gpu
def test_non_contiguous_inputs():
    ids, row_keys, word_ids = make_batch(6, 40, torch.int64, seed=5, words="short")
    ids_t, words_t = ids.t().contiguous().t(), word_ids.t().contiguous().t()
    assert not ids_t.is_contiguous()
    cuda, torch_ = both_backends(ids_t, row_keys, words_t, seed=9, probability=0.4)
    assert_identical(cuda, torch_, ids)


# ------------------------------------------------------------------------------------------------
# Without a GPU


def test_cuda_backend_refuses_cpu_tensors():
    from bertfast.ops.mask_tokens import mask_tokens

    ids, row_keys, _ = make_batch(2, 5, torch.int64, seed=0)
    with pytest.raises(BackendUnavailableError, match=r"cuda: needs CUDA tensors \(got cpu\)"):
        mask_tokens(ids, row_keys, 0, vocab_size=VOCAB, mask_token_id=MASK_ID, special_token_ids=SPECIAL,
                    backend="cuda")


def _launch_args(**changes):
    args = dict(ids_ptr=16, out_ids_ptr=16, labels_ptr=16, row_keys_ptr=16, word_ids_ptr=0, special_ptr=16, rows=2,
                cols=5, ids_is_int32=False, seed=1, vocab_size=VOCAB, mask_token_id=MASK_ID,
                select_threshold=2516582, mask_threshold=13421773, random_threshold=15099494, stream=0)
    return {**args, **changes}


@pytest.mark.parametrize("changes, match", [
    ({"seed": -1}, "`seed`"), ({"seed": 2**32}, "`seed`"),
    ({"rows": -1}, "`rows`"), ({"cols": -1}, "`cols`"), ({"cols": 65535 * 256 + 1}, "`cols`"),
    ({"vocab_size": 0}, "`vocab_size`"), ({"vocab_size": 2**31 + 1, "ids_is_int32": True}, "`vocab_size`"),
    ({"mask_token_id": VOCAB}, "`mask_token_id`"), ({"mask_token_id": -1}, "`mask_token_id`"),
    ({"select_threshold": 2**24 + 1}, "`select_threshold`"), ({"mask_threshold": -1}, "`mask_threshold`"),
    ({"random_threshold": 2**25}, "`random_threshold`"),
    ({"ids_ptr": 0}, "`ids`"), ({"special_ptr": 0}, "`special`"),
])
def test_launcher_rejects_bad_arguments_before_any_launch(changes, match):
    """The C++ checks run before CUDA is touched, so they raise here too (no GPU needed)."""
    module = cuda_module()
    with pytest.raises(ValueError, match=match):
        module.mask_tokens(**_launch_args(**changes))


def test_empty_batch_launches_nothing():
    module = cuda_module()
    assert module.mask_tokens(**_launch_args(rows=0, ids_ptr=0, out_ids_ptr=0, labels_ptr=0, row_keys_ptr=0)) is None
    assert module.mask_tokens(**_launch_args(cols=0, ids_ptr=0, out_ids_ptr=0, labels_ptr=0)) is None
