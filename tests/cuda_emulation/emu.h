// The part of CUDA that csrc/cuda uses, on the host, so that CI (no GPU) runs the real kernels.
//
// tests/cuda_emulation/build.py compiles csrc/cuda/*.cu with g++ against this header (the shims in
// include/ stand in for <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>), after rewriting the two
// things a macro cannot express: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `emu::launch(site, kernel, emu::Config(grid, block, smem, stream), args)`, and each `__shared__`
// declaration becomes a reference into the block's shared memory (`emu::shared<T>`).
//
// Execution model (emu.cpp): a launch runs its blocks one after another; the threads of a block
// are fibers on the calling host thread. A fiber runs until it reaches a barrier or a warp
// collective, then the next one runs. A barrier completes when every thread of the block is at it;
// a warp collective (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp) when every lane its
// mask names is at one with the same mask. That is the CUDA contract since Volta (independent
// thread scheduling): lanes of a warp agree only where they synchronize, so this is faithful to
// correct code, and it is strict where CUDA says "undefined": a barrier that some threads of the
// block skipped or exited past, a collective whose mask names an exited lane, lanes of one mask at
// different collectives, a deadlock -- each aborts the launch with a message, read back through
// cudaGetLastError / cudaGetErrorString, as a kernel fault is on a GPU. So does a misaligned access
// (the kernels' 16-byte vector loads on a misaligned pointer): build.py compiles the kernels with
// -fsanitize=alignment and emu.cpp handles its reports. Between two barriers the warps of a block
// run one after another in a pseudo-random order, each as far as it can go (through its own
// collectives), its lanes in a pseudo-random order too; shared memory and the top of each fiber's
// stack start as 0xFF bytes (NaN in float) at each block. So a barrier missing between two warps'
// accesses to shared memory, or a read of memory nobody wrote, changes the results.
//
// Not emulated: timing, occupancy, register limits and __launch_bounds__ (accepted, ignored), streams
// (every launch runs to completion before returning), atomics' contention, spin-waits on another
// thread (a fiber yields only at a barrier or collective), the GPU's math library (host libm: results
// may differ from the device's in the last bits), fused multiply-add contraction (nvcc fuses a * b + c
// by default, g++ here does not), out-of-bounds global accesses (host memory: garbage or a crash),
// __CUDA_ARCH__-specific code (not defined here), the 48 KiB static shared limit only as far as the
// declarations a block executes.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
// build.py rewrites every __shared__ declaration; one it missed fails to compile here.
#define __shared__ EMU_ERROR_this_shared_declaration_was_not_rewritten_by_build_py
#define CUDART_VERSION 13000

// ---------------------------------------------------------------------------------------------
// Built-in types and variables

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

// Set by the scheduler before it resumes a thread (a fiber runs only between synchronizations).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

#define EMU_VECTOR2(T, name, align)                     \
  struct __align__(align) name {                        \
    T x, y;                                             \
  };                                                    \
  inline name make_##name(T x, T y) { return {x, y}; }
#define EMU_VECTOR4(T, name, align)                                     \
  struct __align__(align) name {                                        \
    T x, y, z, w;                                                       \
  };                                                                    \
  inline name make_##name(T x, T y, T z, T w) { return {x, y, z, w}; }
EMU_VECTOR2(float, float2, 8)
EMU_VECTOR4(float, float4, 16)
EMU_VECTOR2(int, int2, 8)
EMU_VECTOR4(int, int4, 16)
EMU_VECTOR2(unsigned, uint2, 8)
EMU_VECTOR4(unsigned, uint4, 16)
EMU_VECTOR2(double, double2, 16)
#undef EMU_VECTOR2
#undef EMU_VECTOR4

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: 16-bit storage; conversions round to nearest even, bit for bit as the
// device's cvt.rn (NaN becomes the canonical 0x7FFF, as in CUDA's own host conversions).

namespace emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t half_from_float(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FFF;
  if (a >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 = max half + half an ulp: rounds to inf
  const uint32_t e = a >> 23;
  if (e >= 113) {  // a normal half: rebias the exponent (127 -> 15), round away 13 mantissa bits
    const uint32_t m = a - (112u << 23);
    uint32_t h = m >> 13;
    const uint32_t rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return static_cast<uint16_t>(sign | h);
  }
  if (e < 102) return sign;  // below 2^-25, half the smallest subnormal: rounds to zero
  // a subnormal half: the value in units of 2^-24 is the mantissa (implicit bit set) >> (126 - e)
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - static_cast<int>(e);  // 14 .. 24
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u), tie = 1u << (shift - 1);
  if (rest > tie || (rest == tie && (h & 1u))) ++h;  // may round up to the smallest normal: right
  return static_cast<uint16_t>(sign | h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;  // exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t bfloat16_from_float(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // overflow to inf is right
}

inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace emu

struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(emu::half_from_float(f)) {}
  operator float() const { return emu::half_to_float(__x); }
};

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(emu::bfloat16_from_float(f)) {}
  operator float() const { return emu::bfloat16_to_float(__x); }
};

inline float __half2float(__half h) { return emu::half_to_float(h.__x); }
inline __half __ushort_as_half(unsigned short x) {
  __half h;
  h.__x = x;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __ushort_as_half(emu::half_from_float(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bfloat16_to_float(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
  __nv_bfloat16 b;
  b.__x = x;
  return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(emu::bfloat16_from_float(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---------------------------------------------------------------------------------------------
// Device functions without a host libm twin (the rest, expf, erff, log1pf, ..., are <math.h>'s)

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// Atomics are plain read-modify-writes: fibers of a block never interleave within one.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T expected, T v) {
  const T old = *p;
  if (old == expected) *p = v;
  return old;
}

// ---------------------------------------------------------------------------------------------
// Runtime API

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {  // the codes of CUDA's driver_types.h
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

// Errors are per host thread, as in CUDA. cudaGetLastError returns and clears the last one (a
// GPU's kernel faults are sticky; here the next launch starts clean).
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

namespace emu {

// The emulated card: `sms` multiprocessors, each holding min(max_blocks_per_sm, 2048 / block
// threads) blocks (the occupancy the persistent kernels size their grids by). Set from Python
// through emu_configure (emu.cpp) to make grids small enough that blocks walk several row blocks.
struct Device {
  int sms = 2;
  int max_blocks_per_sm = 32;
};
Device& device();

// ---------------------------------------------------------------------------------------------
// Launch

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t shared_bytes = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), smem(shared_bytes), stream(s) {}
};

namespace detail {
// Runs body() once per thread of every block (emu.cpp); a bad configuration or a fault sets the
// last error instead.
void run_grid(const char* site, const Config& cfg, const std::function<void()>& body);
}  // namespace detail

// kernel<<<cfg>>>(args...): the arguments are converted to the kernel's parameter types once, at
// the launch (as CUDA copies them), and every thread gets its own copy.
template <typename... P, typename... A>
void launch(const char* site, void (*kernel)(P...), const Config& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "a kernel launch must pass every argument");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  detail::run_grid(site, cfg, [&] { std::apply(kernel, params); });
}

// ---------------------------------------------------------------------------------------------
// Shared memory and collectives (emu.cpp)

namespace detail {
void* shared_slot(const void* site, size_t bytes);  // this block's storage of one declaration
void* dynamic_shared();                              // this block's `extern __shared__` bytes

enum class Op : int { barrier, barrier_count, barrier_and, barrier_or, shfl, shfl_up, shfl_down, shfl_xor, ballot,
                      any, all, syncwarp };
// Waits until the collective completes (see the top of the file) and returns this thread's result.
uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width);

template <typename T>
T shuffle(Op op, unsigned mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = collective(op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace detail

// `__shared__ T name[dims];` -> `auto& name = emu::shared<T[dims]>([] {});`: the lambda's type
// makes each declaration (and each template instance of it) a distinct variable.
template <typename T, typename Site>
T& shared(Site) {
  static const char site = 0;
  return *static_cast<T*>(detail::shared_slot(&site, sizeof(T)));
}

}  // namespace emu

inline void __syncthreads() { emu::detail::collective(emu::detail::Op::barrier, 0, 0, 0, 0); }
inline int __syncthreads_count(int p) {
  return static_cast<int>(emu::detail::collective(emu::detail::Op::barrier_count, 0, p != 0, 0, 0));
}
inline int __syncthreads_and(int p) {
  return static_cast<int>(emu::detail::collective(emu::detail::Op::barrier_and, 0, p != 0, 0, 0));
}
inline int __syncthreads_or(int p) {
  return static_cast<int>(emu::detail::collective(emu::detail::Op::barrier_or, 0, p != 0, 0, 0));
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { emu::detail::collective(emu::detail::Op::syncwarp, mask, 0, 0, 32); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return emu::detail::shuffle(emu::detail::Op::shfl, mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shuffle(emu::detail::Op::shfl_up, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shuffle(emu::detail::Op::shfl_down, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return emu::detail::shuffle(emu::detail::Op::shfl_xor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(emu::detail::collective(emu::detail::Op::ballot, mask, p != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int p) {
  return static_cast<int>(emu::detail::collective(emu::detail::Op::any, mask, p != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int p) {
  return static_cast<int>(emu::detail::collective(emu::detail::Op::all, mask, p != 0, 0, 32));
}

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int block_threads, size_t) {
  if (block_threads < 1 || block_threads > 1024) return cudaErrorInvalidValue;
  const int fit = 2048 / block_threads;
  *blocks = fit < emu::device().max_blocks_per_sm ? fit : emu::device().max_blocks_per_sm;
  return cudaSuccess;
}
