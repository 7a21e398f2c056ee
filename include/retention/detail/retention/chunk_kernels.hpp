// retention: register-blocked micro-kernels of the chunkwise form (docs/math.md §2).
//
// One chunk of the chunkwise form is three small products (C = 32..64 rows against dk, dv of about
// 128): the score tile Q_i K_i^T, the output (Q_i K_i^T (.) D) V_i + diag(gamma^(j+1)) Q_i S, and
// the state update gamma^L S + K~_i^T V_i. Eigen's GEMM packs both operands on every call, which at
// these sizes costs a large share of the work. These kernels instead keep a block of rows x a few
// SIMD packets of accumulators in registers and read operands where they lie (strided token rows,
// the row-major state), with what surrounds each product fused into it: the decay mask is applied
// to the score tile as it leaves the registers, the score tile is skipped above the diagonal
// (causal), the query factor and the output normalisation are row scales of the accumulators, and
// gamma^L S is the state accumulators' initial value.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/simd/block.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// A block size as a value the loop bodies below can take as a compile-time constant.
template <int N>
using ChunkInt = std::integral_constant<int, N>;

/// Calls body(ChunkInt<W>, ChunkInt<NP>, j) over columns [0, n) in blocks of NP vectors of W
/// lanes: whole blocks of simd::Blocking::packets vectors first, then single vectors, then
/// halving widths down to one lane for a ragged end (dv = 33 ends in one scalar column).
template <int W, class Body>
[[gnu::always_inline]] inline void chunk_column_tail(Index n, Index j, Body& body) {
  // n - j < 2 W here: at most one block of each width W, W / 2, .., 1.
  if (j + W <= n) {
    body(ChunkInt<W>(), ChunkInt<1>(), j);
    j += W;
  }
  if constexpr (W > 1) chunk_column_tail<W / 2>(n, j, body);
}

template <class T, class Isa, class Body>
[[gnu::always_inline]] inline void chunk_for_columns(Index n, Body&& body) {
  constexpr int P = simd::Blocking<T, Isa>::lanes, NP = simd::Blocking<T, Isa>::packets;
  Index j = 0;
  for (; j + NP * P <= n; j += NP * P) body(ChunkInt<P>(), ChunkInt<NP>(), j);
  for (; j + P <= n; j += P) body(ChunkInt<P>(), ChunkInt<1>(), j);
  if constexpr (P > 1) chunk_column_tail<P / 2>(n, j, body);
}

/// Calls body(ChunkInt<R>, i) over rows [0, m): blocks of simd::Blocking::rows(packets) rows, then
/// single rows.
template <class T, class Isa, class Body>
[[gnu::always_inline]] inline void chunk_for_rows(Index m, Body&& body) {
  using B = simd::Blocking<T, Isa>;
  constexpr int R = B::rows(B::packets);
  Index i = 0;
  for (; i + R <= m; i += R) body(ChunkInt<R>(), i);
  for (; i < m; ++i) body(ChunkInt<1>(), i);
}

/// The masked score tile of one chunk: A[i, j] = D[i, j] sum_c q[i, c] kt[c, j] for i < rows and
/// j below the causal limit of i's row block (the rest of A is never read, and stays as it was).
/// q [rows, dk] (row stride ldq), kt = K_i^T [dk, ld] (zero or finite beyond the chunk's keys), d
/// and a [.., ld] with ld a multiple of simd::max_lanes<T>; d is 0 above the diagonal. With
/// row_sum != nullptr also writes row_sum[i] = sum_j A[i, j] (decay_and_score's r without the
/// state part). The mask is applied by multiplication, so the chunk's keys must be finite (0 x Inf
/// = NaN would reach earlier rows); chunkwise_same_type sends chunks holding an Inf or NaN down an
/// exact path instead.
template <class Isa, class T>
[[gnu::always_inline]] inline void chunk_scores(const T* q, Index ldq, const T* kt, const T* d,
                                                T* a, Index ld, Index rows, Index dk, T* row_sum) {
  constexpr int P = simd::Blocking<T, Isa>::lanes;
  chunk_for_rows<T, Isa>(
      rows, [&](auto r_tag, Index i0) __attribute__((always_inline)) {
        constexpr int R = decltype(r_tag)::value;
        // Columns [0, i0 + R) hold every key at or before the block's last query.
        const Index jend = std::min<Index>(i0 + R, rows);
        T sums[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) sums[r] = T(0);
        auto block = [&](auto np_tag, Index j0) __attribute__((always_inline)) {
          constexpr int NP = decltype(np_tag)::value;
          simd::Block<T, P, R, NP> acc;
          acc.set_zero();
          acc.madd(q + i0 * ldq, ldq, 1, kt + j0, ld, dk);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
            for (int p = 0; p < NP; ++p) {
              acc.acc[r][p] *= simd::load<P>(d + (i0 + r) * ld + j0 + p * P);
              if (row_sum) sums[r] += simd::hsum<P, T>(acc.acc[r][p]);
            }
          acc.store(a + i0 * ld + j0, ld);
        };
        constexpr int NPmax = simd::Blocking<T, Isa>::packets;
        Index j0 = 0;
        for (; j0 + NPmax * P <= jend; j0 += NPmax * P) block(ChunkInt<NPmax>(), j0);
        for (; j0 < jend; j0 += P) block(ChunkInt<1>(), j0);
        if (row_sum)
          for (int r = 0; r < R; ++r) row_sum[i0 + r] = sums[r];
      });
}

/// Columns [j0, j0 + W NP) of one chunk's output rows:
/// O[i, :] = norm[i] (qf[i] sum_c q[i, c] S[c, :] + sum_{j <= i} A[i, j] v[j, :]), i < rows.
/// q [rows, dk] (ldq), s [dk, ..] (lds; not read when qf == nullptr: zero state), A[i, j] at
/// a[i ars + j acs] (the score tile, read below the causal limit only), v [rows, ..] (ldv), o
/// (ldo); norm == nullptr: no normalisation. With init != nullptr the state term is init [rows,
/// ..] (row stride ldo), formed elsewhere, and q, s and qf are not read. A row block reads the
/// values of keys up to its last row, weighted by zero scores above the diagonal: finite values
/// only (see chunk_scores).
template <class Isa, int W, int NP, class T>
[[gnu::always_inline]] inline void chunk_output_columns(const T* q, Index ldq, const T* s,
                                                        Index lds, const T* qf, const T* a,
                                                        Index ars, Index acs, const T* v, Index ldv,
                                                        const T* init, const T* norm, T* o,
                                                        Index ldo, Index rows, Index dk, Index j0) {
  chunk_for_rows<T, Isa>(
      rows, [&](auto r_tag, Index i0) __attribute__((always_inline)) {
        constexpr int R = decltype(r_tag)::value;
        const Index jend = std::min<Index>(i0 + R, rows);
        simd::Block<T, W, R, NP> acc;
        if (init) {
          acc.load(init + i0 * ldo + j0, ldo);
        } else {
          acc.set_zero();
          if (qf) {
            acc.madd(q + i0 * ldq, ldq, 1, s + j0, lds, dk);
            acc.scale_rows(qf + i0);
          }
        }
        acc.madd(a + i0 * ars, ars, acs, v + j0, ldv, jend);
        if (norm) acc.scale_rows(norm + i0);
        acc.store(o + i0 * ldo + j0, ldo);
      });
}

/// Columns [j0, j0 + W NP) of the state update S = beta S + kw^T v over its dk rows: kw = key
/// rows scaled by gamma^(L-1-l) [rows, dk] (ldkw), v [rows, ..] (ldv), s [dk, ..] (lds);
/// zero_state: S starts at 0 (beta unused).
template <class Isa, int W, int NP, class T>
[[gnu::always_inline]] inline void chunk_state_columns(const T* kw, Index ldkw, const T* v,
                                                       Index ldv, T* s, Index lds, T beta,
                                                       bool zero_state, Index rows, Index dk,
                                                       Index j0) {
  chunk_for_rows<T, Isa>(
      dk, [&](auto r_tag, Index c0) __attribute__((always_inline)) {
        constexpr int R = decltype(r_tag)::value;
        simd::Block<T, W, R, NP> acc;
        if (zero_state)
          acc.set_zero();
        else
          acc.load_scaled(s + c0 * lds + j0, lds, beta);
        acc.madd(kw + c0, 1, ldkw, v + j0, ldv, rows);
        acc.store(s + c0 * lds + j0, lds);
      });
}

/// dst [rows, cols] (row stride ldd) = src (row stride lds), in whole vectors where they fit: the
/// chunk's rows gathered from the multi-head layout, and its outputs scattered back.
struct CopyRowsKernel {
  template <class Isa, class T>
  static void run(const T* src, Index lds, Index rows, Index cols, T* dst, Index ldd) {
    constexpr int N = simd::lanes<T, Isa>;
    for (Index i = 0; i < rows; ++i) {
      const T* s = src + i * lds;
      T* d = dst + i * ldd;
      Index j = 0;
      for (; j + N <= cols; j += N) simd::store(d + j, simd::load<N>(s + j));
      for (; j < cols; ++j) d[j] = s[j];
    }
  }
};

/// As CopyRowsKernel, writing the whole cache lines of each dst row through non-temporal stores
/// (simd::stream) and the partial lines at its ends through ordinary ones.
struct StreamRowsKernel {
  template <class Isa, class T>
  static void run(const T* src, Index lds, Index rows, Index cols, T* dst, Index ldd) {
    constexpr int N = simd::lanes<T, Isa>;
    constexpr Index line = simd::max_bytes, size = static_cast<Index>(sizeof(T)),
                    per_line = line / size;
    for (Index i = 0; i < rows; ++i) {
      const T* s = src + i * lds;
      T* d = dst + i * ldd;
      // Elements before the first line boundary, then whole lines, then the rest.
      const auto misalign = static_cast<Index>(reinterpret_cast<std::uintptr_t>(d) % line);
      const Index head = std::min<Index>(cols, misalign == 0 ? 0 : (line - misalign) / size);
      const Index body_end = head + (cols - head) / per_line * per_line;
      Index j = 0;
      for (; j < head; ++j) d[j] = s[j];
      for (; j < body_end; j += N) simd::stream(d + j, simd::load<N>(s + j));
      for (; j + N <= cols; j += N) simd::store(d + j, simd::load<N>(s + j));
      for (; j < cols; ++j) d[j] = s[j];
    }
  }
};

/// Whether a chunk's rows of X are strided runs of T that CopyRowsKernel can copy (row-major,
/// direct access; innerStride() == 1 is checked at run time).
template <class X, class T>
constexpr bool chunk_rows_direct = (int(X::Flags) & Eigen::DirectAccessBit) &&
                                   (int(X::Flags) & Eigen::RowMajorBit) && !X::IsVectorAtCompileTime
                                   && std::is_same_v<typename X::Scalar, T>;

/// Rows [i0, i0 + L) of x into dst [L, x.cols()] (contiguous): through CopyRowsKernel when x is a
/// row-major view with contiguous rows, else through Eigen.
template <class T, class Derived>
void gather_chunk_rows(const Eigen::MatrixBase<Derived>& x, Index i0, Index L, Matrix<T>& dst) {
  if constexpr (chunk_rows_direct<Derived, T>) {
    const Derived& d = x.derived();
    if (d.innerStride() == 1) {
      simd::dispatch<CopyRowsKernel>(d.data() + i0 * d.outerStride(), Index(d.outerStride()), L,
                                     Index(d.cols()), dst.data(), Index(dst.cols()));
      return;
    }
  }
  dst.topRows(L) = x.middleRows(i0, L);
}

/// Bytes an output must span (rows x row stride) before a sweep writes it through non-temporal
/// stores: well above a core's L2, so that the output's lines would have left the caches before
/// anyone read them, and reading them in before overwriting them is pure cost.
constexpr std::size_t stream_output_min_bytes = std::size_t(8) << 20;

/// Whether a sweep writes x's rows through StreamRowsKernel: x row-major with contiguous rows of
/// at least two cache lines (so that most of each row is whole lines), spanning at least
/// stream_output_min_bytes.
template <class T, class Derived>
bool streams_chunk_rows(const Derived& x) {
  using Plain = std::decay_t<Derived>;
  if constexpr (chunk_rows_direct<Plain, T>) {
    return x.innerStride() == 1 && x.rows() > 0 &&
           static_cast<std::size_t>(x.cols()) * sizeof(T) >= 2 * simd::max_bytes &&
           static_cast<std::size_t>(x.rows()) * static_cast<std::size_t>(x.outerStride()) *
                   sizeof(T) >=
               stream_output_min_bytes;
  } else {
    return false;
  }
}

/// dst rows (stride ldd, negative for a reversed sweep) = src's first L rows (contiguous): through
/// StreamRowsKernel with `stream`, else CopyRowsKernel.
template <class T>
void write_chunk_rows(const Matrix<T>& src, Index L, T* dst, Index ldd, bool stream) {
  const Index cols = src.cols();
  if (stream)
    simd::dispatch<StreamRowsKernel>(src.data(), cols, L, cols, dst, ldd);
  else
    simd::dispatch<CopyRowsKernel>(src.data(), cols, L, cols, dst, ldd);
}

/// x's rows [i0, i0 + L) = src's first L rows (src contiguous), as gather_chunk_rows; with
/// `stream` (streams_chunk_rows(x) holds) through non-temporal stores.
template <class T, class Derived>
void scatter_chunk_rows(const Matrix<T>& src, Index i0, Index L, Derived& x, bool stream = false) {
  using Plain = std::decay_t<Derived>;
  if constexpr (chunk_rows_direct<Plain, T>) {
    if (x.innerStride() == 1) {
      write_chunk_rows(src, L, x.data() + i0 * x.outerStride(), Index(x.outerStride()), stream);
      return;
    }
  }
  x.middleRows(i0, L) = src.topRows(L);
}

/// Row stride of a state with n columns: one cache line longer when n fills whole 512-byte
/// multiples, since a stride of such a multiple would put a column block of the state into an
/// eighth of the L1 sets.
template <class T>
Index padded_state_stride(Index n) {
  constexpr Index line = 64 / static_cast<Index>(sizeof(T));
  return (n * static_cast<Index>(sizeof(T))) % 512 == 0 ? n + line : n;
}

/// The chunk length of a sweep over `rows` rows in chunks of `chunk`: at most rows, at least 1.
inline Index chunk_length(Index chunk, Index rows) {
  return std::min(chunk, std::max<Index>(rows, 1));
}

/// What a chunk sweep over T rows forms once (docs/math.md §2): the chunk length C (chunk, at most
/// T, at least 1), the score tile's row stride Cp (C in whole vectors of every instruction set),
/// the intra-chunk mask D_C zero-padded to Cp columns (its top-left L x L corner is D_L), the
/// query factors gamma^(j+1), the key factors gamma^(C-1-l) and gamma^C. start(L) readies the key
/// factors for a chunk of L rows and returns gamma^L (a short chunk may come first or last).
template <class T, class Mask>
struct ChunkSweep {
 private:
  struct Scratch {};                  // KeptMatrices' tag
  KeptMatrices<T, Scratch, 1> kept_;  // D's storage, kept by the thread (declared before D)

 public:
  const Mask& decay;
  Index C, Cp;
  Matrix<T>& D;
  Vector<T> qf, kf;
  T g_full;
  Index kf_rows;  ///< the chunk length kf holds the key factors of

  ChunkSweep(const Mask& mask, Index chunk, Index rows)
      : decay(mask),
        C(chunk_length(chunk, rows)),
        Cp(padded_columns(C)),
        D(kept_.zero_matrix(0, C, Cp)),
        qf(mask.template query_factors<T>(C)),
        kf(mask.template key_factors<T>(C)),
        g_full(static_cast<T>(mask.chunk_factor(C))),
        kf_rows(C) {
    mask.weights_into(0, 0, D.leftCols(C));
  }

  /// The score tile's row stride for chunks of C rows.
  static Index padded_columns(Index C) {
    return (C + simd::max_lanes<T> - 1) / simd::max_lanes<T> * simd::max_lanes<T>;
  }

  /// gamma^L; kf holds the key factors of a chunk of L rows afterwards.
  T start(Index L) {
    if (L != kf_rows) {
      kf = decay.template key_factors<T>(L);
      kf_rows = L;
    }
    return L == C ? g_full : static_cast<T>(decay.chunk_factor(L));
  }
};

/// One chunk's operands for the dispatched kernels below (pointers into the driver's buffers).
template <class T>
struct ChunkOperands {
  const T* q;  ///< [rows, dk], row stride ldq
  const T* k;  ///< [rows, dk] keys (row stride dk), transposed into kt by the score kernel
  T* kt;       ///< [dk, ld] K^T
  const T* d;  ///< [C, ld] intra-chunk mask
  T* a;        ///< [C, ld] score tile
  Index ld;    ///< a multiple of simd::max_lanes<T>
  /// When set, the outputs read the score tile entry (i, j) at a_view[i a_rs + j a_cs] instead of
  /// a[i ld + j] (the backward reads a tile of the dQ pass transposed and reversed in place).
  const T* a_view = nullptr;
  Index a_rs = 0, a_cs = 0;
  /// When set, the outputs' state term [rows, dv] (row stride ldo), formed elsewhere; s and qf are
  /// then not read by the outputs.
  const T* o_init = nullptr;
  const T* kw;    ///< [rows, dk] decayed keys
  const T* v;     ///< [rows, dv], row stride ldv
  T* s;           ///< [dk, dv] state, row stride lds
  const T* qf;    ///< query factors, or nullptr for a zero state
  const T* norm;  ///< output row scales, or nullptr
  T* o;           ///< [rows, dv] output, row stride ldo
  T* row_sum;     ///< score row sums, or nullptr
  Index ldq, ldv, lds, ldo, rows, dk, dv;
  T beta;                    ///< gamma^rows, the state's decay over the chunk
  bool zero_state;           ///< S starts at 0
  bool outputs;              ///< whether the column kernel writes the outputs too
  bool update_state = true;  ///< whether it updates S (the backward's dV pass only reads it)
};

/// K^T and the masked score tile of one chunk.
struct ChunkScoresKernel {
  template <class Isa, class T>
  static void run(const ChunkOperands<T>* c) {
    transpose_rows_isa<Isa>(c->k, c->dk, c->rows, c->dk, c->kt, c->ld);
    chunk_scores<Isa>(c->q, c->ldq, c->kt, c->d, c->a, c->ld, c->rows, c->dk, c->row_sum);
  }
};

/// Columns [j0, j0 + W NP) of one chunk's outputs.
template <int W, int NP>
struct ChunkOutputBlock {
  template <class Isa, class T>
  static void run(const ChunkOperands<T>* c, Index j0) {
    const bool view = c->a_view != nullptr;
    chunk_output_columns<Isa, W, NP>(c->q, c->ldq, c->s, c->lds, c->qf, view ? c->a_view : c->a,
                                     view ? c->a_rs : c->ld, view ? c->a_cs : Index(1), c->v,
                                     c->ldv, c->o_init, c->norm, c->o, c->ldo, c->rows, c->dk, j0);
  }
};

/// Columns [j0, j0 + W NP) of one chunk's state update.
template <int W, int NP>
struct ChunkStateBlock {
  template <class Isa, class T>
  static void run(const ChunkOperands<T>* c, Index j0) {
    chunk_state_columns<Isa, W, NP>(c->kw, c->dk, c->v, c->ldv, c->s, c->lds, c->beta,
                                    c->zero_state, c->rows, c->dk, j0);
  }
};

/// The outputs (when c->outputs) and the state update (when c->update_state) of one chunk, one
/// block of dv columns at a time, so each block of S is read from L2 once per chunk and reused from
/// L1. Each block kernel is a function of its own (simd::call).
struct ChunkColumnsKernel {
  template <class Isa, class T>
  static void run(const ChunkOperands<T>* c) {
    chunk_for_columns<T, Isa>(
        c->dv, [&](auto w_tag, auto np_tag, Index j0) __attribute__((always_inline)) {
          constexpr int W = decltype(w_tag)::value, NP = decltype(np_tag)::value;
          if (c->outputs) simd::call<Isa, ChunkOutputBlock<W, NP>>(c, j0);
          if (c->update_state) simd::call<Isa, ChunkStateBlock<W, NP>>(c, j0);
        });
  }
};

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
