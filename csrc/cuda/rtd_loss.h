// ELECTRA replaced-token-detection head after its dense GEMM (bertfast/ops/rtd_loss.py, cuda backend).
// Plain C++ launchers: device pointers as integers (0 = absent), sizes as int64_t, the dtype code of
// csrc/cuda/common.h, the cudaStream_t handle as an integer. No CUDA header here: the pybind11 side
// (rtd_loss_bind.cpp) is compiled by the host compiler. Formulas: rtd_loss.cu.
#pragma once

#include <cstdint>
#include <utility>

namespace bertfast {

// Forward: per row r of z (rows x inner, unit column stride, row stride stride_z, dtype `dtype`):
// logits[r] (z's dtype); with labels (label_bytes wide integers, nonzero = replaced) also rho[r]
// (float32) and, per block, loss_part (float64) and count_part (float32), rtd_forward_blocks(rows) of each.
// mask: uint8 per row or 0 (every row real). dense_bias / pred_b may be 0.
void rtd_forward(uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t pred_b, uintptr_t labels,
                 int64_t label_bytes, uintptr_t mask, uintptr_t logits, uintptr_t rho, uintptr_t loss_part,
                 uintptr_t count_part, int64_t rows, int64_t inner, int64_t stride_z, int64_t dtype, bool tanh,
                 uintptr_t stream);

// Number of per-block partial sums the forward writes for `rows` rows.
int64_t rtd_forward_blocks(int64_t rows);

// Backward: dz (rows x inner, row stride stride_dz, z's dtype) and per row group partial sums:
// dw_part, db_part (float32, groups x inner, contiguous) and dbp_part (float64, groups). dlogits (z's dtype,
// contiguous (rows,)) or 0; rho (float32 (rows,)) and coef (float32 scalar dloss / count) both or
// neither. dense_bias may be 0.
void rtd_backward(uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t dlogits, uintptr_t rho,
                  uintptr_t coef, uintptr_t dz, uintptr_t dw_part, uintptr_t db_part, uintptr_t dbp_part,
                  int64_t rows, int64_t inner, int64_t stride_z, int64_t stride_dz, int64_t rows_per_group,
                  int64_t dtype, bool tanh, uintptr_t stream);

// (rows per group, number of groups) of the backward for `rows` rows: at most 256 groups, each a
// multiple of the block's 8 warps.
std::pair<int64_t, int64_t> rtd_backward_groups(int64_t rows);

// The widest inner size the kernels take for a dtype code (the backward's grid has at most 65535
// column chunks).
int64_t rtd_max_inner(int64_t dtype);

}  // namespace bertfast
