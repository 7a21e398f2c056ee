// retention::detail: buffers and matrices that a thread keeps from one call to the next.
#pragma once

#include <retention/core.hpp>
#include <retention/state.hpp>

#include <array>
#include <cstddef>
#include <memory>

namespace retention {
namespace detail {

/// The most a thread keeps between calls for one ThreadScratch or KeptMatrices (16 MiB).
constexpr std::size_t scratch_keep_bytes = std::size_t(1) << 24;

/// The calling thread's Store for Tag while this object lives, or a Store of its own when the
/// thread's is in use (a second owner alive on the same thread). Why threads keep buffers: a
/// block freed at the end of every call may go back to the system (glibc trims the heap's top),
/// and the next call then faults its pages in again, which can cost more than a short call's
/// work (bench/results/backward-ratio.md).
template <class Store, class Tag>
class ThreadKept {
 public:
  ThreadKept() : kept_(!busy()) {
    if (kept_)
      busy() = true;
    else
      own_ = std::make_unique<Store>();
  }
  ~ThreadKept() {
    if (kept_) busy() = false;
  }
  ThreadKept(const ThreadKept&) = delete;
  ThreadKept& operator=(const ThreadKept&) = delete;

  Store& operator*() const { return kept_ ? thread_store() : *own_; }
  Store* operator->() const { return &**this; }

 private:
  static Store& thread_store() {
    static thread_local Store store;
    return store;
  }
  static bool& busy() {
    static thread_local bool in_use = false;
    return in_use;
  }

  std::unique_ptr<Store> own_;
  bool kept_;
};

/// n elements of T (contents unspecified, aligned as Eigen aligns its matrices) for the lifetime
/// of this object, from a buffer the thread keeps (ThreadKept) and only ever grows; requests
/// above keep_bytes (scratch_keep_bytes unless the caller says) get a buffer of their own.
template <class T, class Tag>
class ThreadScratch {
  /// An aligned block whose elements are left uninitialised: its contents are unspecified anyway,
  /// and filling a block of hundreds of MiB would cost a pass over memory.
  struct Buffer {
    T* data = nullptr;
    std::size_t size = 0;
    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { release(); }
    void release() {
      if (data) Eigen::aligned_allocator<T>().deallocate(data, size);
      data = nullptr;
      size = 0;
    }
    void reserve(std::size_t n) {
      if (n <= size) return;
      release();  // first, so that the old and the new block are never held together
      data = Eigen::aligned_allocator<T>().allocate(n);
      size = n;
    }
  };

 public:
  explicit ThreadScratch(Index n, std::size_t keep_bytes = scratch_keep_bytes) {
    const auto count = static_cast<std::size_t>(n);
    Buffer& buffer = count <= keep_bytes / sizeof(T) ? *kept_ : large_;
    buffer.reserve(count);
    data_ = buffer.data;
  }

  T* data() const { return data_; }

 private:
  ThreadKept<Buffer, Tag> kept_;
  Buffer large_;
  T* data_ = nullptr;
};

/// The working matrices and vectors of one call (a sweep's chunk buffers, its state), from slots
/// the thread keeps (ThreadKept): matrix(i, rows, cols) and vector(i, n) give slot i at that
/// shape, contents unspecified; a slot allocates only when its element count changes. Slots
/// holding more than scratch_keep_bytes in all are released at the end.
template <class T, class Tag, int Matrices, int Vectors = 0>
class KeptMatrices {
  struct Slots {
    std::array<Matrix<T>, Matrices> m;
    std::array<Vector<T>, (Vectors > 0 ? Vectors : 1)> v;
  };

 public:
  KeptMatrices() = default;
  ~KeptMatrices() {
    std::size_t elements = 0;
    for (const auto& m : slots_->m) elements += static_cast<std::size_t>(m.size());
    for (const auto& v : slots_->v) elements += static_cast<std::size_t>(v.size());
    if (elements * sizeof(T) > scratch_keep_bytes) {
      for (auto& m : slots_->m) m.resize(0, 0);
      for (auto& v : slots_->v) v.resize(0);
    }
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
  ThreadKept<Slots, Tag> slots_;
};

/// state.S = S and state.z = z for a state a call hands back (a final state, a state gradient):
/// into the state's own storage when the shapes match, so nothing is allocated; otherwise both
/// copies are made first and then swapped in, so that an allocation failure leaves the state
/// untouched (assigning would not: Eigen's resize frees the old block before it allocates).
template <class T, class DS, class DZ>
void store_state(RetentionState<T>& state, const Eigen::MatrixBase<DS>& S,
                 const Eigen::MatrixBase<DZ>& z) {
  if (state.S.rows() == S.rows() && state.S.cols() == S.cols() && state.z.size() == z.size()) {
    state.S = S;
    state.z = z;
  } else {
    Matrix<T> S_copy = S;
    Vector<T> z_copy = z;
    state.S.swap(S_copy);
    state.z.swap(z_copy);
  }
}

/// x, a row-major view with an outer stride (ConstRows or a strided Map), as the operand of
/// products that pack it again and again (the parallel forms' keys and values, read by every
/// later query block; MaSA's tile products): x itself, or, when `many` holds and x's rows are
/// spread out (a head of a [B, T, H, D] buffer, each row on a page of its own), a contiguous copy
/// in kept's matrix slot `slot`, which Eigen packs faster (bench/results/design-measurements.md).
/// The values are the same, so the products do not change.
template <class View, class Kept>
View packed_rows(const View& x, bool many, Kept& kept, int slot) {
  using T = typename View::Scalar;
  if (!many || x.outerStride() == x.cols()) return x;
  Matrix<T>& buf = kept.matrix(slot, x.rows(), x.cols());
  buf = x;
  return View(Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>(
      buf.data(), buf.rows(), buf.cols(), Eigen::OuterStride<>(buf.cols())));
}

}  // namespace detail
}  // namespace retention
