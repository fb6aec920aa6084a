// bertfast._cuda.layer_norm_forward / layer_norm_backward: the launchers of layer_norm.cu, taking
// raw device pointers (tensor.data_ptr(), 0 for None) and the stream handle. The Python side
// (bertfast/ops/layer_norm.py) validates shapes, dtypes, strides and devices first.
#include <pybind11/pybind11.h>

#include "cuda/layer_norm.h"

namespace py = pybind11;

namespace bertfast {

void bind_layer_norm(py::module_& m) {
  m.attr("LAYER_NORM_MAX_N") = kLayerNormMaxN;
  m.def("layer_norm_forward", &layer_norm_forward, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("seed"), py::arg("rows"),
        py::arg("n"), py::arg("stride_x"), py::arg("stride_r"), py::arg("dtype"), py::arg("param_dtype"),
        py::arg("eps"), py::arg("drop_threshold"), py::arg("drop_scale"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "y = LayerNorm(dropout(x) + residual) * weight + bias over rows of n; saves mean, rstd (float32).\n"
        "Pointers are device addresses (0 = absent); seed 0 = no dropout; strides in elements.");
  m.def("layer_norm_backward", &layer_norm_backward, py::arg("dy"), py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("seed"), py::arg("dx"), py::arg("dr"),
        py::arg("dw_part"), py::arg("db_part"), py::arg("part_rows"), py::arg("rows"), py::arg("n"),
        py::arg("stride_dy"), py::arg("stride_x"), py::arg("stride_r"), py::arg("dtype"), py::arg("param_dtype"),
        py::arg("drop_threshold"), py::arg("drop_scale"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "dx (and dr when dr != 0) of layer_norm_forward; block b writes its float32 partial dw, db sums to row b\n"
        "of dw_part, db_part ((part_rows, n)). Returns the number of rows written.");
}

}  // namespace bertfast
