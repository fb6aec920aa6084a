// Binds the RTD head launchers (rtd_loss.h) as `_cuda.rtd_forward` / `_cuda.rtd_backward` and the
// sizes of their partial-sum buffers; called by the cuda backend of bertfast/ops/rtd_loss.py, which
// checks devices, dtypes, shapes and strides first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "rtd_loss.h"

namespace py = pybind11;

namespace bertfast {

void bind_rtd_loss(py::module_& m) {
  m.def(
      "rtd_forward",
      [](uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t pred_b, uintptr_t labels, int64_t label_bytes,
         uintptr_t mask, uintptr_t logits, uintptr_t rho, uintptr_t loss_part, uintptr_t count_part, int64_t rows,
         int64_t inner, int64_t stride_z, int64_t dtype, bool tanh, uintptr_t stream) {
        py::gil_scoped_release release;
        rtd_forward(z, dense_bias, pred_w, pred_b, labels, label_bytes, mask, logits, rho, loss_part, count_part, rows,
                    inner, stride_z, dtype, tanh, stream);
      },
      py::arg("z_ptr"), py::arg("dense_bias_ptr"), py::arg("pred_w_ptr"), py::arg("pred_b_ptr"), py::arg("labels_ptr"),
      py::arg("label_bytes"), py::arg("mask_ptr"), py::arg("logits_ptr"), py::arg("rho_ptr"), py::arg("loss_part_ptr"),
      py::arg("count_part_ptr"), py::arg("rows"), py::arg("inner"), py::arg("stride_z"), py::arg("dtype"),
      py::arg("tanh"), py::arg("stream"),
      "RTD head forward on z (rows, inner): logits; with labels also rho and per-block loss / count partial\n"
      "sums (rtd_forward_blocks(rows) each). Pointers 0 = absent (biases, labels, mask).");
  m.def(
      "rtd_backward",
      [](uintptr_t z, uintptr_t dense_bias, uintptr_t pred_w, uintptr_t dlogits, uintptr_t rho, uintptr_t coef,
         uintptr_t dz, uintptr_t dw_part, uintptr_t db_part, uintptr_t dbp_part, int64_t rows, int64_t inner,
         int64_t stride_z, int64_t stride_dz, int64_t rows_per_group, int64_t dtype, bool tanh, uintptr_t stream) {
        py::gil_scoped_release release;
        rtd_backward(z, dense_bias, pred_w, dlogits, rho, coef, dz, dw_part, db_part, dbp_part, rows, inner, stride_z,
                     stride_dz, rows_per_group, dtype, tanh, stream);
      },
      py::arg("z_ptr"), py::arg("dense_bias_ptr"), py::arg("pred_w_ptr"), py::arg("dlogits_ptr"), py::arg("rho_ptr"),
      py::arg("coef_ptr"), py::arg("dz_ptr"), py::arg("dw_part_ptr"), py::arg("db_part_ptr"), py::arg("dbp_part_ptr"),
      py::arg("rows"), py::arg("inner"), py::arg("stride_z"), py::arg("stride_dz"), py::arg("rows_per_group"),
      py::arg("dtype"), py::arg("tanh"), py::arg("stream"),
      "RTD head backward: dz and per row group float32 partial column sums (groups, inner) of dw_pred and\n"
      "db_dense, and (groups,) of db_pred; groups from rtd_backward_groups(rows).");
  m.def("rtd_forward_blocks", &rtd_forward_blocks, py::arg("rows"),
        "Number of loss / count partial sums rtd_forward writes for `rows` rows.");
  m.def("rtd_backward_groups", &rtd_backward_groups, py::arg("rows"),
        "(rows per group, groups) of rtd_backward for `rows` rows.");
  m.def("rtd_max_inner", &rtd_max_inner, py::arg("dtype"), "The widest inner size the kernels take for a dtype code.");
}

}  // namespace bertfast
