// bertfast._cuda: CUDA kernels that take raw device pointers and a cudaStream_t handle
// (torch.cuda.current_stream().cuda_stream). Links no libtorch, so one build serves every torch;
// the Python side (bertfast/ops/cuda_support.py and each op) checks devices, dtypes, shapes and
// bounds before calling in. Layout per op: <op>.cu holds the kernels and a plain C++ launcher
// (declared in <op>.h), compiled by nvcc; <op>_bind.cpp binds the launcher, compiled by the host
// compiler (pybind11 stays out of nvcc). This file only assembles the module.
#include <pybind11/pybind11.h>

#include "runtime.h"

namespace py = pybind11;

namespace bertfast {
void bind_layer_norm(py::module_& m);
void bind_rtd_loss(py::module_& m);
void bind_masking(py::module_& m);
}  // namespace bertfast

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "bertfast CUDA kernels (raw pointers + stream handle)";
  m.def("runtime_version", &bertfast::runtime_version,
        "CUDA runtime version this module was built with (e.g. 13000)");
  m.def("compiled_archs", &bertfast::compiled_archs, "GPU architectures with machine code in this build");
  bertfast::bind_layer_norm(m);
  bertfast::bind_rtd_loss(m);
  bertfast::bind_masking(m);
}
