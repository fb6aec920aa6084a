// On-device dynamic masking for masked language modelling, Bernoulli mode: bit for bit the masks of
// the CPU implementations (csrc/cpu/masking.cpp, the torch backend of bertfast/ops/mask_tokens.py).
//
// Per row r with key k_r = stream_key(seed, row_key_r) and column j:
//     bits(j, purpose) = element_bits(k_r, j, purpose)        SELECT = 0, ACTION = 1, RANDOM_TOKEN = 2
//     maskable(j)      = !special[id_j] && (no word_ids || word_ids[j] >= 0)
// Units: without word_ids every maskable token is its own unit; with word_ids a unit is a maximal run
// of consecutive maskable tokens with equal word ids, starting at its first column. A unit is chosen
// iff top24(bits(start, SELECT)) < select_threshold, and then so are all its tokens. A chosen token
// keeps its id as label, and with a = top24(bits(j, ACTION)) becomes mask_token_id if a < mask_threshold,
// else below(bits(j, RANDOM_TOKEN), vocab_size) if a < random_threshold, else stays; any other token
// gets label -100 and keeps its id.
//
// Layout: one thread per token; block (row, tile of blockDim.x columns), so a warp reads 32
// consecutive ids. Finding a token's unit start with word_ids, in two steps (a per-thread scan to the
// row start would cost O(T^2) on a row whose word ids never change, e.g. a caller passing sequence ids):
//   1. within the tile: each thread walks left over the tile's maskable flags and word ids held in
//      shared memory while its neighbour continues the unit (words are short: a step or two);
//   2. across tiles: warp 0 finds, once per block, the start of the unit holding the tile's first
//      column by walking left through global memory 32 columns at a time (a ballot marks the columns
//      that break the run; the nearest break ends the walk). A thread whose walk in step 1 reaches
//      the tile's first column takes that start.
// Ids are assumed in [0, vocab_size) (the Python side checks them, since `special` is indexed by them).
#include <climits>
#include <stdexcept>
#include <string>

#include "common.h"
#include "common/rng.h"
#include "masking.h"

namespace bertfast {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxTiles = 65535;  // gridDim.y
constexpr uint32_t kSelect = 0, kAction = 1, kRandomToken = 2;
constexpr int64_t kThresholdOne = int64_t{1} << 24;

struct MaskArgs {
  const int64_t* row_keys;
  const int32_t* word_ids;  // nullptr: every maskable token is a unit
  const uint8_t* special;
  int64_t* labels;
  int64_t cols;
  uint32_t seed;
  uint32_t vocab_size;
  uint32_t select_threshold;
  uint32_t mask_threshold;
  uint32_t random_threshold;
};

template <typename Id, bool WORDS>
__global__ void __launch_bounds__(kMaxThreads)
    mask_tokens_kernel(const Id* __restrict__ ids, Id* __restrict__ out_ids, Id mask_token_id, MaskArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * blockDim.x;  // the tile's first column
  const int tid = threadIdx.x;
  const int64_t j = tile + tid;
  const bool in_row = j < a.cols;
  const int64_t base = row * a.cols;

  Id id = 0;
  bool maskable = false;
  int32_t word = -1;
  if (in_row) {
    id = ids[base + j];
    maskable = a.special[id] == 0;
    if constexpr (WORDS) {
      word = a.word_ids[base + j];
      maskable = maskable && word >= 0;
    }
  }

  int64_t start = j;  // of this token's unit (meaningful for maskable tokens only)
  if constexpr (WORDS) {
    __shared__ int32_t s_word[kMaxThreads];
    __shared__ bool s_maskable[kMaxThreads];
    __shared__ int64_t s_carry;
    s_word[tid] = word;
    s_maskable[tid] = maskable;
    if (tid < 32) {  // warp 0 (blockDim.x is a multiple of 32): the start of column `tile`'s unit
      const int lane = tid;
      const bool first_maskable = __shfl_sync(0xffffffffu, static_cast<int>(maskable), 0) != 0;
      const int32_t first_word = __shfl_sync(0xffffffffu, word, 0);
      int64_t carry = tile;
      if (first_maskable && tile > 0) {  // uniform over the warp
        for (int64_t hi = tile;; hi -= 32) {
          // lane l looks at column hi - 1 - l: does it continue the unit? (columns < 0 break it)
          const int64_t k = hi - 1 - lane;
          bool continues = false;
          if (k >= 0) continues = a.word_ids[base + k] == first_word && a.special[ids[base + k]] == 0;
          const unsigned breaks = __ballot_sync(0xffffffffu, !continues);
          if (breaks != 0) {  // the lowest set lane is the break nearest to the tile
            carry = hi - (__ffs(static_cast<int>(breaks)) - 1);
            break;
          }
        }
      }
      if (lane == 0) s_carry = carry;
    }
    __syncthreads();
    if (maskable) {
      int k = tid;
      while (k > 0 && s_maskable[k - 1] && s_word[k - 1] == word) --k;
      start = k == 0 ? s_carry : tile + k;
    }
  }
  if (!in_row) return;  // after the block's only barrier

  const uint32_t key = stream_key(a.seed, static_cast<uint32_t>(a.row_keys[row]));
  int64_t label = -100;
  Id out = id;
  if (maskable && top24(element_bits(key, static_cast<uint32_t>(start), kSelect)) < a.select_threshold) {
    label = static_cast<int64_t>(id);
    const uint32_t action = top24(element_bits(key, static_cast<uint32_t>(j), kAction));
    if (action < a.mask_threshold) {
      out = mask_token_id;
    } else if (action < a.random_threshold) {
      out = static_cast<Id>(below(element_bits(key, static_cast<uint32_t>(j), kRandomToken), a.vocab_size));
    }
  }
  out_ids[base + j] = out;
  a.labels[base + j] = label;
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("mask_tokens: " + message);
}

}  // namespace

void mask_tokens(uintptr_t ids, uintptr_t out_ids, uintptr_t labels, uintptr_t row_keys, uintptr_t word_ids,
                 uintptr_t special, int64_t rows, int64_t cols, bool ids_is_int32, int64_t seed, int64_t vocab_size,
                 int64_t mask_token_id, int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold,
                 uintptr_t stream) {
  require(rows >= 0 && rows <= INT_MAX, "`rows` must be in [0, 2^31), got " + std::to_string(rows));
  require(cols >= 0 && cols <= kMaxTiles * kMaxThreads,
          "`cols` must be in [0, " + std::to_string(kMaxTiles * kMaxThreads) + "], got " + std::to_string(cols));
  require(seed >= 0 && seed <= int64_t{UINT32_MAX}, "`seed` must be in [0, 2^32), got " + std::to_string(seed));
  const int64_t max_vocab = ids_is_int32 ? int64_t{INT32_MAX} + 1 : int64_t{UINT32_MAX};
  require(vocab_size >= 1 && vocab_size <= max_vocab,
          "`vocab_size` must be in [1, " + std::to_string(max_vocab) + "], got " + std::to_string(vocab_size));
  require(mask_token_id >= 0 && mask_token_id < vocab_size,
          "`mask_token_id` must be in [0, vocab_size), got " + std::to_string(mask_token_id));
  const int64_t thresholds[] = {select_threshold, mask_threshold, random_threshold};
  const char* names[] = {"select_threshold", "mask_threshold", "random_threshold"};
  for (int i = 0; i < 3; ++i)
    require(thresholds[i] >= 0 && thresholds[i] <= kThresholdOne,
            std::string("`") + names[i] + "` must be in [0, 2^24], got " + std::to_string(thresholds[i]));
  if (rows == 0 || cols == 0) return;
  require(ids != 0 && out_ids != 0 && labels != 0 && row_keys != 0 && special != 0,
          "`ids`, `out_ids`, `labels`, `row_keys` and `special` must be device pointers");

  // One warp at least; short rows get a narrower block rather than idle warps.
  const int threads = static_cast<int>(cols >= kMaxThreads ? kMaxThreads : (cols + 31) / 32 * 32);
  const int64_t tiles = (cols + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
  const MaskArgs a{reinterpret_cast<const int64_t*>(row_keys), reinterpret_cast<const int32_t*>(word_ids),
                   reinterpret_cast<const uint8_t*>(special), reinterpret_cast<int64_t*>(labels), cols,
                   static_cast<uint32_t>(seed), static_cast<uint32_t>(vocab_size),
                   static_cast<uint32_t>(select_threshold), static_cast<uint32_t>(mask_threshold),
                   static_cast<uint32_t>(random_threshold)};
  const cudaStream_t s = as_stream(stream);
  auto launch = [&](auto id_tag) {
    using Id = decltype(id_tag);
    const Id* in = reinterpret_cast<const Id*>(ids);
    Id* out = reinterpret_cast<Id*>(out_ids);
    const Id mask_id = static_cast<Id>(mask_token_id);
    if (word_ids != 0) {
      mask_tokens_kernel<Id, true><<<grid, threads, 0, s>>>(in, out, mask_id, a);
    } else {
      mask_tokens_kernel<Id, false><<<grid, threads, 0, s>>>(in, out, mask_id, a);
    }
  };
  if (ids_is_int32) {
    launch(int32_t{});
  } else {
    launch(int64_t{});
  }
  check_launch("mask_tokens");
}

}  // namespace bertfast
