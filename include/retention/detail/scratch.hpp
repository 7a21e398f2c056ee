// retention::detail: a buffer that a thread keeps from one call to the next.
#pragma once

#include <retention/core.hpp>

#include <array>
#include <cstddef>
#include <memory>
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

/// The working matrices and vectors of one call (a sweep's chunk buffers, its state), from slots
/// that the calling thread keeps for the next KeptMatrices with the same Tag: a call that frees
/// a few hundred KiB at its end may hand them back to the system (glibc trims the heap's top), and
/// the next call then faults their pages in again, which costs more than the work of a short
/// sequence (bench/results/backward-ratio.md, session 18). matrix(i, rows, cols) and
/// vector(i, n) give slot i at that shape, contents unspecified; a slot allocates only when its
/// element count changes. Slots holding more than scratch_keep_bytes in all are released at the
/// end, and a second KeptMatrices of the same Tag alive on the same thread gets slots of its own.
template <class T, class Tag, int Matrices, int Vectors = 0>
class KeptMatrices {
  struct Slots {
    std::array<Matrix<T>, Matrices> m;
    std::array<Vector<T>, (Vectors > 0 ? Vectors : 1)> v;
  };

 public:
  KeptMatrices() {
    bool& busy = kept_busy();
    if (!busy) {
      busy = true;
      holds_kept_ = true;
      slots_ = &kept_slots();
    } else {
      own_ = std::make_unique<Slots>();
      slots_ = own_.get();
    }
  }
  ~KeptMatrices() {
    if (!holds_kept_) return;
    std::size_t elements = 0;
    for (const auto& m : slots_->m) elements += static_cast<std::size_t>(m.size());
    for (const auto& v : slots_->v) elements += static_cast<std::size_t>(v.size());
    if (elements * sizeof(T) > scratch_keep_bytes) {
      for (auto& m : slots_->m) m.resize(0, 0);
      for (auto& v : slots_->v) v.resize(0);
    }
    kept_busy() = false;
  }
  KeptMatrices(const KeptMatrices&) = delete;
  KeptMatrices& operator=(const KeptMatrices&) = delete;

  Matrix<T>& matrix(int i, Index rows, Index cols) {
    Matrix<T>& m = slots_->m[static_cast<std::size_t>(i)];
    // Emptied first: Eigen's resize frees the old block before allocating the new one, and a
    // failed allocation would leave the slot pointing at the freed block.
    if (m.size() != rows * cols) m.resize(0, 0);
    m.resize(rows, cols);
    return m;
  }
  Matrix<T>& zero_matrix(int i, Index rows, Index cols) {
    Matrix<T>& m = matrix(i, rows, cols);
    m.setZero();
    return m;
  }
  Vector<T>& vector(int i, Index n) {
    static_assert(Vectors > 0, "KeptMatrices: no vector slots");
    Vector<T>& v = slots_->v[static_cast<std::size_t>(i)];
    if (v.size() != n) v.resize(0);  // as in matrix()
    v.resize(n);
    return v;
  }

 private:
  static Slots& kept_slots() {
    static thread_local Slots slots;
    return slots;
  }
  static bool& kept_busy() {
    static thread_local bool busy = false;
    return busy;
  }

  std::unique_ptr<Slots> own_;
  Slots* slots_ = nullptr;
  bool holds_kept_ = false;
};

}  // namespace detail
}  // namespace retention
