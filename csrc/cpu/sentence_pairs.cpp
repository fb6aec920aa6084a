// NSP / SOP sentence pairs: [CLS] A [SEP] B [SEP] rows from documents of sentences, as BERT's and
// ALBERT's create_pretraining_data build them. The spec (every random draw and its order) is the
// module docstring of bertfast/data/sentence_pairs.py; this file follows it step for step.
//
// Documents are independent (each has its own random stream), so they are processed in parallel:
// one contiguous, token-balanced block of documents per thread, results concatenated in document
// order. A and B are contiguous runs of the token buffer, so a pair is four offsets until the rows
// are written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cpu/parallel.h"

namespace py = pybind11;

namespace bertfast {
namespace {

constexpr uint32_t kHalf = 1u << 23;  // coin(0.5): top 24 bits below 2^23

struct Pair {
  int64_t a0, a1, b0, b1, label, doc;
};

struct Options {
  bool sop;
  int64_t budget;  // max_tokens - 3
  uint32_t seed, epoch, short_threshold;
};

// The corpus seen through its non-empty sentences.
struct Corpus {
  const int64_t* sent_off;           // (S+1,) token offsets of all sentences
  std::vector<int64_t> ne_sent;      // ids of the non-empty sentences, in order
  std::vector<int64_t> ne_doc_off;   // (D+1,): document d's are ne_sent[ne_doc_off[d] .. ne_doc_off[d+1])
  std::vector<int64_t> pool;         // the non-empty documents
  std::vector<int64_t> pool_pos;     // document -> index in pool (-1 when empty)
  int64_t start(int64_t j) const { return sent_off[ne_sent[j]]; }  // j: index into ne_sent
  int64_t end(int64_t j) const { return sent_off[ne_sent[j] + 1]; }
};

// One document's draws: bits_k = element_bits(key_d, k, 0), k counting up from 0.
struct Draws {
  uint32_t key;
  uint32_t k = 0;
  uint32_t bits() { return element_bits(key, k++, 0); }
  int64_t uniform_below(int64_t n) { return below(bits(), static_cast<uint32_t>(n)); }
  bool coin(uint32_t threshold) { return top24(bits()) < threshold; }
};

// Non-empty sentences first, first+1, ... (< last): one, then more while fewer than `need` tokens.
// Returns the index after the last one taken.
int64_t take_from(const Corpus& c, int64_t first, int64_t last, int64_t need) {
  int64_t j = first + 1;
  while (c.end(j - 1) - c.start(first) < need && j < last) ++j;
  return j;
}

void document_pairs(const Corpus& c, int64_t d, const Options& o, std::vector<Pair>& out) {
  const int64_t base = c.ne_doc_off[d], n = c.ne_doc_off[d + 1] - base;
  if (n == 0) return;
  const int64_t pool_size = static_cast<int64_t>(c.pool.size());
  Draws rng{stream_key(o.seed, mix32(o.epoch) ^ static_cast<uint32_t>(d))};
  int64_t i = 0;
  while (i < n) {
    // 1. the chunk
    int64_t target = o.budget;
    if (rng.coin(o.short_threshold)) target = 2 + rng.uniform_below(o.budget - 1);
    const int64_t first = i;
    int64_t length = 0;
    while (i < n) {
      length += c.end(base + i) - c.start(base + i);
      ++i;
      if (length >= target) break;
    }
    const int64_t m = i - first;
    int64_t a0, a1, b0, b1, label;
    if (o.sop) {  // 3.
      if (m == 1) {
        if (length == 1) continue;
        a0 = c.start(base + first);
        a1 = b0 = a0 + 1 + rng.uniform_below(length - 1);
        b1 = c.end(base + first);
      } else {
        const int64_t a_end = 1 + rng.uniform_below(m - 1);
        a0 = c.start(base + first);
        a1 = c.end(base + first + a_end - 1);
        b0 = c.start(base + first + a_end);
        b1 = c.end(base + i - 1);
      }
      label = rng.coin(kHalf) ? 1 : 0;
      if (label) {
        std::swap(a0, b0);
        std::swap(a1, b1);
      }
    } else {  // 2.
      const int64_t a_end = m == 1 ? 1 : 1 + rng.uniform_below(m - 1);
      const bool random = m == 1 || rng.coin(kHalf);
      a0 = c.start(base + first);
      a1 = c.end(base + first + a_end - 1);
      if (random && pool_size >= 2) {
        int64_t r = rng.uniform_below(pool_size - 1);
        r += r >= c.pool_pos[d];
        const int64_t rd = c.pool[r];
        const int64_t r_first = c.ne_doc_off[rd], r_n = c.ne_doc_off[rd + 1] - r_first;
        const int64_t from = r_first + rng.uniform_below(r_n);
        const int64_t stop = take_from(c, from, r_first + r_n, target - (a1 - a0));
        b0 = c.start(from);
        b1 = c.end(stop - 1);
        i = first + a_end;  // the chunk's unused sentences go back
        label = 1;
      } else if (random && m == 1) {  // one document only: its actual continuation
        if (i == n) continue;
        const int64_t stop = take_from(c, base + i, base + n, target - (a1 - a0));
        b0 = c.start(base + i);
        b1 = c.end(stop - 1);
        i = stop - base;
        label = 0;
      } else {
        b0 = c.start(base + first + a_end);
        b1 = c.end(base + i - 1);
        label = 0;
      }
    }
    // 4. truncate to the budget: the longer side (A on ties), front or back by a coin
    while ((a1 - a0) + (b1 - b0) > o.budget) {
      const bool trim_a = (a1 - a0) >= (b1 - b0);
      const bool front = rng.coin(kHalf);
      if (trim_a) {
        if (front) ++a0; else --a1;
      } else {
        if (front) ++b0; else --b1;
      }
    }
    if (a1 > a0 && b1 > b0) out.push_back({a0, a1, b0, b1, label, d});
  }
}

void check_offsets(const int64_t* off, int64_t count, int64_t end, const char* name) {
  if (count < 1 || off[0] != 0) throw std::invalid_argument(std::string(name) + " must start at 0");
  if (off[count - 1] != end) throw std::invalid_argument(std::string(name) + " must end at the length it indexes");
  for (int64_t j = 1; j < count; ++j) {
    if (off[j] < off[j - 1]) throw std::invalid_argument(std::string(name) + " must be non-decreasing");
  }
}

template <typename T>
py::tuple build_pairs(py::array tokens_in, py::array_t<int64_t, py::array::c_style> sentence_offsets,
                      py::array_t<int64_t, py::array::c_style> document_offsets, bool sop, int64_t max_tokens,
                      int64_t cls, int64_t sep, int64_t pad, uint32_t seed, uint32_t epoch,
                      uint32_t short_threshold, int num_threads) {
  auto tokens_arr = py::array_t<T, py::array::c_style>::ensure(tokens_in);
  if (!tokens_arr) throw std::invalid_argument("tokens: must be a 1-D int32 or int64 array");
  if (tokens_arr.ndim() != 1 || sentence_offsets.ndim() != 1 || document_offsets.ndim() != 1)
    throw std::invalid_argument("tokens, sentence_offsets, document_offsets must be 1-D");
  if (max_tokens < 5) throw std::invalid_argument("max_tokens must be >= 5 ([CLS] A [SEP] B [SEP])");
  if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0");
  const T* tokens = tokens_arr.data();
  const int64_t n_tokens = tokens_arr.shape(0);
  const int64_t n_sent = sentence_offsets.shape(0) - 1, n_doc = document_offsets.shape(0) - 1;
  const int64_t* sent_off = sentence_offsets.data();
  const int64_t* doc_off = document_offsets.data();
  const Options o{sop, max_tokens - 3, seed, epoch, short_threshold};

  std::vector<Pair> pairs;
  {
    py::gil_scoped_release release;
    check_offsets(sent_off, n_sent + 1, n_tokens, "sentence_offsets");
    check_offsets(doc_off, n_doc + 1, n_sent, "document_offsets");
    Corpus c;
    c.sent_off = sent_off;
    c.ne_doc_off.resize(n_doc + 1);
    c.pool_pos.assign(n_doc, -1);
    c.ne_doc_off[0] = 0;
    for (int64_t d = 0; d < n_doc; ++d) {
      for (int64_t s = doc_off[d]; s < doc_off[d + 1]; ++s) {
        if (sent_off[s + 1] > sent_off[s]) c.ne_sent.push_back(s);
      }
      c.ne_doc_off[d + 1] = static_cast<int64_t>(c.ne_sent.size());
      if (c.ne_doc_off[d + 1] > c.ne_doc_off[d]) {
        c.pool_pos[d] = static_cast<int64_t>(c.pool.size());
        c.pool.push_back(d);
      }
    }
    // Blocks of documents with about equal token counts, one per thread.
    const int threads = thread_count(n_tokens + n_doc, int64_t{1} << 12, num_threads);
    std::vector<int64_t> bounds(threads + 1, n_doc);
    for (int t = 0; t < threads; ++t) {
      const int64_t goal = n_tokens * t / threads;
      int64_t lo = 0, hi = n_doc;  // the first document whose tokens start at or after goal
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (sent_off[doc_off[mid]] < goal) lo = mid + 1; else hi = mid;
      }
      bounds[t] = t == 0 ? 0 : lo;
    }
    std::vector<std::vector<Pair>> found(threads);
    parallel_for(threads, threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t d = bounds[t]; d < bounds[t + 1]; ++d) document_pairs(c, d, o, found[t]);
      }
    });
    for (auto& f : found) pairs.insert(pairs.end(), f.begin(), f.end());
  }

  const int64_t p = static_cast<int64_t>(pairs.size()), width = max_tokens;
  py::array_t<T> ids({p, width});
  py::array_t<int64_t> types({p, width}), mask({p, width}), labels(p), docs(p);
  T* ids_p = ids.mutable_data();
  int64_t *types_p = types.mutable_data(), *mask_p = mask.mutable_data();
  int64_t *labels_p = labels.mutable_data(), *docs_p = docs.mutable_data();
  {
    py::gil_scoped_release release;
    const int threads = thread_count(p * width, int64_t{1} << 16, num_threads);
    parallel_for(p, threads, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Pair& q = pairs[r];
        const int64_t la = q.a1 - q.a0, lb = q.b1 - q.b0, used = la + lb + 3;
        T* row = ids_p + r * width;
        int64_t* type_row = types_p + r * width;
        int64_t* mask_row = mask_p + r * width;
        row[0] = static_cast<T>(cls);
        std::memcpy(row + 1, tokens + q.a0, la * sizeof(T));
        row[la + 1] = static_cast<T>(sep);
        std::memcpy(row + la + 2, tokens + q.b0, lb * sizeof(T));
        row[used - 1] = static_cast<T>(sep);
        std::fill(row + used, row + width, static_cast<T>(pad));
        std::fill(type_row, type_row + la + 2, int64_t{0});
        std::fill(type_row + la + 2, type_row + used, int64_t{1});
        std::fill(type_row + used, type_row + width, int64_t{0});
        std::fill(mask_row, mask_row + used, int64_t{1});
        std::fill(mask_row + used, mask_row + width, int64_t{0});
        labels_p[r] = q.label;
        docs_p[r] = q.doc;
      }
    });
  }
  return py::make_tuple(ids, types, mask, labels, docs);
}

py::tuple build_sentence_pairs(py::array tokens, py::array_t<int64_t, py::array::c_style> sentence_offsets,
                               py::array_t<int64_t, py::array::c_style> document_offsets, bool objective_is_sop,
                               int64_t max_tokens, int64_t cls, int64_t sep, int64_t pad, uint32_t seed,
                               uint32_t epoch, uint32_t short_seq_threshold, int num_threads) {
  if (py::isinstance<py::array_t<int32_t>>(tokens))
    return build_pairs<int32_t>(tokens, sentence_offsets, document_offsets, objective_is_sop, max_tokens, cls,
                                sep, pad, seed, epoch, short_seq_threshold, num_threads);
  if (py::isinstance<py::array_t<int64_t>>(tokens))
    return build_pairs<int64_t>(tokens, sentence_offsets, document_offsets, objective_is_sop, max_tokens, cls,
                                sep, pad, seed, epoch, short_seq_threshold, num_threads);
  throw std::invalid_argument("tokens: must be an int32 or int64 array");
}

}  // namespace

void bind_sentence_pairs(py::module_& m) {
  m.def("build_sentence_pairs", &build_sentence_pairs, py::arg("tokens"), py::arg("sentence_offsets"),
        py::arg("document_offsets"), py::arg("objective_is_sop"), py::arg("max_tokens"), py::arg("cls"),
        py::arg("sep"), py::arg("pad"), py::arg("seed"), py::arg("epoch"), py::arg("short_seq_threshold"),
        py::arg("num_threads"),
        "NSP (objective_is_sop=False) or SOP sentence pairs, as bertfast/data/sentence_pairs.py specifies.\n"
        "tokens (N,) int32|int64, sentence_offsets (S+1,) int64, document_offsets (D+1,) int64.\n"
        "short_seq_threshold = round(short_seq_prob * 2^24). Returns numpy arrays (input_ids (P, max_tokens)\n"
        "of the tokens' dtype, token_type_ids (P, max_tokens), attention_mask (P, max_tokens), labels (P,),\n"
        "document_index (P,)), all int64 but input_ids; P rows in document order, same for any num_threads.");
}

}  // namespace bertfast
