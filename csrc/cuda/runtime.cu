#include <cuda_runtime.h>

#include "runtime.h"

namespace bertfast {

int runtime_version() { return CUDART_VERSION; }

// setup.py passes the architectures it compiled for (e.g. "sm_80 sm_90 compute_90").
std::string compiled_archs() {
#ifdef BERTFAST_CUDA_ARCHS
  return BERTFAST_CUDA_ARCHS;
#else
  return "unknown";
#endif
}

}  // namespace bertfast
