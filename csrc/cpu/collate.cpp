// Collation of Python token lists into one padded (B, L) array: the step where a data loader spends
// most of its time in pure Python (one int object per token). Reads the list items through the
// CPython API with the GIL held (Python objects cannot be read without it); numpy output.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace bertfast {
namespace {

// Fills out[i, :len(sequences[i])] and returns each length; the rest of each row is left as the
// caller filled it (the padding id). Every item must be a list or tuple of ints in [0, 2^31), or
// None when `none_as` is given (word ids of special tokens), stored as `none_as`.
template <typename T>
py::array_t<int64_t> pad_lists(py::list sequences, py::array_t<T, py::array::c_style> out, py::object none_as) {
  const bool allow_none = !none_as.is_none();
  const T none_value = allow_none ? none_as.cast<T>() : T{0};
  if (out.ndim() != 2) throw std::invalid_argument("out: expected a 2-D array");
  const int64_t rows = out.shape(0), length = out.shape(1);
  if (static_cast<int64_t>(py::len(sequences)) != rows)
    throw std::invalid_argument("examples: " + std::to_string(py::len(sequences)) + " sequences for " +
                                std::to_string(rows) + " rows");
  py::array_t<int64_t> lengths(rows);
  auto len = lengths.mutable_unchecked<1>();
  T* data = out.mutable_data();
  for (int64_t i = 0; i < rows; ++i) {
    PyObject* item = PyList_GET_ITEM(sequences.ptr(), i);
    if (!PyList_Check(item) && !PyTuple_Check(item))
      throw py::type_error("examples[" + std::to_string(i) + "]: expected a list or tuple of token ids, got " +
                           std::string(Py_TYPE(item)->tp_name));
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(item);
    if (n > length)
      throw std::invalid_argument("examples[" + std::to_string(i) + "]: " + std::to_string(n) +
                                  " tokens do not fit max_length " + std::to_string(length));
    PyObject** values = PySequence_Fast_ITEMS(item);
    T* row = data + i * length;
    for (Py_ssize_t j = 0; j < n; ++j) {
      if (allow_none && values[j] == Py_None) {
        row[j] = none_value;
        continue;
      }
      const long long v = PyLong_AsLongLong(values[j]);
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (v < 0 || v > INT32_MAX)
        throw std::invalid_argument("examples[" + std::to_string(i) + "][" + std::to_string(j) +
                                    "]: token id " + std::to_string(v) + " is out of range");
      row[j] = static_cast<T>(v);
    }
    len(i) = n;
  }
  return lengths;
}

}  // namespace

void bind_collate(py::module_& m) {
  m.def("pad_lists", &pad_lists<int64_t>, py::arg("sequences"), py::arg("out"), py::arg("none_as") = py::none(),
        "Copy lists of token ids into the rows of a pre-filled (B, L) int64 array; returns the lengths.");
  m.def("pad_lists", &pad_lists<int32_t>, py::arg("sequences"), py::arg("out"), py::arg("none_as") = py::none(),
        "Copy lists of token ids into the rows of a pre-filled (B, L) int32 array; returns the lengths.");
}

}  // namespace bertfast
