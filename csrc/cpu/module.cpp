// bertfast._C: the C++ CPU kernels of the pretraining input pipeline. Each source file binds its
// own functions; this file only assembles the module. Links no libtorch: numpy buffers in and out.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace bertfast {
void bind_masking(py::module_& m);
void bind_sentence_pairs(py::module_& m);
void bind_packing(py::module_& m);
void bind_collate(py::module_& m);
}  // namespace bertfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "bertfast C++ CPU kernels of the data pipeline (collation, masking, sentence pairs, packing)";
  bertfast::bind_masking(m);
  bertfast::bind_sentence_pairs(m);
  bertfast::bind_packing(m);
  bertfast::bind_collate(m);
}
