// parallel_for over [0, n) with std::thread (no OpenMP: a second OpenMP runtime beside torch's is
// a known source of crashes). Work is split into contiguous ranges, one per thread; callers make
// every item's result independent of the split, so any thread count gives the same output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace bertfast {

// Threads to use for n items of roughly `grain` items' worth of work each: requested > 0 wins,
// else the hardware's count, never more than there are grains of work.
inline int thread_count(int64_t n, int64_t grain, int requested) {
  int hw = requested > 0 ? requested : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int64_t useful = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  return static_cast<int>(std::min<int64_t>(hw, useful));
}

// fn(begin, end) on disjoint ranges covering [0, n). The first exception thrown by any range is
// rethrown here after every thread has joined.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  if (n <= 0) return;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_lock;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    int64_t begin = n * t / threads, end = n * (t + 1) / threads;
    pool.emplace_back([&, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace bertfast
