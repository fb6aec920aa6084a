// Residual + dropout + LayerNorm over the last dim on CUDA: plain C++ launchers that take raw device
// pointers (uintptr_t, 0 for an absent tensor), sizes as int64_t, dtype codes (common.h) and the
// stream handle; bound as bertfast._cuda.layer_norm_forward / layer_norm_backward in
// layer_norm_bind.cpp. The math, and why each tensor is what it is, in layer_norm.cu.
#pragma once

#include <cstdint>

namespace bertfast {

// The widest row the kernels hold in registers (bertfast/ops/layer_norm.py CUDA_MAX_HIDDEN).
constexpr int64_t kLayerNormMaxN = 8192;

// y = LayerNorm(dropout(x) + residual) * weight + bias for `rows` rows of `n` elements.
// x, residual: (rows, n) of `dtype` with unit column stride and row strides stride_x, stride_r
// (elements); residual, weight, bias may be 0. weight, bias: (n,) of `param_dtype` (`dtype` or
// float32). y: (rows, n) contiguous, `dtype`. mean, rstd: (rows,) float32. seed: one int64 on the
// device, or 0 for no dropout; an element is kept iff top24(bits) >= drop_threshold, and a kept one
// is scaled by drop_scale.
void layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                        uintptr_t mean, uintptr_t rstd, uintptr_t seed, int64_t rows, int64_t n,
                        int64_t stride_x, int64_t stride_r, int dtype, int param_dtype, double eps,
                        int64_t drop_threshold, double drop_scale, uintptr_t stream);

// The gradients of layer_norm_forward. dx: (rows, n) contiguous; dr: the residual's gradient ds when
// it differs from dx (dropout with a residual), else 0. dw_part, db_part: (part_rows, n) float32
// buffers (or 0 when that gradient is not wanted); block b writes its partial sums over its rows into
// row b. Returns the number of blocks (rows of the buffers written); their column sums are dw, db.
int64_t layer_norm_backward(uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t mean,
                            uintptr_t rstd, uintptr_t seed, uintptr_t dx, uintptr_t dr, uintptr_t dw_part,
                            uintptr_t db_part, int64_t part_rows, int64_t rows, int64_t n, int64_t stride_dy,
                            int64_t stride_x, int64_t stride_r, int dtype, int param_dtype,
                            int64_t drop_threshold, double drop_scale, uintptr_t stream);

}  // namespace bertfast
