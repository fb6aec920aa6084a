// MLM masking on the CPU: bertfast._C.mask_tokens, the data loader's kernel. The spec (one for every
// backend, bit for bit) is in bertfast/data/masking.py; in short, per row r with key
// k = stream_key(seed, row_key[r]) and bits(j, purpose) = element_bits(k, j, purpose):
//
//   Bernoulli (max_ngram == 1): a unit (token, or run of one word's maskable tokens) is chosen iff
//     top24(bits(start, SELECT)) < select_threshold.
//   n-gram (max_ngram >= 2): budget = max(1, floor(p * n_maskable + 0.5)) tokens; units are visited
//     in ascending (bits(start, ORDER), start); each proposes n units drawn from ngram_cdf with
//     bits(start, NGRAM), taken if none is chosen yet and the span fits in the budget.
//   A chosen token j keeps labels[j] = id and becomes [MASK] / a random id / itself by
//     a = top24(bits(j, ACTION)) against mask_threshold / random_threshold.
//
// Memory traffic is the cost: each row is read once and each output element written once (no zero
// fill, no temporaries per token); the hash of a column, mix32(k ^ j), is shared by its purposes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cpu/parallel.h"

namespace py = pybind11;

namespace bertfast {
namespace {

enum Purpose : uint32_t { kSelect = 0, kAction = 1, kRandomToken = 2, kOrder = 3, kNgram = 4 };
constexpr int64_t kIgnore = -100;
constexpr uint32_t kOne24 = 1u << 24;

struct Params {
  int64_t rows, cols;
  uint32_t seed;
  int64_t vocab_size;
  int64_t mask_token_id;
  uint32_t select_threshold, mask_threshold, random_threshold;
  const int64_t* ngram_cdf;  // (max_ngram,), last == 2^24
  int64_t max_ngram;
  double probability;
};

// The chosen token's new id: [MASK], a uniform random id, or itself.
template <typename T>
inline T chosen_id(uint32_t key, int64_t j, T id, const Params& p) {
  uint32_t h = mix32(key ^ static_cast<uint32_t>(j));
  uint32_t a = top24(mix32(h ^ kAction));
  if (a < p.mask_threshold) return static_cast<T>(p.mask_token_id);
  if (a < p.random_threshold)
    return static_cast<T>(below(mix32(h ^ kRandomToken), static_cast<uint32_t>(p.vocab_size)));
  return id;
}

[[noreturn]] void bad_id(int64_t row, int64_t col, int64_t id, int64_t vocab) {
  throw std::invalid_argument("mask_tokens: `input_ids` holds " + std::to_string(id) + " at row " +
                              std::to_string(row) + ", column " + std::to_string(col) + ", outside [0, " +
                              std::to_string(vocab) + ") (the vocabulary)");
}

// top24(bits(j, SELECT)) for j in [j0, j0 + n): a plain loop over lanes that the compiler vectorises
// (an AVX2 clone where the CPU has it: the baseline x86-64 ISA has no 32-bit vector multiply).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void select_bits(uint32_t key, uint32_t j0, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = top24(element_bits(key, j0 + static_cast<uint32_t>(i), kSelect));
}

// Bernoulli mode, one pass over the row in chunks: the select bits of a chunk first (vectorised),
// then the ids (range check, table lookup, outputs).
template <typename T>
void bernoulli_row(int64_t r, const T* ids, const int32_t* words, const uint8_t* special, const Params& p,
                   uint32_t key, T* out, int64_t* labels) {
  constexpr int64_t kChunk = 128;
  uint32_t select[kChunk];
  const uint64_t vocab = static_cast<uint64_t>(p.vocab_size);
  const uint32_t select_threshold = p.select_threshold;
  const int64_t cols = p.cols;  // locals: the output stores could alias p's fields
  bool prev_maskable = false, unit_chosen = false;
  int32_t prev_word = 0;
  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - j0);
    select_bits(key, static_cast<uint32_t>(j0), n, select);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = j0 + i;
      const T id = ids[j];
      // One unsigned compare catches negative ids too.
      if (static_cast<uint64_t>(static_cast<int64_t>(id)) >= vocab) bad_id(r, j, id, p.vocab_size);
      bool chosen;
      if (!words) {
        chosen = (special[id] == 0) & (select[i] < select_threshold);
      } else {
        const int32_t w = words[j];
        const bool maskable = special[id] == 0 && w >= 0;
        // A unit starts unless this token continues the previous token's word.
        if (maskable && (!prev_maskable || w != prev_word)) unit_chosen = select[i] < select_threshold;
        prev_maskable = maskable;
        prev_word = w;
        chosen = maskable && unit_chosen;
      }
      if (chosen) {
        labels[j] = id;
        out[j] = chosen_id(key, j, id, p);
      } else {
        labels[j] = kIgnore;
        out[j] = id;
      }
    }
  }
}

// Per-thread scratch of the n-gram mode, reused across that thread's rows.
struct NgramScratch {
  std::vector<int32_t> start, length;  // units of the row
  std::vector<uint64_t> order;         // (bits(start, ORDER) << 32) | unit index
  std::vector<uint8_t> chosen;         // per unit
};

template <typename T>
void ngram_row(int64_t r, const T* ids, const int32_t* words, const uint8_t* special, const Params& p,
               uint32_t key, T* out, int64_t* labels, NgramScratch& s) {
  const uint64_t vocab = static_cast<uint64_t>(p.vocab_size);
  s.start.clear();
  s.length.clear();
  int64_t n_maskable = 0;
  bool prev_maskable = false;
  int32_t prev_word = 0;
  for (int64_t j = 0; j < p.cols; ++j) {
    const T id = ids[j];
    if (static_cast<uint64_t>(static_cast<int64_t>(id)) >= vocab) bad_id(r, j, id, p.vocab_size);
    out[j] = id;
    labels[j] = kIgnore;
    bool maskable = special[id] == 0;
    int32_t w = 0;
    if (words) {
      w = words[j];
      maskable = maskable && w >= 0;
    }
    if (maskable) {
      ++n_maskable;
      if (!words || !prev_maskable || w != prev_word) {
        s.start.push_back(static_cast<int32_t>(j));
        s.length.push_back(1);
      } else {
        ++s.length.back();
      }
    }
    prev_maskable = maskable;
    prev_word = w;
  }
  if (n_maskable == 0) return;
  const int64_t units = static_cast<int64_t>(s.start.size());
  const int64_t budget =
      std::max<int64_t>(1, static_cast<int64_t>(p.probability * static_cast<double>(n_maskable) + 0.5));
  s.order.resize(units);
  for (int64_t k = 0; k < units; ++k) {
    uint64_t b = element_bits(key, static_cast<uint32_t>(s.start[k]), kOrder);
    s.order[k] = (b << 32) | static_cast<uint64_t>(k);  // ties broken by the start, i.e. the index
  }
  // The visit stops once the budget is covered, typically after a small fraction of the units: a
  // min-heap (O(units) to build, O(log units) per visit) beats sorting them all.
  std::make_heap(s.order.begin(), s.order.end(), std::greater<uint64_t>());
  s.chosen.assign(units, 0);
  int64_t covered = 0;
  for (auto heap_end = s.order.end(); heap_end != s.order.begin() && covered < budget; --heap_end) {
    std::pop_heap(s.order.begin(), heap_end, std::greater<uint64_t>());
    const int64_t k = static_cast<int64_t>(*(heap_end - 1) & 0xFFFFFFFFu);
    const uint32_t u = top24(element_bits(key, static_cast<uint32_t>(s.start[k]), kNgram));
    int64_t n = p.max_ngram;
    for (int64_t i = 0; i < p.max_ngram; ++i) {
      if (static_cast<int64_t>(u) < p.ngram_cdf[i]) {
        n = i + 1;
        break;
      }
    }
    n = std::min(n, units - k);
    int64_t span = 0;
    bool untaken = true;
    for (int64_t m = k; m < k + n; ++m) {
      untaken = untaken && !s.chosen[m];
      span += s.length[m];
    }
    if (!untaken || covered + span > budget) continue;
    covered += span;
    for (int64_t m = k; m < k + n; ++m) {
      s.chosen[m] = 1;
      for (int64_t j = s.start[m]; j < s.start[m] + s.length[m]; ++j) {
        labels[j] = ids[j];
        out[j] = chosen_id(key, j, ids[j], p);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Python boundary: every array is checked here by exact dtype and C-contiguity, never converted.

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
carray<T> exact(const py::object& obj, const char* name, const char* want) {
  if (!py::isinstance<carray<T>>(obj)) {
    std::string got = py::isinstance<py::array>(obj)
                          ? std::string(py::str(obj.attr("dtype"))) +
                                (py::cast<py::array>(obj).flags() & py::array::c_style ? "" : ", not C-contiguous")
                          : std::string(py::str(py::type::handle_of(obj).attr("__name__")));
    throw py::type_error(std::string("mask_tokens: `") + name + "` must be a C-contiguous numpy " + want +
                         " array, got " + got);
  }
  return py::reinterpret_borrow<carray<T>>(obj);
}

template <typename T>
py::tuple run(const carray<T>& input_ids, const carray<int64_t>& row_keys, const py::object& word_ids_obj,
              const carray<uint8_t>& special, Params p, int num_threads) {
  carray<int32_t> word_ids;
  const int32_t* words = nullptr;
  if (!word_ids_obj.is_none()) {
    word_ids = exact<int32_t>(word_ids_obj, "word_ids", "int32");
    if (word_ids.ndim() != 2 || word_ids.shape(0) != p.rows || word_ids.shape(1) != p.cols)
      throw std::invalid_argument("mask_tokens: `word_ids` must have the shape of `input_ids`");
    words = word_ids.data();
  }
  carray<T> out({p.rows, p.cols});
  carray<int64_t> labels({p.rows, p.cols});
  const T* ids = input_ids.data();
  const int64_t* keys = row_keys.data();
  const uint8_t* table = special.data();
  T* out_ptr = out.mutable_data();
  int64_t* labels_ptr = labels.mutable_data();
  {
    py::gil_scoped_release release;
    // A thread start costs about as much as masking ~10^4 tokens: give each thread at least that.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.cols));
    const int threads = thread_count(p.rows, grain, num_threads);
    parallel_for(p.rows, threads, [&](int64_t begin, int64_t end) {
      NgramScratch scratch;
      for (int64_t r = begin; r < end; ++r) {
        const uint32_t key = stream_key(p.seed, static_cast<uint32_t>(keys[r]));
        const int64_t off = r * p.cols;
        const int32_t* w = words ? words + off : nullptr;
        if (p.max_ngram == 1)
          bernoulli_row(r, ids + off, w, table, p, key, out_ptr + off, labels_ptr + off);
        else
          ngram_row(r, ids + off, w, table, p, key, out_ptr + off, labels_ptr + off, scratch);
      }
    });
  }
  return py::make_tuple(out, labels);
}

py::tuple mask_tokens(const py::object& input_ids, const py::object& row_keys_obj, const py::object& word_ids,
                      const py::object& special_obj, int64_t seed, int64_t vocab_size, int64_t mask_token_id,
                      int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold,
                      const py::object& ngram_cdf_obj, double probability, int num_threads) {
  auto row_keys = exact<int64_t>(row_keys_obj, "row_keys", "int64");
  auto special = exact<uint8_t>(special_obj, "special", "uint8");
  auto cdf = exact<int64_t>(ngram_cdf_obj, "ngram_cdf", "int64");
  auto fail = [](const std::string& msg) { throw std::invalid_argument("mask_tokens: " + msg); };
  if (seed < 0 || seed > 0xFFFFFFFFll) fail("`seed` must be in [0, 2^32), got " + std::to_string(seed));
  if (vocab_size < 1 || vocab_size > 0x7FFFFFFFll) fail("`vocab_size` must be in [1, 2^31)");
  if (mask_token_id < 0 || mask_token_id >= vocab_size) fail("`mask_token_id` must be in [0, vocab_size)");
  const std::pair<const char*, int64_t> thresholds[] = {
      {"select_threshold", select_threshold}, {"mask_threshold", mask_threshold}, {"random_threshold", random_threshold}};
  for (const auto& [name, t] : thresholds)
    if (t < 0 || t > kOne24) fail(std::string("`") + name + "` must be in [0, 2^24]");
  if (mask_threshold > random_threshold) fail("`mask_threshold` must be <= `random_threshold`");
  if (!(probability >= 0.0 && probability <= 1.0)) fail("`probability` must be in [0, 1]");
  if (special.ndim() != 1 || special.shape(0) != vocab_size) fail("`special` must have shape (vocab_size,)");
  if (cdf.ndim() != 1 || cdf.shape(0) < 1) fail("`ngram_cdf` must have shape (max_ngram,) with max_ngram >= 1");
  const int64_t* c = cdf.data();
  for (int64_t i = 0; i < cdf.shape(0); ++i)
    if (c[i] < 0 || c[i] > kOne24 || (i > 0 && c[i] < c[i - 1])) fail("`ngram_cdf` must rise within [0, 2^24]");
  if (c[cdf.shape(0) - 1] != kOne24) fail("`ngram_cdf` must end at 2^24");

  Params p{};
  p.seed = static_cast<uint32_t>(seed);
  p.vocab_size = vocab_size;
  p.mask_token_id = mask_token_id;
  p.select_threshold = static_cast<uint32_t>(select_threshold);
  p.mask_threshold = static_cast<uint32_t>(mask_threshold);
  p.random_threshold = static_cast<uint32_t>(random_threshold);
  p.ngram_cdf = c;
  p.max_ngram = cdf.shape(0);
  p.probability = probability;

  auto check_shape = [&](const py::array& ids) {
    if (ids.ndim() != 2) fail("`input_ids` must have 2 dims (batch, seq_len)");
    p.rows = ids.shape(0);
    p.cols = ids.shape(1);
    if (p.cols > 0x7FFFFFFFll) fail("`input_ids` rows must be shorter than 2^31");
    if (row_keys.ndim() != 1 || row_keys.shape(0) != p.rows) fail("`row_keys` must have shape (batch,)");
    const int64_t* k = row_keys.data();
    for (int64_t r = 0; r < p.rows; ++r)
      if (k[r] < 0 || k[r] > 0xFFFFFFFFll)
        fail("`row_keys` holds " + std::to_string(k[r]) + " at row " + std::to_string(r) + ", outside [0, 2^32)");
  };
  if (py::isinstance<carray<int32_t>>(input_ids)) {
    auto ids = py::reinterpret_borrow<carray<int32_t>>(input_ids);
    check_shape(ids);
    return run<int32_t>(ids, row_keys, word_ids, special, p, num_threads);
  }
  auto ids = exact<int64_t>(input_ids, "input_ids", "int32 or int64");
  check_shape(ids);
  return run<int64_t>(ids, row_keys, word_ids, special, p, num_threads);
}

}  // namespace

void bind_masking(py::module_& m) {
  m.def("mask_tokens", &mask_tokens, py::arg("input_ids"), py::arg("row_keys"), py::arg("word_ids"),
        py::arg("special"), py::arg("seed"), py::arg("vocab_size"), py::arg("mask_token_id"),
        py::arg("select_threshold"), py::arg("mask_threshold"), py::arg("random_threshold"), py::arg("ngram_cdf"),
        py::arg("probability"), py::arg("num_threads") = 0,
        "MLM masking of (B, T) int32/int64 ids -> (masked ids like input_ids, labels int64 with -100 where not "
        "chosen). word_ids: int32 (B, T) or None; special: uint8 (vocab_size,), 1 = never mask; ngram_cdf: int64 "
        "(max_ngram,), one entry = Bernoulli mode. Rows run in parallel on num_threads threads (0 = all cores).");
}

}  // namespace bertfast
