// Kernels that pin down the emulation itself (tests/test_cuda_emulated.py calls the extern "C"
// functions below through ctypes): conversions, collectives, shared memory, and the faults a GPU
// would raise. Built by build.py like csrc/cuda's files.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Block of 64 (two warps); out[t * 8 + k] is probe k of thread t.
__global__ void collectives_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 8;
  o[0] = __shfl_sync(0xFFFFFFFFu, t * 10, lane * 7);  // source lane (7 lane) mod 32
  o[1] = __shfl_up_sync(0xFFFFFFFFu, t, 3);
  o[2] = __shfl_down_sync(0xFFFFFFFFu, t, 5, 16);
  o[3] = __shfl_xor_sync(0xFFFFFFFFu, t, 9, 8);  // segments of 8: lane ^ 9 leaves the lane's own
  o[4] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, lane % 3 == 0));
  o[5] = __any_sync(0xFFFFFFFFu, t == 40) + 2 * __all_sync(0xFFFFFFFFu, t < 63);
  o[6] = lane < 16 ? __shfl_xor_sync(0x0000FFFFu, t, 1) : __shfl_xor_sync(0xFFFF0000u, t, 2);  // two groups
  o[7] = __syncthreads_count(t % 5 == 0);
}

// Blocks of n threads (not a multiple of 32): out[b * n + t] = in[b * n + n - 1 - t] through dynamic
// shared memory; out[grid * n + b] = the block's sum, through a static shared variable.
__global__ void reverse_kernel(const float* in, float* out) {
  extern __shared__ float buf[];
  __shared__ float total;
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  if (t == 0) total = 0.0f;
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
  atomicAdd(&total, buf[t]);
  __syncthreads();
  if (t == 0) out[gridDim.x * n + blockIdx.x] = total;
}

// Two blocks of 32: block 0 writes all of s, block 1 half of it; each copies s to out.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float s[32];
  if (blockIdx.x == 0 || threadIdx.x < 16) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

// Each `which` breaks one rule of CUDA's execution model (blocks of 64).
__global__ void fault_kernel(int which, const float* in, float* out) {
  const int t = threadIdx.x, lane = t % 32;
  float v = in[t];
  switch (which) {
    case 0:  // a barrier only warp 0 reaches; warp 1 exits
      if (t < 32) __syncthreads();
      break;
    case 1:  // lane 5 exits before a full-warp shuffle
      if (t == 5) return;
      v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
      break;
    case 2: {  // a 16-byte load from a 4-byte aligned address
      const float4 q = *reinterpret_cast<const float4*>(in + 1);
      v = q.x;
      break;
    }
    case 3:  // half of warp 0 at a shuffle of the whole warp, everyone else at a barrier
      if (t < 16) {
        v = __shfl_sync(0xFFFFFFFFu, v, 0);
      } else {
        __syncthreads();
      }
      break;
    case 4:  // one mask, two different collectives
      v = lane < 16 ? static_cast<float>(__ballot_sync(0xFFFFFFFFu, 1)) : __shfl_sync(0xFFFFFFFFu, v, 0);
      break;
    case 5:  // a mask that leaves the calling lane out
      v = __shfl_sync(1u, v, 0);
      break;
    case 6: {  // more shared memory than a block gets
      __shared__ float big[13000];
      big[t] = v;
      __syncthreads();
      v = big[63 - t];
      break;
    }
  }
  out[t] = v;
}

int report(char* message, int capacity) {
  const cudaError_t err = cudaGetLastError();
  std::snprintf(message, static_cast<size_t>(capacity), "%s", cudaGetErrorString(err));
  return static_cast<int>(err);
}

}  // namespace

EXPORT void emu_half_from_float(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}

EXPORT void emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}

EXPORT void emu_bfloat16_from_float(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}

EXPORT void emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}

// Each returns the launch's error code and writes its message.
EXPORT int emu_run_collectives(int* out, char* message, int capacity) {
  collectives_kernel<<<1, 64>>>(out);
  return report(message, capacity);
}

EXPORT int emu_run_reverse(const float* in, float* out, int blocks, int threads, char* message, int capacity) {
  reverse_kernel<<<blocks, threads, threads * sizeof(float)>>>(in, out);
  return report(message, capacity);
}

EXPORT int emu_run_unwritten_shared(float* out, char* message, int capacity) {
  unwritten_shared_kernel<<<2, 32>>>(out);
  return report(message, capacity);
}

EXPORT int emu_run_fault(int which, int threads, const float* in, float* out, char* message, int capacity) {
  fault_kernel<<<dim3(1), dim3(threads), 0, nullptr>>>(which, in, out);
  return report(message, capacity);
}
