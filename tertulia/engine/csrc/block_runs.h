// How the engine's matmuls share their blocks of outputs between threads (int4_matmul.cpp,
// int8_matmul.cpp, float32_matmul.cpp).
//
// Threads take runs of blocks as they free up rather than a fixed share each: when another thread of
// the process (the HTTP server's) takes a core for a moment, the others carry on with the blocks
// left instead of waiting at the end of the call. Which thread computes a block changes no result.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace tertulia {

// Memory aligned for vector loads, freed with the owner.
template <class T>
using Aligned = std::unique_ptr<T, decltype(&std::free)>;

template <class T>
inline Aligned<T> aligned(size_t bytes) {
  return Aligned<T>(static_cast<T*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)), &std::free);
}

// body(index, scratch) for every block index in [0, blocks), each thread with its own scratch from
// make_scratch(); a thread's runs hold about blocks / (runs_per_thread * threads) blocks.
template <class MakeScratch, class Body>
inline void for_each_block(int64_t blocks, int64_t runs_per_thread, MakeScratch make_scratch, Body body) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run = std::max<int64_t>(1, blocks / (runs_per_thread * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t first = next.fetch_add(run); first < blocks; first = next.fetch_add(run)) {
      for (int64_t index = first; index < std::min(blocks, first + run); ++index) body(index, scratch);
    }
  });
}

}  // namespace tertulia
