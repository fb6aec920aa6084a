// Binds the on-device masking launcher (masking.h) as `_cuda.mask_tokens`; called by the cuda backend
// of bertfast/ops/mask_tokens.py, which checks devices, dtypes, shapes and id ranges first.
#include <pybind11/pybind11.h>

#include "masking.h"

namespace py = pybind11;

namespace bertfast {

void bind_masking(py::module_& m) {
  m.def(
      "mask_tokens",
      [](uintptr_t ids, uintptr_t out_ids, uintptr_t labels, uintptr_t row_keys, uintptr_t word_ids, uintptr_t special,
         int64_t rows, int64_t cols, bool ids_is_int32, int64_t seed, int64_t vocab_size, int64_t mask_token_id,
         int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold, uintptr_t stream) {
        py::gil_scoped_release release;
        mask_tokens(ids, out_ids, labels, row_keys, word_ids, special, rows, cols, ids_is_int32, seed, vocab_size,
                    mask_token_id, select_threshold, mask_threshold, random_threshold, stream);
      },
      py::arg("ids_ptr"), py::arg("out_ids_ptr"), py::arg("labels_ptr"), py::arg("row_keys_ptr"),
      py::arg("word_ids_ptr"), py::arg("special_ptr"), py::arg("rows"), py::arg("cols"), py::arg("ids_is_int32"),
      py::arg("seed"), py::arg("vocab_size"), py::arg("mask_token_id"), py::arg("select_threshold"),
      py::arg("mask_threshold"), py::arg("random_threshold"), py::arg("stream"),
      "MLM masking (Bernoulli mode) of a (rows, cols) batch on the device, asynchronously on `stream`.\n"
      "ids / out_ids int32 if ids_is_int32 else int64, labels int64, row_keys int64 (rows,) holding uint32,\n"
      "word_ids int32 (rows, cols) or 0, special uint8 (vocab_size,) with 1 = never mask. Ids must lie in\n"
      "[0, vocab_size) (not checked here). Thresholds round(p * 2^24); seed in [0, 2^32).");
}

}  // namespace bertfast
