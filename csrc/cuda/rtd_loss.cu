// ELECTRA replaced-token-detection head after its dense GEMM: bias + GELU + prediction dot + BCE loss,
// forward and backward. The same math, inputs and outputs as the Triton kernels (kernels/rtd_loss.py),
// so the cuda backend runs through the same custom ops (bertfast/ops/rtd_loss.py).
//
// Per row r of z = hidden @ W_dense^T (rows = B * T, inner columns), in float32:
//     t_r = z_r + b_dense      a_r = gelu(t_r)      x_r = a_r . w_pred + b_pred      (x_r: the logit)
//     loss = sum_r m_r softplus(s_r) / max(sum_r m_r, 1),   s_r = -x_r if y_r else x_r
//     rho_r = m_r (sigmoid(x_r) - y_r) = m_r sign_r sigmoid(s_r)           (kept for the backward)
// softplus(s) = max(s, 0) + log1p(exp(-|s|)) has no cancellation (most tokens are confident originals).
// Backward, from dlogits and / or dloss (coef = dloss / count):
//     g_r = dlogits_r + coef rho_r      dz_r = g_r w_pred gelu'(t_r)
//     dw_pred = sum_r g_r a_r      db_dense = sum_r dz_r (float32, before dz is rounded)      db_pred = sum_r g_r
// GELU: erf form a = t Phi(t), a' = Phi(t) + t phi(t); tanh form a = t sigmoid(2u),
// u = sqrt(2/pi) (t + 0.044715 t^3), a' = s + 2 t s (1 - s) u', with 1 - s = sigmoid(-2u) (no cancellation).
//
// Layout. Forward: one warp per row, 8 rows per 256-thread block; each lane takes 16 bytes of the row
// at a time (4 float32 or 8 half), as one vector load when the sizes and pointers allow, else as
// scalar loads. The warp reduces by xor shuffles; lane 0 of each warp puts its row's loss term and
// real-token flag in shared memory and thread 0 adds the 8 in a fixed order: one partial per block,
// summed by torch afterwards. Backward: block (row group, column chunk of 32 lanes x 16 bytes); warp w
// walks rows first + w, first + w + 8, ... of the group, each lane keeping float32 column sums of its
// 16 bytes in registers; the 8 warps' sums are added in a fixed order through shared memory into
// (groups, inner) partials that torch sums. No atomics anywhere: results are bitwise reproducible.
// The two sums over every row, the loss and db_pred, add their float32 terms in float64 (one add per
// row, cheap on any card) into float64 partials, so the summing adds no error beyond the final
// rounding, whatever the batch size.
// The column sums dw_pred and db_dense stay float32, as in the Triton kernels.
// Row offsets are int64. Padding rows add exactly 0 to the loss and count (a select, so not even NaN
// in a padded row of z reaches them).
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "device.cuh"
#include "rtd_loss.h"

namespace bertfast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxGroups = 256;
constexpr int64_t kMaxChunks = 65535;  // gridDim.y

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kKappa = 0.044715f;

// exp overflows to inf for x << 0: 1 / inf = 0, the right limit.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <bool TANH>
__device__ __forceinline__ float gelu(float t) {
  if constexpr (TANH) {
    const float u = kSqrt2OverPi * (t + kKappa * t * t * t);
    return t * sigmoid(2.0f * u);
  } else {
    return t * (0.5f + 0.5f * erff(t * kSqrt1_2));
  }
}

template <bool TANH>
__device__ __forceinline__ void gelu_and_grad(float t, float& a, float& da) {
  if constexpr (TANH) {
    const float u = kSqrt2OverPi * (t + kKappa * t * t * t);
    const float s = sigmoid(2.0f * u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kKappa * t * t);
    a = t * s;
    da = s + 2.0f * t * s * sigmoid(-2.0f * u) * du;
  } else {
    const float cdf = 0.5f + 0.5f * erff(t * kSqrt1_2);
    a = t * cdf;
    da = cdf + t * (kInvSqrt2Pi * expf(-0.5f * t * t));
  }
}

__device__ __forceinline__ float softplus(float s) { return fmaxf(s, 0.0f) + log1pf(expf(-fabsf(s))); }

// The kPack<T> elements of row `p` from column `col`, as float32; 0 past `inner`. VEC: the launcher
// checked inner % kPack == 0 and 16-byte alignment of p + col, so a lane's 16 bytes are all in the
// row or all past it.
template <typename T, bool VEC>
__device__ __forceinline__ void load_elems(const T* __restrict__ p, int64_t col, int64_t inner,
                                           float (&out)[kPack<T>]) {
  if constexpr (VEC) {
    if (col < inner) {
      const Pack16<T> pack = *reinterpret_cast<const Pack16<T>*>(p + col);
#pragma unroll
      for (int i = 0; i < kPack<T>; ++i) out[i] = to_float(pack.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kPack<T>; ++i) out[i] = 0.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPack<T>; ++i) out[i] = col + i < inner ? to_float(p[col + i]) : 0.0f;
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_elems(T* __restrict__ p, int64_t col, int64_t inner,
                                            const float (&in)[kPack<T>]) {
  if constexpr (VEC) {
    if (col < inner) {
      Pack16<T> pack;
#pragma unroll
      for (int i = 0; i < kPack<T>; ++i) pack.v[i] = from_float<T>(in[i]);
      *reinterpret_cast<Pack16<T>*>(p + col) = pack;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPack<T>; ++i) {
      if (col + i < inner) p[col + i] = from_float<T>(in[i]);
    }
  }
}

// Label of `row` (nonzero = replaced), read at its own width: the sign does not matter for != 0.
__device__ __forceinline__ bool is_replaced(const void* labels, int label_bytes, int64_t row) {
  switch (label_bytes) {
    case 1: return static_cast<const uint8_t*>(labels)[row] != 0;
    case 2: return static_cast<const uint16_t*>(labels)[row] != 0;
    case 4: return static_cast<const uint32_t*>(labels)[row] != 0;
    default: return static_cast<const unsigned long long*>(labels)[row] != 0;
  }
}

template <typename T>
struct FwdArgs {
  const T* z;
  const T* dense_bias;  // nullptr: none
  const T* pred_w;
  const T* pred_b;  // nullptr: none
  const void* labels;  // nullptr: logits only
  const uint8_t* mask;  // nullptr: every row is real
  T* logits;
  float* rho;
  double* loss_part;
  float* count_part;
  int64_t rows;
  int64_t inner;
  int64_t stride_z;
  int label_bytes;
};

template <typename T, bool VEC, bool TANH, bool HAS_BIAS>
__global__ void __launch_bounds__(kThreads) rtd_fwd_kernel(FwdArgs<T> a) {
  constexpr int E = kPack<T>;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool row_ok = row < a.rows;

  float acc = 0.0f;
  if (row_ok) {
    const T* zr = a.z + row * a.stride_z;
    for (int64_t col = static_cast<int64_t>(lane) * E; col < a.inner; col += 32 * E) {
      float t[E], w[E];
      load_elems<T, VEC>(zr, col, a.inner, t);
      load_elems<T, VEC>(a.pred_w, col, a.inner, w);  // 0 past inner: those terms vanish
      if constexpr (HAS_BIAS) {
        float b[E];
        load_elems<T, VEC>(a.dense_bias, col, a.inner, b);
#pragma unroll
        for (int i = 0; i < E; ++i) t[i] += b[i];
      }
#pragma unroll
      for (int i = 0; i < E; ++i) acc += gelu<TANH>(t[i]) * w[i];
    }
  }
  acc = warp_sum(acc);  // the whole warp takes part, rows past the end with 0

  float loss = 0.0f, real = 0.0f;
  if (row_ok) {
    float x = acc;
    if (a.pred_b != nullptr) x += to_float(*a.pred_b);
    if (lane == 0) a.logits[row] = from_float<T>(x);
    if (a.labels != nullptr) {
      const bool replaced = is_replaced(a.labels, a.label_bytes, row);
      const bool is_real = a.mask == nullptr || a.mask[row] != 0;
      const float s = replaced ? -x : x;  // from the float32 logit, not the stored (rounded) one
      if (is_real) {
        loss = softplus(s);
        real = 1.0f;
      }
      // d softplus(s) / dx = sign sigmoid(s) = sigmoid(x) - y, with no 1 - sigmoid cancellation
      if (lane == 0) a.rho[row] = is_real ? (replaced ? -sigmoid(s) : sigmoid(s)) : 0.0f;
    }
  }
  if (a.labels != nullptr) {  // the same for the whole block: every thread reaches the barrier
    __shared__ double s_loss[kWarps];
    __shared__ float s_count[kWarps];
    if (lane == 0) {
      s_loss[warp] = loss;
      s_count[warp] = real;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double l = 0.0;
      float c = 0.0f;  // exact: an integer count
      for (int i = 0; i < kWarps; ++i) {  // fixed order: deterministic
        l += s_loss[i];
        c += s_count[i];
      }
      a.loss_part[blockIdx.x] = l;
      a.count_part[blockIdx.x] = c;
    }
  }
}

template <typename T>
struct BwdArgs {
  const T* z;
  const T* dense_bias;  // nullptr: none
  const T* pred_w;
  const T* dlogits;  // nullptr: no gradient reaches the logits
  const float* rho;  // nullptr: no loss gradient (then coef is nullptr too)
  const float* coef;  // dloss / count, one float32 on the device (read there: no host sync)
  T* dz;
  float* dw_part;
  float* db_part;
  double* dbp_part;
  int64_t rows;
  int64_t inner;
  int64_t stride_z;
  int64_t stride_dz;
  int64_t rows_per_group;
};

// Min 3 blocks per SM caps registers at 80: without it ptxas (CUDA 13) picks 64 for the 8-wide half
// tanh kernel on sm_80 and spills; with it no instantiation spills.
template <typename T, bool VEC, bool TANH>
__global__ void __launch_bounds__(kThreads, 3) rtd_bwd_kernel(BwdArgs<T> a) {
  constexpr int E = kPack<T>;
  constexpr int kChunk = 32 * E;  // columns of one block
  __shared__ float s_dw[kWarps][kChunk];
  __shared__ float s_db[kWarps][kChunk];
  __shared__ double s_dbp[kWarps];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t group = blockIdx.x;
  const int64_t chunk_start = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t col = chunk_start + static_cast<int64_t>(lane) * E;

  float w[E], b[E];
  load_elems<T, VEC>(a.pred_w, col, a.inner, w);
  if (a.dense_bias != nullptr) {
    load_elems<T, VEC>(a.dense_bias, col, a.inner, b);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) b[i] = 0.0f;
  }
  const float coef = a.rho != nullptr ? *a.coef : 0.0f;

  float dw[E], db[E];
#pragma unroll
  for (int i = 0; i < E; ++i) dw[i] = db[i] = 0.0f;
  double dbp = 0.0;  // a sum over rows: float64, see the top of the file
  const int64_t first = group * a.rows_per_group;
  const int64_t last = first + a.rows_per_group < a.rows ? first + a.rows_per_group : a.rows;
  for (int64_t row = first + warp; row < last; row += kWarps) {
    float g = 0.0f;  // the same for every lane of the warp
    if (a.dlogits != nullptr) g += to_float(a.dlogits[row]);
    if (a.rho != nullptr) g += coef * a.rho[row];
    float t[E], d[E];
    load_elems<T, VEC>(a.z + row * a.stride_z, col, a.inner, t);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float act, dact;
      gelu_and_grad<TANH>(t[i] + b[i], act, dact);
      d[i] = g * w[i] * dact;  // 0 past inner (w = 0 there)
      dw[i] += g * act;
      db[i] += d[i];  // float32 dz, before the rounding of the store
    }
    store_elems<T, VEC>(a.dz + row * a.stride_dz, col, a.inner, d);
    dbp += g;
  }

#pragma unroll
  for (int i = 0; i < E; ++i) {
    s_dw[warp][lane * E + i] = dw[i];
    s_db[warp][lane * E + i] = db[i];
  }
  if (lane == 0) s_dbp[warp] = dbp;
  __syncthreads();
  for (int c = threadIdx.x; c < kChunk; c += kThreads) {
    float sw = 0.0f, sb = 0.0f;
    for (int i = 0; i < kWarps; ++i) {  // fixed order: deterministic
      sw += s_dw[i][c];
      sb += s_db[i][c];
    }
    const int64_t out_col = chunk_start + c;
    if (out_col < a.inner) {
      a.dw_part[group * a.inner + out_col] = sw;
      a.db_part[group * a.inner + out_col] = sb;
    }
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    double s = 0.0;
    for (int i = 0; i < kWarps; ++i) s += s_dbp[i];
    a.dbp_part[group] = s;
  }
}

// ----------------------------------------------------------------------------------------------
// Launchers

template <typename Fn>
void with_bool(bool flag, Fn fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

void check_dtype(int64_t dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(what) + ": `dtype` must be a dtype code 0, 1 or 2, got " +
                                std::to_string(dtype));
}

int64_t elems_of(int64_t dtype) { return dtype == kFloat32 ? 4 : 8; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void require(bool ok, const char* what, const char* message) {
  if (!ok) throw std::invalid_argument(std::string(what) + ": " + message);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t rtd_forward_blocks(int64_t rows) {
  require(rows >= 0, "rtd_forward_blocks", "`rows` must be >= 0");
  return cdiv(rows, kWarps);
}

std::pair<int64_t, int64_t> rtd_backward_groups(int64_t rows) {
  require(rows >= 0, "rtd_backward_groups", "`rows` must be >= 0");
  if (rows == 0) return {kWarps, 0};
  const int64_t per_group = kWarps * cdiv(cdiv(rows, kWarps), kMaxGroups);
  return {per_group, cdiv(rows, per_group)};
}

int64_t rtd_max_inner(int64_t dtype) {
  check_dtype(dtype, "rtd_max_inner");
  return kMaxChunks * 32 * elems_of(dtype);
}

void rtd_forward(uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t pred_b, uintptr_t labels,
                 int64_t label_bytes, uintptr_t mask, uintptr_t logits, uintptr_t rho, uintptr_t loss_part,
                 uintptr_t count_part, int64_t rows, int64_t inner, int64_t stride_z, int64_t dtype, bool tanh,
                 uintptr_t stream) {
  const char* what = "rtd_forward";
  check_dtype(dtype, what);
  require(rows >= 0, what, "`rows` must be >= 0");
  require(inner >= 0 && inner <= rtd_max_inner(dtype), what, "`inner` out of range (see rtd_max_inner)");
  require(stride_z >= 0, what, "`stride_z` must be >= 0");
  require(inner == 0 || (z != 0 && pred_w != 0), what, "`z` and `pred_w` must be device pointers");
  require(rows == 0 || logits != 0, what, "`logits` must be a device pointer");
  if (labels != 0) {
    require(label_bytes == 1 || label_bytes == 2 || label_bytes == 4 || label_bytes == 8, what,
            "`label_bytes` must be 1, 2, 4 or 8");
    require(rows == 0 || (rho != 0 && loss_part != 0 && count_part != 0), what,
            "with labels, `rho`, `loss_part` and `count_part` must be device pointers");
  }
  require(rtd_forward_blocks(rows) <= INT_MAX, what, "too many rows");
  if (rows == 0) return;
  const int64_t blocks = rtd_forward_blocks(rows);
  with_dtype(static_cast<int>(dtype), what, [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a{reinterpret_cast<const T*>(z), reinterpret_cast<const T*>(dense_bias),
                 reinterpret_cast<const T*>(pred_w), reinterpret_cast<const T*>(pred_b),
                 reinterpret_cast<const void*>(labels), reinterpret_cast<const uint8_t*>(mask),
                 reinterpret_cast<T*>(logits), reinterpret_cast<float*>(rho), reinterpret_cast<double*>(loss_part),
                 reinterpret_cast<float*>(count_part), rows, inner, stride_z, static_cast<int>(label_bytes)};
    const int64_t e = kPack<T>;
    const bool vec = inner % e == 0 && stride_z % e == 0 && aligned16(a.z) && aligned16(a.pred_w) &&
                     (a.dense_bias == nullptr || aligned16(a.dense_bias));
    with_bool(vec, [&](auto v) {
      with_bool(tanh, [&](auto th) {
        with_bool(a.dense_bias != nullptr, [&](auto hb) {
          rtd_fwd_kernel<T, decltype(v)::value, decltype(th)::value, decltype(hb)::value>
              <<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(a);
        });
      });
    });
  });
  check_launch(what);
}

void rtd_backward(uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t dlogits, uintptr_t rho,
                  uintptr_t coef, uintptr_t dz, uintptr_t dw_part, uintptr_t db_part, uintptr_t dbp_part,
                  int64_t rows, int64_t inner, int64_t stride_z, int64_t stride_dz, int64_t rows_per_group,
                  int64_t dtype, bool tanh, uintptr_t stream) {
  const char* what = "rtd_backward";
  check_dtype(dtype, what);
  require(rows >= 0, what, "`rows` must be >= 0");
  require(inner >= 0 && inner <= rtd_max_inner(dtype), what, "`inner` out of range (see rtd_max_inner)");
  require(stride_z >= 0 && stride_dz >= 0, what, "`stride_z` and `stride_dz` must be >= 0");
  require(rows_per_group > 0, what, "`rows_per_group` must be > 0");
  require((rho == 0) == (coef == 0), what, "`rho` and `coef` go together");
  require(inner == 0 || (z != 0 && pred_w != 0 && dz != 0 && dw_part != 0 && db_part != 0), what,
          "`z`, `pred_w`, `dz`, `dw_part` and `db_part` must be device pointers");
  require(rows == 0 || dbp_part != 0, what, "`dbp_part` must be a device pointer");
  const int64_t groups = cdiv(rows, rows_per_group);
  require(groups <= INT_MAX, what, "too many row groups: raise `rows_per_group`");
  if (rows == 0) return;
  with_dtype(static_cast<int>(dtype), what, [&](auto tag) {
    using T = decltype(tag);
    BwdArgs<T> a{reinterpret_cast<const T*>(z), reinterpret_cast<const T*>(dense_bias),
                 reinterpret_cast<const T*>(pred_w), reinterpret_cast<const T*>(dlogits),
                 reinterpret_cast<const float*>(rho), reinterpret_cast<const float*>(coef),
                 reinterpret_cast<T*>(dz), reinterpret_cast<float*>(dw_part), reinterpret_cast<float*>(db_part),
                 reinterpret_cast<double*>(dbp_part), rows, inner, stride_z, stride_dz, rows_per_group};
    const int64_t e = kPack<T>;
    const bool vec = inner % e == 0 && stride_z % e == 0 && stride_dz % e == 0 && aligned16(a.z) &&
                     aligned16(a.dz) && aligned16(a.pred_w) && (a.dense_bias == nullptr || aligned16(a.dense_bias));
    // At least one chunk: with inner == 0 the block still writes the prediction-bias partial.
    const int64_t chunks = inner == 0 ? 1 : cdiv(inner, 32 * e);
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(chunks));
    with_bool(vec, [&](auto v) {
      with_bool(tanh, [&](auto th) {
        rtd_bwd_kernel<T, decltype(v)::value, decltype(th)::value><<<grid, kThreads, 0, as_stream(stream)>>>(a);
      });
    });
  });
  check_launch(what);
}

}  // namespace bertfast
