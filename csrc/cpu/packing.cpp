// Sequence packing by best-fit decreasing, for varlen attention: variable-length sequences are cut
// into pieces of at most L tokens and placed whole into rows of L tokens, so that no compute is
// spent on padding. The placement is sequential (each choice depends on the previous ones:
// O(P log R) with a std::set of (free space, row)); the rows are then filled in parallel.
// bertfast/data/packing.py validates the input and documents the outputs; tests/reference_packing.py
// is the plain-Python statement of the same spec.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu/parallel.h"

namespace py = pybind11;

namespace bertfast {
namespace {

struct Piece {
  int64_t sequence;  // index of the input sequence
  int64_t start;     // offset of the piece inside its sequence
  int64_t length;    // 1..L
};

// Pieces in output order (row by row, each row in placement order) and the row boundaries.
struct Plan {
  std::vector<Piece> pieces;      // (P,)
  std::vector<int64_t> row_begin;  // (R + 1,): row r holds pieces[row_begin[r]:row_begin[r + 1]]
};

void check_offsets(const int64_t* offsets, int64_t count, int64_t num_tokens) {
  if (count < 1) throw std::invalid_argument("pack_sequences: `offsets` must hold at least one element (S + 1)");
  if (offsets[0] != 0) throw std::invalid_argument("pack_sequences: `offsets` must start at 0");
  for (int64_t s = 0; s + 1 < count; ++s) {
    if (offsets[s + 1] < offsets[s])
      throw std::invalid_argument("pack_sequences: `offsets` must be non-decreasing (offsets[" +
                                  std::to_string(s + 1) + "] < offsets[" + std::to_string(s) + "])");
  }
  if (offsets[count - 1] != num_tokens)
    throw std::invalid_argument("pack_sequences: `offsets` must end at len(tokens) = " + std::to_string(num_tokens) +
                                ", got " + std::to_string(offsets[count - 1]));
}

Plan place(const int64_t* offsets, int64_t num_sequences, int64_t L, bool sort_by_length) {
  // Pieces in input order: by (sequence, piece index).
  std::vector<Piece> input;
  for (int64_t s = 0; s < num_sequences; ++s) {
    const int64_t n = offsets[s + 1] - offsets[s];
    for (int64_t start = 0; start < n; start += L) input.push_back({s, start, std::min(L, n - start)});
  }
  const int64_t P = static_cast<int64_t>(input.size());

  // Placement order: by length descending; the stable sort keeps ties in input order, i.e. by
  // (sequence, piece index) ascending, as the spec asks.
  std::vector<Piece> order = std::move(input);
  if (sort_by_length)
    std::stable_sort(order.begin(), order.end(), [](const Piece& a, const Piece& b) { return a.length > b.length; });

  // Best fit: the open row with the least free space that still holds the piece, ties to the lowest
  // row index: the first (free, row) >= (length, -1). Rows with no free space leave the set.
  std::set<std::pair<int64_t, int64_t>> open;
  std::vector<int64_t> row_of(static_cast<size_t>(P));
  std::vector<int64_t> row_count;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t length = order[static_cast<size_t>(i)].length;
    auto it = open.lower_bound({length, std::numeric_limits<int64_t>::min()});
    int64_t row, free;
    if (it == open.end()) {
      row = static_cast<int64_t>(row_count.size());
      row_count.push_back(0);
      free = L - length;
    } else {
      row = it->second;
      free = it->first - length;
      open.erase(it);
    }
    if (free > 0) open.insert({free, row});
    row_of[static_cast<size_t>(i)] = row;
    ++row_count[static_cast<size_t>(row)];
  }

  // Group by row; within a row, placement order is the layout order.
  const int64_t R = static_cast<int64_t>(row_count.size());
  Plan plan;
  plan.row_begin.assign(static_cast<size_t>(R) + 1, 0);
  for (int64_t r = 0; r < R; ++r) plan.row_begin[r + 1] = plan.row_begin[r] + row_count[r];
  std::vector<int64_t> cursor(plan.row_begin.begin(), plan.row_begin.end() - 1);
  plan.pieces.resize(static_cast<size_t>(P));
  for (int64_t i = 0; i < P; ++i) plan.pieces[static_cast<size_t>(cursor[row_of[i]]++)] = order[i];
  return plan;
}

template <typename T>
py::dict pack(const py::array& tokens_array, const int64_t* offsets, int64_t num_sequences, int64_t L,
              int64_t pad_token_id, int64_t position_start, int64_t pad_position, bool sort_by_length,
              int num_threads) {
  if (pad_token_id > static_cast<int64_t>(std::numeric_limits<T>::max()))
    throw std::invalid_argument("pack_sequences: `pad_token_id` does not fit the dtype of `tokens`");
  const T* tokens = static_cast<const T*>(tokens_array.data());

  Plan plan;
  {
    py::gil_scoped_release release;
    plan = place(offsets, num_sequences, L, sort_by_length);
  }
  const int64_t P = static_cast<int64_t>(plan.pieces.size());
  const int64_t R = static_cast<int64_t>(plan.row_begin.size()) - 1;

  py::array_t<T> input_ids({R, L});
  py::array_t<int64_t> position_ids({R, L});
  py::array_t<int32_t> segment_ids({R, L});
  py::array_t<int64_t> attention_mask({R, L});
  py::array_t<int32_t> cu_seqlens(P + 1);
  py::array_t<int64_t> piece_sequence(P);
  py::array_t<int64_t> piece_start(P);
  T* ids = input_ids.mutable_data();
  int64_t* pos = position_ids.mutable_data();
  int32_t* seg = segment_ids.mutable_data();
  int64_t* mask = attention_mask.mutable_data();
  int32_t* cu = cu_seqlens.mutable_data();
  int64_t* pseq = piece_sequence.mutable_data();
  int64_t* pstart = piece_start.mutable_data();
  int64_t max_seqlen = 0;
  {
    py::gil_scoped_release release;
    // The caller guarantees len(tokens) < 2**31, so every prefix fits int32.
    cu[0] = 0;
    for (int64_t p = 0; p < P; ++p) {
      const Piece& piece = plan.pieces[static_cast<size_t>(p)];
      cu[p + 1] = cu[p] + static_cast<int32_t>(piece.length);
      pseq[p] = piece.sequence;
      pstart[p] = piece.start;
      max_seqlen = std::max(max_seqlen, piece.length);
    }
    // Each row is written by exactly one range: the output does not depend on the thread count.
    const int threads = thread_count(R, std::max<int64_t>(1, 32768 / L), num_threads);
    parallel_for(R, threads, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t base = r * L;
        int64_t column = 0;
        for (int64_t p = plan.row_begin[r]; p < plan.row_begin[r + 1]; ++p) {
          const Piece& piece = plan.pieces[static_cast<size_t>(p)];
          const T* src = tokens + offsets[piece.sequence] + piece.start;
          const int32_t segment = static_cast<int32_t>(p - plan.row_begin[r] + 1);
          const int64_t at = base + column, n = piece.length;
          // One array at a time: simple loops the compiler vectorizes (the outputs may alias as far
          // as it knows, which blocks vectorizing a loop that writes all four).
          std::copy(src, src + n, ids + at);
          for (int64_t j = 0; j < n; ++j) pos[at + j] = position_start + j;
          std::fill(seg + at, seg + at + n, segment);
          std::fill(mask + at, mask + at + n, int64_t{1});
          column += n;
        }
        const int64_t at = base + column, end = base + L;
        std::fill(ids + at, ids + end, static_cast<T>(pad_token_id));
        std::fill(pos + at, pos + end, pad_position);
        std::fill(seg + at, seg + end, int32_t{0});
        std::fill(mask + at, mask + end, int64_t{0});
      }
    });
  }

  py::dict out;
  out["input_ids"] = input_ids;
  out["position_ids"] = position_ids;
  out["segment_ids"] = segment_ids;
  out["attention_mask"] = attention_mask;
  out["cu_seqlens"] = cu_seqlens;
  out["max_seqlen"] = max_seqlen;
  out["piece_sequence"] = piece_sequence;
  out["piece_start"] = piece_start;
  return out;
}

py::dict pack_sequences(const py::array& tokens, const py::array& offsets, int64_t row_length, int64_t pad_token_id,
                        int64_t position_start, int64_t pad_position, bool sort_by_length, int num_threads) {
  if (tokens.ndim() != 1 || !(tokens.flags() & py::array::c_style))
    throw std::invalid_argument("pack_sequences: `tokens` must be a contiguous 1-D array");
  if (offsets.ndim() != 1 || !(offsets.flags() & py::array::c_style) || !offsets.dtype().is(py::dtype::of<int64_t>()))
    throw std::invalid_argument("pack_sequences: `offsets` must be a contiguous 1-D int64 array");
  if (row_length < 1) throw std::invalid_argument("pack_sequences: `row_length` must be >= 1");
  if (pad_token_id < 0) throw std::invalid_argument("pack_sequences: `pad_token_id` must be >= 0");
  if (position_start < 0) throw std::invalid_argument("pack_sequences: `position_start` must be >= 0");
  if (position_start > std::numeric_limits<int64_t>::max() - row_length)
    throw std::invalid_argument("pack_sequences: `position_start` + `row_length` overflows int64");
  if (pad_position < 0) throw std::invalid_argument("pack_sequences: `pad_position` must be >= 0");
  if (num_threads < 0) throw std::invalid_argument("pack_sequences: `num_threads` must be >= 0");
  const int64_t num_tokens = tokens.shape(0);
  if (num_tokens > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("pack_sequences: `tokens` holds more than 2**31 - 1 tokens (cu_seqlens is int32)");
  const int64_t* off = static_cast<const int64_t*>(offsets.data());
  const int64_t count = offsets.shape(0);
  check_offsets(off, count, num_tokens);
  if (tokens.dtype().is(py::dtype::of<int32_t>()))
    return pack<int32_t>(tokens, off, count - 1, row_length, pad_token_id, position_start, pad_position,
                         sort_by_length, num_threads);
  if (tokens.dtype().is(py::dtype::of<int64_t>()))
    return pack<int64_t>(tokens, off, count - 1, row_length, pad_token_id, position_start, pad_position,
                         sort_by_length, num_threads);
  throw std::invalid_argument("pack_sequences: `tokens` must be int32 or int64");
}

}  // namespace

void bind_packing(py::module_& m) {
  m.def("pack_sequences", &pack_sequences, py::arg("tokens"), py::arg("offsets"), py::arg("row_length"),
        py::arg("pad_token_id"), py::arg("position_start"), py::arg("pad_position"), py::arg("sort_by_length"),
        py::arg("num_threads"),
        "Best-fit-decreasing packing of tokens[offsets[s]:offsets[s+1]] into rows of row_length; returns a dict "
        "of numpy arrays (input_ids, position_ids, segment_ids, attention_mask, cu_seqlens, piece_sequence, "
        "piece_start) and max_seqlen. See bertfast.data.packing.pack_sequences.");
}

}  // namespace bertfast
