// retention::detail: a buffer that a thread keeps from one call to the next.
#pragma once

#include <retention/core.hpp>

#include <cstddef>
#include <vector>

namespace retention {
namespace detail {

/// The largest buffer ThreadScratch keeps between calls (16 MiB).
constexpr std::size_t scratch_keep_bytes = std::size_t(1) << 24;

/// n elements of T (contents unspecified, aligned as Eigen aligns its matrices) for the lifetime
/// of this object, from a buffer that the calling thread keeps for the next ThreadScratch with
/// the same Tag. A large block freed at the end of every call may go back to the system, and its
/// pages are then mapped and faulted in again on the next call (bench/results/backward-ratio.md);
/// a kept buffer is faulted in once. Requests above scratch_keep_bytes, and a second
/// ThreadScratch of the same Tag alive on the same thread, get a buffer of their own.
template <class T, class Tag>
class ThreadScratch {
  using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;

 public:
  explicit ThreadScratch(Index n) {
    const auto count = static_cast<std::size_t>(n);
    bool& busy = kept_busy();
    if (!busy && count * sizeof(T) <= scratch_keep_bytes) {
      Buffer& kept = kept_buffer();
      if (kept.size() < count) {
        kept.clear();
        kept.shrink_to_fit();
        kept.resize(count);
      }
      busy = true;
      holds_kept_ = true;
      data_ = kept.data();
    } else {
      own_.resize(count);
      data_ = own_.data();
    }
  }
  ~ThreadScratch() {
    if (holds_kept_) kept_busy() = false;
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;

  T* data() const { return data_; }

 private:
  static Buffer& kept_buffer() {
    static thread_local Buffer buffer;
    return buffer;
  }
  static bool& kept_busy() {
    static thread_local bool busy = false;
    return busy;
  }

  Buffer own_;
  T* data_ = nullptr;
  bool holds_kept_ = false;
};

}  // namespace detail
}  // namespace retention
