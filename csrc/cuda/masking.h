// On-device dynamic MLM masking (Bernoulli mode), called by bertfast/ops/mask_tokens.py's cuda
// backend. Plain C++ launcher: device pointers as integers (0 = absent), the cudaStream_t handle as
// an integer. No CUDA header here: masking_bind.cpp is compiled by the host compiler. Algorithm and
// layout: masking.cu.
#pragma once

#include <cstdint>

namespace bertfast {

// ids / out_ids: (rows, cols) contiguous, int32 if ids_is_int32 else int64; labels: int64 (rows, cols);
// row_keys: int64 (rows,) holding uint32 values; word_ids: int32 (rows, cols) or 0; special: uint8
// (vocab_size,), 1 = never mask. Every id must lie in [0, vocab_size): the caller checks (the kernel
// indexes `special` with it). out_ids must not overlap ids (threads read their neighbours' ids while
// others write). Thresholds are round(p * 2^24) in [0, 2^24]; seed in [0, 2^32). Asynchronous on `stream`.
void mask_tokens(uintptr_t ids, uintptr_t out_ids, uintptr_t labels, uintptr_t row_keys, uintptr_t word_ids,
                 uintptr_t special, int64_t rows, int64_t cols, bool ids_is_int32, int64_t seed, int64_t vocab_size,
                 int64_t mask_token_id, int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold,
                 uintptr_t stream);

}  // namespace bertfast
