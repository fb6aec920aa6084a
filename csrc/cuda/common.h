// Shared by the .cu files: the dtype codes bertfast/ops/cuda_support.py passes (DTYPE_CODES), a
// helper that instantiates a launcher template for each, and the launch-error check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace bertfast {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// fn(T{}) with T the C++ type of `code`.
template <typename Fn>
void with_dtype(int code, const char* what, Fn fn) {
  switch (code) {
    case kFloat32: fn(float{}); break;
    case kFloat16: fn(__half{}); break;
    case kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(what) + ": unknown dtype code " + std::to_string(code));
  }
}

// The handle Python passes (torch.cuda.current_stream().cuda_stream) as a stream.
inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Throws (a Python RuntimeError through pybind11) when the last launch failed.
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace bertfast
