// Counter-based random bits shared by the C++ and CUDA kernels, bit for bit the same as
// bertfast/kernels/rng.py (Triton) and bertfast/ops/rng.py (PyTorch):
//
//     bits(seed, stream, row, col) = mix32(mix32(mix32(mix32(seed) ^ stream) ^ row) ^ col)
//
// mix32 is the lowbias32 integer hash. Nothing is stored: any element's bits come from its
// coordinates, so results do not depend on thread count, launch shape or backend.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BERTFAST_HD __host__ __device__ __forceinline__
#else
#define BERTFAST_HD inline
#endif

namespace bertfast {

BERTFAST_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of one stream: mix32(mix32(seed) ^ stream).
BERTFAST_HD uint32_t stream_key(uint32_t seed, uint32_t stream) { return mix32(mix32(seed) ^ stream); }

// bits(seed, stream, row, col) given the stream's key.
BERTFAST_HD uint32_t element_bits(uint32_t key, uint32_t row, uint32_t col) {
  return mix32(mix32(key ^ row) ^ col);
}

// The top 24 bits: compared with integer thresholds round(p * 2^24), exact on every backend.
BERTFAST_HD uint32_t top24(uint32_t bits) { return bits >> 8; }

// An integer uniform in [0, n) from 32 bits (multiply-shift): floor(bits * n / 2^32).
BERTFAST_HD uint32_t below(uint32_t bits, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(bits) * n) >> 32);
}

}  // namespace bertfast
