// Residual + dropout + LayerNorm over the last dim: CUDA kernels, forward and backward.
//
// Math, per row of x and r viewed as (rows, N), z = dropout keep mask, q = drop_scale = 1 / (1 - p):
//     s = z * q * x + r        mean = sum(s) / N        var = sum((s - mean)^2) / N
//     rstd = 1 / sqrt(var + eps)     xhat = (s - mean) * rstd     y = xhat * w + b
// Backward, with g = dy * w (w = 1 without a weight):
//     ds = rstd * (g - (xhat * mean(g * xhat) + mean(g)))   dr = ds     dx = z * q * ds
//     dw = sum over rows of dy * xhat                         db = sum over rows of dy
// the same formulas, outputs and saved statistics as the Triton kernels (kernels/layer_norm.py).
// Statistics and every accumulation are float32; weight and bias are read as float32 whatever their
// type (x's dtype, or float32 under autocast); y, dx, dr are stored in x's dtype. The forward saves
// only mean and rstd; the backward reloads x and r and regenerates the mask from the seed.
//
// Dropout: element (row, col) of stream 0 is kept iff top24(element_bits(stream_key(seed, 0), row,
// col)) >= drop_threshold (common/rng.h), the mask bertfast/ops/rng.py draws for the torch backend.
//
// Layout. A row is handled by a group of RT threads (RT a multiple of 32), a block holds G = BLOCK /
// RT groups (one row each). Thread t of a group owns the CHUNKS chunks k = 0 .. CHUNKS-1 of VEC = 16 /
// sizeof(T) consecutive columns starting at col = (k * RT + t) * VEC: consecutive threads touch
// consecutive 16 bytes (coalesced), and a chunk is one 16-byte load or store when N % VEC == 0 and
// every pointer and row stride is 16-byte aligned ("vec"); otherwise the same chunks are read element
// by element with a bound check each (the fallback, e.g. odd N or a sliced x). The row stays in
// registers (CHUNKS * VEC floats per thread), so the statistics are an exact two-pass mean/variance
// and x, r are read once. Rows past kLayerNormMaxN (8192) are refused in Python (the triton backend
// walks wider rows in chunks).
//   forward: RT = 32 (one warp per row, 8 rows per 256-thread block) for N <= 1024, else RT = 256
//            (one block per row): at most 32 row elements per thread.
//   backward: RT = 32 for N <= 512, 128 for N <= 2048, else 512: at most 16 elements per thread,
//            as each element holds four floats (xhat, dy and the dw, db accumulators).
// CHUNKS = ceil(N / (RT * VEC)) is a template argument (registers are indexed at compile time).
// A row's sums: warp shuffles, then (RT > 32) the warps' totals through shared memory in a fixed
// order, so every thread of a row gets the bitwise same mean and rstd.
//
// Backward grid: persistent, about as many blocks as are resident on the card; block b walks the
// row blocks b, b + grid, ... keeping its dw, db partial sums in registers, sums its groups' partials
// through shared memory in a fixed order and writes them to row b of a (part_rows, N) float32
// buffer; Python sums the rows (torch .sum(0)). No atomics: bitwise repeatable on one card.
#include "cuda/layer_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/rng.h"
#include "cuda/common.h"
#include "cuda/device.cuh"

namespace bertfast {
namespace {

constexpr int kWarp = 32;
constexpr int kFwdPerThread = 32;  // row elements held per thread, forward
constexpr int kBwdPerThread = 16;  // and backward
// The widest groups (forward 256 threads, backward 512) hold exactly the widest row.
static_assert(256 * kFwdPerThread == kLayerNormMaxN && 512 * kBwdPerThread == kLayerNormMaxN, "row capacity");

// Threads per block for rows of RT threads: 256, or one row per block when a row needs more.
template <int RT>
constexpr int block_threads() {
  return RT < 256 ? 256 : RT;
}

// ---------------------------------------------------------------------------------------------
// Memory access (conversions and packs: device.cuh)

// out = the VEC elements of `row` at col .. col+VEC-1 as float, 0 at and past n. vec: one or more
// 16-byte loads (the caller guarantees alignment and n % VEC == 0, so a chunk is wholly in or out).
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* row, int col, int n, bool vec, float (&out)[VEC]) {
  constexpr int PER = 16 / static_cast<int>(sizeof(T));
  static_assert(VEC % PER == 0, "a chunk is a whole number of 16-byte packs");
  if (vec) {
    if (col < n) {
      const Pack16<T>* p = reinterpret_cast<const Pack16<T>*>(row + col);
#pragma unroll
      for (int j = 0; j < VEC / PER; ++j) {
        const Pack16<T> pk = p[j];
#pragma unroll
        for (int i = 0; i < PER; ++i) out[j * PER + i] = to_float(pk.v[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = col + i < n ? to_float(row[col + i]) : 0.f;
  }
}

// Stores the VEC values at col .. col+VEC-1 of `row` in T, those before n only.
template <typename T, int VEC>
__device__ __forceinline__ void store_chunk(T* row, int col, int n, bool vec, const float (&v)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "outputs are stored in one 16-byte pack per chunk");
  if (vec) {
    if (col < n) {
      Pack16<T> pk;
#pragma unroll
      for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(v[i]);
      *reinterpret_cast<Pack16<T>*>(row + col) = pk;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (col + i < n) row[col + i] = from_float<T>(v[i]);
    }
  }
}

// weight or bias chunk as float: stored as float32 (p_float) or as T; the constant `absent` without one.
template <typename T, int VEC>
__device__ __forceinline__ void param_chunk(const void* p, bool p_float, int col, int n, bool vec, float absent,
                                            float (&out)[VEC]) {
  if (p != nullptr && p_float) {
    load_chunk<float, VEC>(static_cast<const float*>(p), col, n, vec, out);
  } else if (p != nullptr) {
    load_chunk<T, VEC>(static_cast<const T*>(p), col, n, vec, out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = absent;
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions

// Sums v[0..K) over the RT threads of one row group; every thread of the group gets the same totals.
// scratch: the group's RT / 32 * K floats of shared memory. With RT > 32 it holds two
// __syncthreads, so every thread of the block must call it (the callers' loops are block-uniform).
template <int RT, int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* scratch) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if constexpr (RT > kWarp) {
    constexpr int WARPS = RT / kWarp;
    const int warp = static_cast<int>(threadIdx.x % RT) / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) total += scratch[w * K + k];
      v[k] = total;
    }
    __syncthreads();  // the scratch is written again by the next call
  }
}

// dropout keeps (row, col): row_key = mix32(key ^ row), so mix32(row_key ^ col) = element_bits(key, row, col).
__device__ __forceinline__ bool kept(uint32_t row_key, int col, uint32_t threshold) {
  return top24(mix32(row_key ^ static_cast<uint32_t>(col))) >= threshold;
}

// The seed's low 32 bits (the Triton kernels' int64 -> uint32 and the torch backend's & 0xFFFFFFFF).
__device__ __forceinline__ uint32_t stream0_key(const int64_t* seed) {
  return stream_key(static_cast<uint32_t>(static_cast<uint64_t>(*seed)), 0u);
}

// ---------------------------------------------------------------------------------------------
// Kernels

struct FwdArgs {
  const void* x;
  const void* r;  // or null
  const void* w;  // or null
  const void* b;  // or null
  bool p_float;   // w, b stored as float32 (else as T)
  void* y;
  float* mean;
  float* rstd;
  const int64_t* seed;  // null: no dropout
  int64_t rows, stride_x, stride_r;
  int n;
  float eps;
  uint32_t threshold;
  float scale;
  bool vec;
};

template <typename T, int RT, int CHUNKS>
__global__ void __launch_bounds__(block_threads<RT>()) layer_norm_fwd_kernel(const FwdArgs a) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int G = block_threads<RT>() / RT;
  __shared__ float scratch[G][RT / kWarp];
  const int t = static_cast<int>(threadIdx.x) % RT;
  const int grp = static_cast<int>(threadIdx.x) / RT;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * G + grp;
  const int n = a.n;
  const bool active = row < a.rows;
  const int n_row = active ? n : 0;  // a group past the last row loads and stores nothing
  const int64_t at = active ? row : 0;  // and its pointers stay inside the tensors
  const T* x = static_cast<const T*>(a.x) + at * a.stride_x;
  const T* r = a.r != nullptr ? static_cast<const T*>(a.r) + at * a.stride_r : nullptr;
  const bool dropout = a.seed != nullptr;
  const uint32_t row_key = dropout ? mix32(stream0_key(a.seed) ^ static_cast<uint32_t>(row)) : 0u;

  float s[CHUNKS][VEC];
  float sum[1] = {0.f};
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
    const int col = (k * RT + t) * VEC;
    load_chunk<T, VEC>(x, col, n_row, a.vec, s[k]);
    if (dropout) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[k][i] = kept(row_key, col + i, a.threshold) ? s[k][i] * a.scale : 0.f;
    }
    if (r != nullptr) {
      float rv[VEC];
      load_chunk<T, VEC>(r, col, n_row, a.vec, rv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[k][i] += rv[i];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum[0] += s[k][i];  // 0 past the row
  }
  row_sum<RT, 1>(sum, scratch[grp]);
  const float mean = sum[0] / n;
  float sq[1] = {0.f};
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = s[k][i] - mean;
      if ((k * RT + t) * VEC + i < n_row) sq[0] += d * d;  // exact two-pass variance from registers
    }
  }
  row_sum<RT, 1>(sq, scratch[grp]);
  const float rstd = 1.0f / sqrtf(sq[0] / n + a.eps);

  T* y = static_cast<T*>(a.y) + at * n;
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
    const int col = (k * RT + t) * VEC;
    if (col < n_row) {
      float wv[VEC], bv[VEC], out[VEC];
      param_chunk<T, VEC>(a.w, a.p_float, col, n, a.vec, 1.f, wv);
      param_chunk<T, VEC>(a.b, a.p_float, col, n, a.vec, 0.f, bv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = (s[k][i] - mean) * rstd * wv[i] + bv[i];
      store_chunk<T, VEC>(y, col, n_row, a.vec, out);
    }
  }
  if (active && t == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

struct BwdArgs {
  const void* dy;
  const void* x;
  const void* r;  // or null
  const void* w;  // or null
  bool w_float;   // w stored as float32 (else as T)
  const float* mean;
  const float* rstd;
  const int64_t* seed;  // null: no dropout
  void* dx;
  void* dr;        // or null: dr = dx
  float* dw_part;  // (gridDim.x, n) or null
  float* db_part;  // (gridDim.x, n) or null
  int64_t rows, stride_dy, stride_x, stride_r;
  int n;
  uint32_t threshold;
  float scale;
  bool vec;
};

// Sums this block's per-thread partials acc over its G groups (fixed order) into out[0..n).
// Every thread of the block must call it (two __syncthreads).
template <int RT, int CHUNKS, int VEC>
__device__ __forceinline__ void write_partial(const float (&acc)[CHUNKS][VEC], float* part, float* out, int n) {
  constexpr int BLOCK = block_threads<RT>();
  constexpr int G = BLOCK / RT;
  constexpr int CAP = RT * CHUNKS * VEC;  // columns a group covers (>= n)
  const int t = static_cast<int>(threadIdx.x) % RT;
  const int grp = static_cast<int>(threadIdx.x) / RT;
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) part[grp * CAP + (k * RT + t) * VEC + i] = acc[k][i];
  }
  __syncthreads();
  for (int c = static_cast<int>(threadIdx.x); c < n; c += BLOCK) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) total += part[g * CAP + c];
    out[c] = total;
  }
  __syncthreads();  // `part` is written again by the next call
}

template <typename T, int RT, int CHUNKS>
__global__ void __launch_bounds__(block_threads<RT>()) layer_norm_bwd_kernel(const BwdArgs a) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int G = block_threads<RT>() / RT;
  static_assert(CHUNKS * VEC <= 32, "the keep mask of a thread's elements is one 32-bit word");
  __shared__ float scratch[G][RT / kWarp * 2];
  __shared__ float part[G * RT * CHUNKS * VEC];
  const int t = static_cast<int>(threadIdx.x) % RT;
  const int grp = static_cast<int>(threadIdx.x) / RT;
  const int n = a.n;
  const bool dropout = a.seed != nullptr;
  const uint32_t key = dropout ? stream0_key(a.seed) : 0u;

  float dw[CHUNKS][VEC], db[CHUNKS][VEC];
#pragma unroll
  for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[k][i] = db[k][i] = 0.f;
  }

  // The trip count depends on the block only: every thread reaches row_sum's barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int n_row = active ? n : 0;
    const int64_t at = active ? row : 0;
    const T* x = static_cast<const T*>(a.x) + at * a.stride_x;
    const T* r = a.r != nullptr ? static_cast<const T*>(a.r) + at * a.stride_r : nullptr;
    const T* dyr = static_cast<const T*>(a.dy) + at * a.stride_dy;
    const float mean = active ? a.mean[row] : 0.f;
    const float rstd = active ? a.rstd[row] : 0.f;
    const uint32_t row_key = dropout ? mix32(key ^ static_cast<uint32_t>(row)) : 0u;

    float xhat[CHUNKS][VEC], dyv[CHUNKS][VEC];
    uint32_t keep_bits = 0;  // bit k * VEC + i: element (k, i) kept
    float sums[2] = {0.f, 0.f};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int col = (k * RT + t) * VEC;
      float sv[VEC], wv[VEC];
      load_chunk<T, VEC>(x, col, n_row, a.vec, sv);
      if (dropout) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const bool keep = kept(row_key, col + i, a.threshold);
          keep_bits |= static_cast<uint32_t>(keep) << (k * VEC + i);
          sv[i] = keep ? sv[i] * a.scale : 0.f;
        }
      }
      if (r != nullptr) {
        float rv[VEC];
        load_chunk<T, VEC>(r, col, n_row, a.vec, rv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) sv[i] += rv[i];
      }
      load_chunk<T, VEC>(dyr, col, n_row, a.vec, dyv[k]);
      param_chunk<T, VEC>(a.w, a.w_float, col, n, a.vec, 1.f, wv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xhat[k][i] = col + i < n_row ? (sv[i] - mean) * rstd : 0.f;
        const float g = dyv[k][i] * wv[i];
        sums[0] += g * xhat[k][i];
        sums[1] += g;
      }
    }
    row_sum<RT, 2>(sums, scratch[grp]);
    const float c_xhat = sums[0] / n;
    const float c_one = sums[1] / n;

    T* dx = static_cast<T*>(a.dx) + at * n;
    T* dr = a.dr != nullptr ? static_cast<T*>(a.dr) + at * n : nullptr;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int col = (k * RT + t) * VEC;
      if (col < n_row) {
        float wv[VEC], ds[VEC];
        param_chunk<T, VEC>(a.w, a.w_float, col, n, a.vec, 1.f, wv);  // re-read from L1: fewer registers held
#pragma unroll
        for (int i = 0; i < VEC; ++i) ds[i] = (dyv[k][i] * wv[i] - (xhat[k][i] * c_xhat + c_one)) * rstd;
        if (dr != nullptr) store_chunk<T, VEC>(dr, col, n_row, a.vec, ds);
        if (dropout) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) ds[i] = (keep_bits >> (k * VEC + i)) & 1u ? ds[i] * a.scale : 0.f;
        }
        store_chunk<T, VEC>(dx, col, n_row, a.vec, ds);
      }
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {  // 0 past the row and for an idle group
        dw[k][i] += dyv[k][i] * xhat[k][i];
        db[k][i] += dyv[k][i];
      }
    }
  }
  // Block-uniform conditions (kernel arguments): the barriers inside are reached by every thread.
  if (a.dw_part != nullptr) write_partial<RT, CHUNKS, VEC>(dw, part, a.dw_part + static_cast<int64_t>(blockIdx.x) * n, n);
  if (a.db_part != nullptr) write_partial<RT, CHUNKS, VEC>(db, part, a.db_part + static_cast<int64_t>(blockIdx.x) * n, n);
}

// ---------------------------------------------------------------------------------------------
// Host side: checks, configuration, dispatch

void require(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(fn) + ": " + what);
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

// Checks shared by both launchers (before any CUDA call).
void check_common(const char* fn, int64_t rows, int64_t n, int dtype, int param_dtype, bool has_param,
                  int64_t drop_threshold, double drop_scale) {
  require(rows >= 0 && rows < (int64_t{1} << 31), fn, "`rows` must be in [0, 2^31), got " + std::to_string(rows));
  require(n >= 1 && n <= kLayerNormMaxN, fn,
          "`n` must be in [1, " + std::to_string(kLayerNormMaxN) + "], got " + std::to_string(n));
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, fn,
          "`dtype` must be a dtype code 0, 1 or 2, got " + std::to_string(dtype));
  require(!has_param || param_dtype == dtype || param_dtype == kFloat32, fn,
          "`param_dtype` must be x's dtype code or float32's (0), got " + std::to_string(param_dtype));
  require(drop_threshold >= 0 && drop_threshold <= (int64_t{1} << 24), fn,
          "`drop_threshold` must be in [0, 2^24], got " + std::to_string(drop_threshold));
  require(drop_scale >= 0.0, fn, "`drop_scale` must be >= 0, got " + std::to_string(drop_scale));
}

// fn(std::integral_constant<int, C>{}) for C = chunks, MIN <= chunks <= MAX (the kernels built).
template <int MIN, int MAX, typename Fn>
void with_chunks(int chunks, Fn&& fn) {
  if constexpr (MAX >= MIN) {
    if (chunks == MAX) {
      fn(std::integral_constant<int, MAX>{});
      return;
    }
    with_chunks<MIN, MAX - 1>(chunks, fn);
  } else {
    throw std::logic_error("layer_norm: no kernel for " + std::to_string(chunks) + " chunks per thread");
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// The chunks per thread of rows of n elements in groups of RT threads: ceil(n / (RT * VEC)). Rows
// longer than BELOW elements (the smaller groups' capacity) and at most RT * PER take between
// BELOW / (RT * VEC) + 1 and PER / VEC chunks: only those kernels are built.
template <typename T, int RT, int BELOW, int PER, typename Fn>
void with_group(int64_t n, Fn&& fn) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static_assert(PER % VEC == 0, "whole chunks per thread");
  with_chunks<BELOW / (RT * VEC) + 1, PER / VEC>(ceil_div(n, RT * VEC), fn);
}

template <typename T, int RT, int CHUNKS>
void launch_forward(const FwdArgs& a, cudaStream_t stream) {
  constexpr int BLOCK = block_threads<RT>();
  constexpr int G = BLOCK / RT;
  const unsigned grid = static_cast<unsigned>((a.rows + G - 1) / G);
  layer_norm_fwd_kernel<T, RT, CHUNKS><<<grid, BLOCK, 0, stream>>>(a);
  check_launch("layer_norm_forward");
}

// The persistent backward grid: blocks resident on the current device at once, at most one per
// row block and at most `cap` (the rows of the partial buffers).
template <typename T, int RT, int CHUNKS>
int64_t launch_backward(const BwdArgs& a, int64_t cap, cudaStream_t stream) {
  constexpr int BLOCK = block_threads<RT>();
  constexpr int G = BLOCK / RT;
  auto kernel = layer_norm_bwd_kernel<T, RT, CHUNKS>;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, BLOCK, 0);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it is not reported as a launch failure later
    throw std::runtime_error(std::string("layer_norm_backward: cannot size the grid: ") + cudaGetErrorString(err));
  }
  int64_t grid = std::min<int64_t>((a.rows + G - 1) / G, int64_t{std::max(sms, 1)} * std::max(per_sm, 1));
  grid = std::max<int64_t>(1, std::min(grid, cap));
  kernel<<<static_cast<unsigned>(grid), BLOCK, 0, stream>>>(a);
  check_launch("layer_norm_backward");
  return grid;
}

}  // namespace

void layer_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y,
                        uintptr_t mean, uintptr_t rstd, uintptr_t seed, int64_t rows, int64_t n,
                        int64_t stride_x, int64_t stride_r, int dtype, int param_dtype, double eps,
                        int64_t drop_threshold, double drop_scale, uintptr_t stream) {
  const char* fn = "layer_norm_forward";
  const bool has_param = weight != 0 || bias != 0;
  check_common(fn, rows, n, dtype, param_dtype, has_param, drop_threshold, drop_scale);
  require(eps > 0.0, fn, "`eps` must be positive, got " + std::to_string(eps));
  require(stride_x >= 0 && stride_r >= 0, fn, "`stride_x`, `stride_r` must be >= 0");
  if (rows == 0) return;
  require(x != 0 && y != 0 && mean != 0 && rstd != 0, fn, "`x`, `y`, `mean` and `rstd` must be device pointers");

  with_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    const int64_t bytes = sizeof(T);
    const bool vec = n % VEC == 0 && aligned16(x) && aligned16(y) && (stride_x * bytes) % 16 == 0 &&
                     (residual == 0 || (aligned16(residual) && (stride_r * bytes) % 16 == 0)) &&
                     aligned16(weight) && aligned16(bias);  // 0 counts as aligned
    const FwdArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(residual),
                    reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias),
                    has_param && param_dtype == kFloat32, reinterpret_cast<void*>(y),
                    reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd),
                    reinterpret_cast<const int64_t*>(seed), rows, stride_x, stride_r, static_cast<int>(n),
                    static_cast<float>(eps), static_cast<uint32_t>(drop_threshold), static_cast<float>(drop_scale),
                    vec};
    const cudaStream_t s = as_stream(stream);
    constexpr int WARP_ROWS = kWarp * kFwdPerThread;  // the widest row one warp takes: 1024
    if (n <= WARP_ROWS) {
      with_group<T, kWarp, 0, kFwdPerThread>(n, [&](auto c) { launch_forward<T, kWarp, decltype(c)::value>(a, s); });
    } else {
      with_group<T, 256, WARP_ROWS, kFwdPerThread>(n, [&](auto c) { launch_forward<T, 256, decltype(c)::value>(a, s); });
    }
  });
}

int64_t layer_norm_backward(uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t mean,
                            uintptr_t rstd, uintptr_t seed, uintptr_t dx, uintptr_t dr, uintptr_t dw_part,
                            uintptr_t db_part, int64_t part_rows, int64_t rows, int64_t n, int64_t stride_dy,
                            int64_t stride_x, int64_t stride_r, int dtype, int param_dtype,
                            int64_t drop_threshold, double drop_scale, uintptr_t stream) {
  const char* fn = "layer_norm_backward";
  check_common(fn, rows, n, dtype, param_dtype, weight != 0, drop_threshold, drop_scale);
  require(stride_dy >= 0 && stride_x >= 0 && stride_r >= 0, fn, "`stride_dy`, `stride_x`, `stride_r` must be >= 0");
  require(dw_part == 0 || weight != 0, fn, "`dw_part` needs a `weight`");
  const bool parts = dw_part != 0 || db_part != 0;
  require(!parts || part_rows >= 1, fn,
          "`part_rows` must be >= 1 with a partial buffer, got " + std::to_string(part_rows));
  if (rows == 0) return 0;
  require(dy != 0 && x != 0 && mean != 0 && rstd != 0 && dx != 0, fn,
          "`dy`, `x`, `mean`, `rstd` and `dx` must be device pointers");
  const int64_t cap = parts ? part_rows : int64_t{1} << 31;

  int64_t grid = 0;
  with_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    const int64_t bytes = sizeof(T);
    const bool vec = n % VEC == 0 && aligned16(dy) && aligned16(x) && aligned16(dx) && aligned16(dr) &&
                     (stride_dy * bytes) % 16 == 0 && (stride_x * bytes) % 16 == 0 &&
                     (residual == 0 || (aligned16(residual) && (stride_r * bytes) % 16 == 0)) &&
                     aligned16(weight);
    const BwdArgs a{reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x),
                    reinterpret_cast<const void*>(residual), reinterpret_cast<const void*>(weight),
                    weight != 0 && param_dtype == kFloat32, reinterpret_cast<const float*>(mean),
                    reinterpret_cast<const float*>(rstd), reinterpret_cast<const int64_t*>(seed),
                    reinterpret_cast<void*>(dx), reinterpret_cast<void*>(dr), reinterpret_cast<float*>(dw_part),
                    reinterpret_cast<float*>(db_part), rows, stride_dy, stride_x, stride_r, static_cast<int>(n),
                    static_cast<uint32_t>(drop_threshold), static_cast<float>(drop_scale), vec};
    const cudaStream_t s = as_stream(stream);
    constexpr int WARP_ROWS = kWarp * kBwdPerThread;  // 512
    constexpr int MID_ROWS = 128 * kBwdPerThread;     // 2048
    if (n <= WARP_ROWS) {
      with_group<T, kWarp, 0, kBwdPerThread>(n, [&](auto c) {
        grid = launch_backward<T, kWarp, decltype(c)::value>(a, cap, s);
      });
    } else if (n <= MID_ROWS) {
      with_group<T, 128, WARP_ROWS, kBwdPerThread>(n, [&](auto c) {
        grid = launch_backward<T, 128, decltype(c)::value>(a, cap, s);
      });
    } else {
      with_group<T, 512, MID_ROWS, kBwdPerThread>(n, [&](auto c) {
        grid = launch_backward<T, 512, decltype(c)::value>(a, cap, s);
      });
    }
  });
  return grid;
}

}  // namespace bertfast
