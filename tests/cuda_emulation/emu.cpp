// The emulator's runtime (see emu.h for the model): blocks of fibers, the scheduler that completes
// barriers and warp collectives, shared memory, faults and the runtime API's state.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

Device& device() {
  static Device d;
  return d;
}

namespace detail {
namespace {

constexpr size_t kStackBytes = size_t{128} << 10;  // per fiber; the kernels' frames take < 1 KiB
constexpr size_t kPoisonedStack = size_t{4} << 10;  // the top of it, 0xFF before each block
constexpr size_t kSharedBytes = size_t{48} << 10;  // per block, static + dynamic (CUDA's default cap)

enum class State { running, barrier, warp, done };

struct Thread {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes, from the pool below
  uint3 idx{0, 0, 0};
  int lane = 0, warp = 0;
  State state = State::running;
  // the collective it waits at, and its result
  Op op = Op::barrier;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
};

struct Grid {
  const char* site = "";
  dim3 grid, block;
  size_t dynamic_bytes = 0;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;  // of the block being run
  ucontext_t scheduler;
  Thread* current = nullptr;  // the fiber running, or null in the scheduler
  alignas(16) unsigned char shared[kSharedBytes];
  size_t shared_used = 0;
  std::vector<std::pair<const void*, void*>> slots;  // declaration -> storage, this block
  cudaError_t fault = cudaSuccess;
  std::string message;
  uint64_t order_state = 0x9E3779B97F4A7C15u;
};

Grid* g_grid = nullptr;  // the launch in progress
bool g_fail_next = false;  // emu_fail_next_launch
std::mutex g_launch_mutex;  // one launch at a time (shared state above)
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaError_t t_message_code = cudaSuccess;
thread_local std::string t_message;

// Stacks live for the process: mmap'd lazily (pages appear when touched), a guard page below each.
char* stack_from_pool(size_t i) {
  static std::vector<char*> pool;
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
    mprotect(p, 4096, PROT_NONE);
    pool.push_back(static_cast<char*>(p) + 4096);
  }
  return pool[i];
}

const char* op_name(Op op) {
  switch (op) {
    case Op::barrier: return "__syncthreads";
    case Op::barrier_count: return "__syncthreads_count";
    case Op::barrier_and: return "__syncthreads_and";
    case Op::barrier_or: return "__syncthreads_or";
    case Op::shfl: return "__shfl_sync";
    case Op::shfl_up: return "__shfl_up_sync";
    case Op::shfl_down: return "__shfl_down_sync";
    case Op::shfl_xor: return "__shfl_xor_sync";
    case Op::ballot: return "__ballot_sync";
    case Op::any: return "__any_sync";
    case Op::all: return "__all_sync";
    case Op::syncwarp: return "__syncwarp";
  }
  return "?";
}

std::string block_name(const Grid& g) {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         ") of " + g.site;
}

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Records the launch's first fault. From a fiber it abandons the fiber (jumps back to the
// scheduler, which ends the launch); from the scheduler it returns false.
bool fault(Grid& g, cudaError_t code, const std::string& what) {
  if (g.fault == cudaSuccess) {
    g.fault = code;
    g.message = what + " (in " + block_name(g) + ")";
  }
  if (g.current != nullptr) {
    g.current->state = State::done;
    setcontext(&g.scheduler);  // no return
  }
  return false;
}

void fiber_main() {
  Grid& g = *g_grid;
  try {
    (*g.body)();
  } catch (const std::exception& e) {
    fault(g, cudaErrorLaunchFailure, std::string("exception in a kernel: ") + e.what());
  }
  g.current->state = State::done;  // returns to uc_link: the scheduler
}

Grid& in_kernel(const char* what) {
  if (g_grid == nullptr || g_grid->current == nullptr)
    throw std::logic_error(std::string("emu: ") + what + " called outside a kernel");
  return *g_grid;
}

// The lane a shuffle reads, or -1 for "its own value" (CUDA's rules for a source outside the
// lane's width-wide segment).
int source_lane(Op op, int lane, int arg, int width) {
  const int base = lane & ~(width - 1);
  switch (op) {
    case Op::shfl: return base + (arg & (width - 1));
    case Op::shfl_up: return lane - arg >= base ? lane - arg : -1;
    case Op::shfl_down: return lane + arg < base + width ? lane + arg : -1;
    default: {  // shfl_xor: a later segment (or past the warp) gives the lane its own value
      const int src = lane ^ arg;
      return src < base + width && src < 32 ? src : -1;
    }
  }
}

// Completes the warp collective of the lanes in `mask` of warp w (all waiting at it).
bool finish_warp(Grid& g, int w, unsigned mask) {
  Thread* lanes = &g.threads[static_cast<size_t>(w) * 32];
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && lanes[l].value != 0) ballot |= uint64_t{1} << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Thread& t = lanes[l];
    switch (t.op) {
      case Op::ballot: t.result = ballot; break;
      case Op::any: t.result = ballot != 0; break;
      case Op::all: t.result = ballot == mask; break;
      case Op::syncwarp: t.result = 0; break;
      default: {
        const int src = source_lane(t.op, l, t.arg, t.width);
        if (src >= 0 && !(mask >> src & 1u))
          return fault(g, cudaErrorLaunchFailure,
                       std::string(op_name(t.op)) + ": lane " + std::to_string(l) + " of warp " + std::to_string(w) +
                           " reads lane " + std::to_string(src) + ", which its mask " + hex(mask) + " leaves out");
        t.result = src < 0 ? t.value : lanes[src].value;
      }
    }
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) lanes[l].state = State::running;
  return true;
}

// Completes the warp collectives of warp w whose lanes have all arrived (every lane of the warp
// waits or has exited); `progress` tells whether any did. False on a fault.
bool complete_warp(Grid& g, int w, bool& progress) {
  const int lanes = std::min(32, static_cast<int>(g.threads.size()) - w * 32);
  Thread* warp = &g.threads[static_cast<size_t>(w) * 32];
  for (int i = 0; i < lanes; ++i) {
    const Thread& t = warp[i];
    if (t.state != State::warp) continue;
    if (lanes < 32 && (t.mask >> lanes) != 0)
      return fault(g, cudaErrorLaunchFailure,
                   std::string(op_name(t.op)) + ": mask " + hex(t.mask) + " names lanes past the end of the block");
    bool complete = true;
    for (int l = 0; l < lanes; ++l) {
      if (!(t.mask >> l & 1u)) continue;
      const Thread& u = warp[l];
      if (u.state == State::done)
        return fault(g, cudaErrorLaunchFailure,
                     std::string(op_name(t.op)) + " with mask " + hex(t.mask) + " in warp " + std::to_string(w) +
                         ": lane " + std::to_string(l) + " has exited (every lane the mask names must take part)");
      if (u.state != State::warp || u.mask != t.mask) {
        complete = false;  // at a barrier, or in another group of the warp
        continue;
      }
      if (u.op != t.op || u.width != t.width)
        return fault(g, cudaErrorLaunchFailure,
                     "warp " + std::to_string(w) + ": lanes " + std::to_string(i) + " and " + std::to_string(l) +
                         " of mask " + hex(t.mask) + " meet at different collectives (" + op_name(t.op) + ", " +
                         op_name(u.op) + ")");
    }
    if (complete) {
      if (!finish_warp(g, w, t.mask)) return false;
      progress = true;
    }
  }
  return true;
}

// Called when every live thread waits and no warp collective can complete: releases the barrier
// when the whole block is at it; otherwise a fault (a barrier some threads skipped, a deadlock).
bool complete_block(Grid& g) {
  const int n = static_cast<int>(g.threads.size());
  int at_barrier = 0, done = 0, at_warp = 0;
  const Thread* warp_waiter = nullptr;
  for (const Thread& t : g.threads) {
    at_barrier += t.state == State::barrier;
    done += t.state == State::done;
    if (t.state == State::warp && warp_waiter == nullptr) warp_waiter = &t;
    at_warp += t.state == State::warp;
  }
  if (at_barrier > 0 && at_barrier + done == n) {
    if (done > 0)
      return fault(g, cudaErrorLaunchFailure,
                   "__syncthreads reached by " + std::to_string(at_barrier) + " threads while " + std::to_string(done) +
                       " have exited: a barrier must be reached by every thread of the block");
    const Op op = g.threads[0].op;
    uint64_t count = 0;
    for (const Thread& t : g.threads) {
      if (t.op != op)
        return fault(g, cudaErrorLaunchFailure,
                     std::string("threads meet at different barriers (") + op_name(op) + ", " + op_name(t.op) + ")");
      count += t.value;
    }
    for (Thread& t : g.threads) {
      t.result = op == Op::barrier_count ? count : op == Op::barrier_and ? count == uint64_t(n) : count != 0;
      t.state = State::running;
    }
    return true;
  }
  std::string what = "deadlock: " + std::to_string(at_barrier) + " threads wait at a barrier, " +
                     std::to_string(at_warp) + " at warp collectives, " + std::to_string(done) + " have exited";
  if (warp_waiter != nullptr)
    what += " (e.g. lane " + std::to_string(warp_waiter->lane) + " of warp " + std::to_string(warp_waiter->warp) +
            " at " + op_name(warp_waiter->op) + " with mask " + hex(warp_waiter->mask) + ")";
  return fault(g, cudaErrorLaunchFailure, what);
}

uint64_t next_random(Grid& g) {  // xorshift64: a fixed sequence, so runs repeat
  g.order_state ^= g.order_state << 13;
  g.order_state ^= g.order_state >> 7;
  g.order_state ^= g.order_state << 17;
  return g.order_state;
}

void shuffle(Grid& g, std::vector<int>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(g) % i]);
}

// Runs one block to its end; false on a fault. Between two barriers the warps run one after another
// in a random order, each as far as it can go (through its own collectives), its lanes in a random
// order: so one warp may run a whole phase before another starts it, as on a GPU, and a barrier that
// is missing between two warps' accesses to shared memory shows.
bool run_block(Grid& g) {
  const int n = static_cast<int>(g.threads.size());
  g.slots.clear();
  g.shared_used = (g.dynamic_bytes + 15) / 16 * 16;  // the dynamic bytes first, then static variables
  std::memset(g.shared, 0xFF, g.dynamic_bytes);
  for (int i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    t.idx = {static_cast<unsigned>(i % g.block.x), static_cast<unsigned>(i / g.block.x % g.block.y),
             static_cast<unsigned>(i / (g.block.x * g.block.y))};
    t.lane = i % 32;
    t.warp = i / 32;
    t.state = State::running;
    // a fresh stack top of 0xFF: registers (local arrays) read before written are not yesterday's
    std::memset(t.stack + kStackBytes - kPoisonedStack, 0xFF, kPoisonedStack);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &g.scheduler;
    makecontext(&t.ctx, fiber_main, 0);
  }
  std::vector<int> warps((n + 31) / 32), lanes;
  for (size_t w = 0; w < warps.size(); ++w) warps[w] = static_cast<int>(w);
  for (;;) {
    shuffle(g, warps);
    for (int w : warps) {
      lanes.clear();
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) lanes.push_back(i);
      for (bool progress = true; progress;) {
        shuffle(g, lanes);
        for (int i : lanes) {
          Thread& t = g.threads[i];
          if (t.state != State::running) continue;
          g.current = &t;
          threadIdx = t.idx;
          swapcontext(&g.scheduler, &t.ctx);  // back when it waits or ends
          g.current = nullptr;
          if (g.fault != cudaSuccess) return false;
        }
        progress = false;
        if (!complete_warp(g, w, progress)) return false;
      }
    }
    bool all_done = true;
    for (const Thread& t : g.threads) all_done = all_done && t.state == State::done;
    if (all_done) return true;
    if (!complete_block(g)) return false;
  }
}

void set_error(cudaError_t code, const std::string& message) {
  t_last_error = code;
  t_message_code = code;
  t_message = message;
}

}  // namespace

void run_grid(const char* site, const Config& cfg, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (g_grid != nullptr) throw std::logic_error("emu: a kernel launched a kernel (not emulated)");
  const dim3 b = cfg.block, gr = cfg.grid;
  const uint64_t n = uint64_t{b.x} * b.y * b.z;
  if (n == 0 || n > 1024 || b.z > 64 || gr.x == 0 || gr.y == 0 || gr.z == 0 || gr.x > 0x7FFFFFFFu || gr.y > 65535 ||
      gr.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, std::string(site) + ": invalid configuration argument: grid (" +
                                                 std::to_string(gr.x) + "," + std::to_string(gr.y) + "," +
                                                 std::to_string(gr.z) + "), block (" + std::to_string(b.x) + "," +
                                                 std::to_string(b.y) + "," + std::to_string(b.z) + ")");
    return;
  }
  if (cfg.smem > kSharedBytes) {
    set_error(cudaErrorInvalidValue, std::string(site) + ": " + std::to_string(cfg.smem) +
                                         " bytes of dynamic shared memory, more than 48 KiB");
    return;
  }
  if (g_fail_next) {
    g_fail_next = false;
    set_error(cudaErrorLaunchFailure, std::string("emulated kernel fault: injected by emu_fail_next_launch (in ") + site + ")");
    return;
  }
  auto g = std::make_unique<Grid>();
  g->site = site;
  g->grid = gr;
  g->block = b;
  g->dynamic_bytes = cfg.smem;
  g->body = &body;
  g->threads.resize(n);
  for (size_t i = 0; i < n; ++i) g->threads[i].stack = stack_from_pool(i);
  gridDim = gr;
  blockDim = b;
  g_grid = g.get();
  bool ok = true;
  for (unsigned z = 0; ok && z < gr.z; ++z)
    for (unsigned y = 0; ok && y < gr.y; ++y)
      for (unsigned x = 0; ok && x < gr.x; ++x) {
        blockIdx = {x, y, z};
        ok = run_block(*g);
      }
  g_grid = nullptr;
  if (!ok) set_error(g->fault, std::string("emulated kernel fault: ") + g->message);
}

uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width) {
  Grid& g = in_kernel(op_name(op));
  Thread& t = *g.current;
  const bool barrier = op == Op::barrier || op == Op::barrier_count || op == Op::barrier_and || op == Op::barrier_or;
  if (!barrier && !(mask >> t.lane & 1u))
    fault(g, cudaErrorLaunchFailure,
          std::string(op_name(op)) + ": lane " + std::to_string(t.lane) + " calls it with mask " + hex(mask) +
              ", which leaves the lane out");
  if (!barrier && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    fault(g, cudaErrorLaunchFailure, std::string(op_name(op)) + ": width " + std::to_string(width) + " is not a power of 2 <= 32");
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = barrier ? 32 : width;
  t.state = barrier ? State::barrier : State::warp;
  swapcontext(&t.ctx, &g.scheduler);
  return t.result;
}

void* shared_slot(const void* site, size_t bytes) {
  Grid& g = in_kernel("a __shared__ declaration");
  for (const auto& s : g.slots)
    if (s.first == site) return s.second;
  const size_t at = (g.shared_used + 15) / 16 * 16;
  if (at + bytes > kSharedBytes)
    fault(g, cudaErrorLaunchOutOfResources, "the block's shared memory passes 48 KiB (static and dynamic)");
  void* p = g.shared + at;
  std::memset(p, 0xFF, bytes);  // unwritten shared memory reads as NaN, not as zeros
  g.shared_used = at + bytes;
  g.slots.emplace_back(site, p);
  return p;
}

void* dynamic_shared() { return in_kernel("extern __shared__").shared; }

}  // namespace detail
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Runtime API

using emu::detail::t_last_error;

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return t_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  if (err == emu::detail::t_message_code && !emu::detail::t_message.empty()) return emu::detail::t_message.c_str();
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = emu::device().sms; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// -fsanitize=alignment (build.py compiles the kernels with it) calls this before an access through
// a pointer not aligned for its type, which faults on a GPU ("misaligned address"). The record's
// layout is GCC's and Clang's UBSan ABI.

namespace {
struct UbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeMismatch {
  UbsanLocation where;
  const void* type;
  unsigned char log_alignment;
  unsigned char kind;
};

void misaligned(const UbsanTypeMismatch* d, uintptr_t address) {
  const std::string what = "misaligned address " + emu::detail::hex(address) + ": an access that needs " +
                           std::to_string(1u << d->log_alignment) + "-byte alignment at " + d->where.file + ":" +
                           std::to_string(d->where.line);
  if (emu::detail::g_grid == nullptr || emu::detail::g_grid->current == nullptr) throw std::runtime_error(what);
  emu::detail::fault(*emu::detail::g_grid, cudaErrorMisalignedAddress, what);
}
}  // namespace

extern "C" {
__attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1(const UbsanTypeMismatch* d,
                                                                             uintptr_t address) {
  misaligned(d, address);
}
__attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1_abort(const UbsanTypeMismatch* d,
                                                                                   uintptr_t address) {
  misaligned(d, address);
}

// Python (ctypes) sets the emulated card's size.
__attribute__((visibility("default"))) void emu_configure(int sms, int max_blocks_per_sm) {
  emu::device().sms = sms;
  emu::device().max_blocks_per_sm = max_blocks_per_sm;
}

// The next launch fails as a faulting kernel would: tests that each launcher reports it.
__attribute__((visibility("default"))) void emu_fail_next_launch() { emu::detail::g_fail_next = true; }
}
