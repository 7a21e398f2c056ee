// retention::detail: the chunkwise backward of a CausalDecay head as three retentions run by the
// forward chunkwise kernels (docs/math.md §7.1, §7.4). With Gu = diag(c / mu) G (G itself for
// normalisation none) and beta the score path's dL/ds (backward_kernels.hpp):
//   dQ_n = sum_{m <= n} gamma^(n-m) (Gu_n . V_m) K_m + gamma^(n+1) Gu_n S_init^T + beta_n z_n^T
//   dK_m = sum_{n >= m} gamma^(n-m) (V_m . Gu_n) Q_n + gamma^(T-1-m) V_m dS_final^T + w_m
//   dV_m = sum_{n >= m} gamma^(n-m) (K_m . Q_n) Gu_n + gamma^(T-1-m) K_m dS_final
// with w_m = sum_{n >= m} gamma^(n-m) beta_n q_n + gamma^(T-1-m) dz_final. The first terms are
// causal retentions: queries Gu, keys V, values K from S_init^T; and, in reversed time (m' =
// T-1-m; the weight gamma^(n-m) depends on the distance only, so the reversed problem has the same
// mask), queries V, keys Gu, values Q, and queries K, keys Q, values Gu. These two share one state
// up to a transpose and run as one sweep (chunkwise_reversed_pair). A reversed row m' sees an
// initial state with weight gamma^(m'+1), so dS_final / gamma as initial state gives the
// gamma^(T-1-m) dS_final terms, and gamma times the dK retention's final state is dS_init^T
// (sum_n gamma^(n+1) Q_n^T Gu_n + gamma^T dS_final). Small gammas, where 1 / gamma could
// overflow, add those terms row by row instead (gamma^(T-1-m) dies out within a few hundred rows
// there). The score path's pieces are O(T dk) recurrences in double: z_n (forward) gives s_n =
// q_n . z_n and the beta_n z_n^T rows, w_m (backward) the w rows and dz_init = gamma w_0. The row
// factors need u_n: one forward retention of Q, K, V from S_init (normalisation none), written
// into dV, which the dV retention overwrites last. Nothing of size T x d is allocated: the
// reversed sweep gathers its chunks in reverse order, Gu is a lazy row scaling of G.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/backward_kernels.hpp>
#include <retention/detail/retention/chunk_kernels.hpp>
#include <retention/detail/retention/chunkwise_forward.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {
namespace detail {

/// Largest gamma whose final-state terms are added row by row instead of through dS_final / gamma.
constexpr double backward_divide_min_gamma = 0.5;

/// Rows first + L - 1 down to first of x into dst's first L rows: a chunk of a reversed sweep,
/// gathered as gather_chunk_rows does (a negative row stride for CopyRowsKernel).
template <class T, class Derived>
void gather_chunk_rows_reversed(const Eigen::MatrixBase<Derived>& x, Index first, Index L,
                                Matrix<T>& dst) {
  if constexpr (chunk_rows_direct<Derived, T>) {
    const Derived& d = x.derived();
    if (d.innerStride() == 1) {
      const Index os = d.outerStride();
      simd::dispatch<CopyRowsKernel>(d.data() + (first + L - 1) * os, -os, L, Index(d.cols()),
                                     dst.data(), Index(dst.cols()));
      return;
    }
  }
  dst.topRows(L) = x.middleRows(first, L).colwise().reverse();
}

/// x's rows first + L - 1 down to first = src's first L rows (inverse of
/// gather_chunk_rows_reversed); with `stream` as scatter_chunk_rows.
template <class T, class Derived>
void scatter_chunk_rows_reversed(const Matrix<T>& src, Index first, Index L, Derived& x,
                                 bool stream = false) {
  using Plain = std::decay_t<Derived>;
  if constexpr (chunk_rows_direct<Plain, T>) {
    if (x.innerStride() == 1) {
      const Index os = x.outerStride();
      write_chunk_rows(src, L, x.data() + (first + L - 1) * os, -os, stream);
      return;
    }
  }
  x.middleRows(first, L).colwise().reverse() = src.topRows(L);
}

/// The operands of ReversedStateTermKernel.
template <class T>
struct StateTermOperands {
  const T* k;   ///< [rows, dk] the chunk's keys K_i (row stride dk)
  T* kt;        ///< [dk, ld] K_i^T, zero beyond column rows
  const T* r;   ///< [dv, dk] the state R (row stride ldr)
  const T* qf;  ///< [ld] query factors, zero beyond rows
  T* pt;        ///< [dv, ld] R K_i^T diag(qf)
  T* p;         ///< [rows, dv] its transpose
  Index rows, dk, dv, ld, ldr;
};

/// The dV retention's state term P = diag(qf) K_i R^T of one reversed chunk, formed transposed as
/// R K_i^T diag(qf) and transposed back: the two transposes (K_i and the [dv, rows] product) move
/// rows (dk + dv) numbers, against the dv dk of transposing R itself once a chunk.
struct ReversedStateTermKernel {
  template <class Isa, class T>
  static void run(const StateTermOperands<T>* c) {
    transpose_rows_isa<Isa>(c->k, c->dk, c->rows, c->dk, c->kt, c->ld);
    chunk_for_columns<T, Isa>(
        c->ld, [&](auto w_tag, auto np_tag, Index j0) __attribute__((always_inline)) {
          constexpr int W = decltype(w_tag)::value, NP = decltype(np_tag)::value;
          chunk_for_rows<T, Isa>(
              c->dv, [&](auto r_tag, Index v0) __attribute__((always_inline)) {
                constexpr int R = decltype(r_tag)::value;
                simd::Block<T, W, R, NP> acc;
                acc.set_zero();
                acc.madd(c->r + v0 * c->ldr, c->ldr, 1, c->kt + j0, c->ld, c->dk);
                acc.scale_columns(c->qf + j0);
                acc.store(c->pt + v0 * c->ld + j0, c->ld);
              });
        });
    transpose_rows_isa<Isa>(c->pt, c->ld, c->dv, c->rows, c->p, c->dv);
  }
};

/// ReversedStateTermKernel's buffers for the chunks of one sweep (dk, dv, the sweep's C, Cp and
/// query factors), and its call.
template <class T>
class ReversedStateTerm {
  struct Scratch {};  // KeptMatrices' tag

 public:
  ReversedStateTerm(Index dk, Index dv, Index C, Index Cp, const Vector<T>& qf)
      : kt_(kept_.zero_matrix(0, dk, Cp)),
        pt_(kept_.matrix(1, dv, Cp)),
        p_(kept_.matrix(2, C, dv)),
        qf_(kept_.vector(0, Cp)) {
    qf_.setZero();
    qf_.head(C) = qf;
  }

  /// P [rows, dv] (row stride dv) for the keys k [rows, dk] (row stride dk) of a chunk of rows <=
  /// C and the state r [dv, dk] (row stride ldr).
  const T* form(const T* k, Index rows, const T* r, Index ldr) {
    StateTermOperands<T> t;
    t.k = k;
    t.kt = kt_.data();
    t.r = r;
    t.qf = qf_.data();
    t.pt = pt_.data();
    t.p = p_.data();
    t.rows = rows;
    t.dk = Index(kt_.rows());
    t.dv = Index(pt_.rows());
    t.ld = Index(kt_.cols());
    t.ldr = ldr;
    simd::dispatch<ReversedStateTermKernel>(static_cast<const StateTermOperands<T>*>(&t));
    return p_.data();
  }

 private:
  KeptMatrices<T, Scratch, 3, 1> kept_;  // declared first: the references below point into it
  Matrix<T>& kt_;                        // K_i^T (zero beyond a short chunk's columns)
  Matrix<T>& pt_;                        // R K_i^T diag(qf)
  Matrix<T>& p_;                         // P
  Vector<T>& qf_;                        // the query factors, zero beyond C
};

/// KeptMatrices' tag for chunkwise_reversed_pair's chunk buffers and state.
struct ReversedPairScratch {};

/// The dK and dV retentions of chunkwise_backward_by_retention in one sweep. Both run in reversed
/// time (row m' = T-1-m) on the same chunks, and the dV retention's state (keys Q, values Gu) is
/// the transpose of the dK retention's (keys Gu, values Q), so one state R [dv, dk] serves both
/// and is updated once per chunk instead of twice (the dV retention's state term comes from
/// ReversedStateTermKernel). V, Gu, Q, K and the outputs dK, dV are in
/// time order; chunks are gathered reversed, on the grid of a forward sweep (the chunk holding
/// the last row, possibly short, comes first). R starts at *init_R (nullptr: zero); final_R, if
/// set, receives R after the last chunk. tiles, if set, holds the dQ pass's score tiles
/// (chunkwise_same_type's tiles over queries Gu and keys V): the dK retention's tile V_i Gu_j^T in
/// reversed time is that tile transposed and reversed in both indices, read in place instead of
/// computed again. A chunk whose keys or values (Gu, Q) hold an Inf or NaN takes the exact path of
/// chunkwise_same_type: its products never read past the diagonal.
template <class T, class DV, class DG, class DQ, class DK, class OK, class OV>
void chunkwise_reversed_pair(const Eigen::MatrixBase<DV>& V, const Eigen::MatrixBase<DG>& Gu,
                             const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                             const CausalDecay& decay, Index chunk, OK& dK, OV& dV,
                             const Matrix<T>* init_R, Matrix<T>* final_R,
                             const T* tiles = nullptr) {
  const Index T_len = V.rows(), dk = Q.cols(), dv = V.cols();
  ChunkSweep<T, CausalDecay> sweep(decay, chunk, T_len);
  const Index C = sweep.C, Cp = sweep.Cp;
  KeptMatrices<T, ReversedPairScratch, 12> kept;
  Matrix<T>& Vc = kept.matrix(0, C, dv);
  Matrix<T>& Gc = kept.matrix(1, C, dv);
  Matrix<T>& Qc = kept.matrix(2, C, dk);
  Matrix<T>& Kc = kept.matrix(3, C, dk);
  Matrix<T>& Ok = kept.matrix(4, C, dk);
  Matrix<T>& Ov = kept.matrix(5, C, dv);
  Matrix<T>& Gw = kept.matrix(6, C, dv);
  // Transposed keys and score tiles start at zero: the kernels read entries they never write.
  Matrix<T>& Gt = kept.zero_matrix(7, dv, Cp);
  Matrix<T>& Qt = kept.zero_matrix(8, dk, Cp);
  Matrix<T>& A1 = kept.zero_matrix(9, C, Cp);
  Matrix<T>& A2 = kept.zero_matrix(10, C, Cp);
  const Index ldr = padded_state_stride<T>(dk);
  auto R = kept.matrix(11, dv, ldr).leftCols(dk);
  ReversedStateTerm<T> state_term(dk, dv, C, Cp, sweep.qf);
  bool state_nonzero = init_R != nullptr;
  if (init_R)
    R = *init_R;
  else
    R.setZero();

  const Matrix<T>& D = sweep.D;
  const Vector<T>& qf = sweep.qf;
  const Vector<T>& kf = sweep.kf;
  // Large gradients are written past the caches, as chunkwise_same_type's output.
  const bool stream_k = streams_chunk_rows<T>(dK), stream_v = streams_chunk_rows<T>(dV);

  for (Index first = (T_len - 1) / C * C; first >= 0; first -= C) {
    const Index L = std::min(C, T_len - first);  // rows [first, first + L) in time order
    const T gL = sweep.start(L);
    gather_chunk_rows_reversed(V, first, L, Vc);
    gather_chunk_rows_reversed(Gu, first, L, Gc);
    gather_chunk_rows_reversed(Q, first, L, Qc);
    gather_chunk_rows_reversed(K, first, L, Kc);
    Gw.topRows(L).noalias() = kf.head(L).asDiagonal() * Gc.topRows(L);
    const bool safe = has_nonfinite(Gc.topRows(L)) || has_nonfinite(Qc.topRows(L));
    // The dV retention's state term diag(qf) K_i R^T, from R before this chunk's update.
    const T* P = state_nonzero && !safe ? state_term.form(Kc.data(), L, R.data(), ldr) : nullptr;

    // dV: queries K, keys Q, values Gu, state R^T (read only, through its state term P).
    ChunkOperands<T> v;
    v.q = Kc.data();
    v.k = Qc.data();
    v.kt = Qt.data();
    v.d = D.data();
    v.a = A2.data();
    v.ld = Cp;
    v.kw = nullptr;
    v.v = Gc.data();
    v.s = nullptr;
    v.qf = nullptr;
    v.o_init = P;
    v.norm = nullptr;
    v.o = Ov.data();
    v.row_sum = nullptr;
    v.ldq = dk;
    v.ldv = dv;
    v.lds = 0;
    v.ldo = dv;
    v.rows = L;
    v.dk = dk;
    v.dv = dv;
    v.beta = gL;
    v.zero_state = !state_nonzero;
    v.outputs = true;
    v.update_state = false;
    // dK: queries V, keys Gu, values Q, state R (read, then updated).
    ChunkOperands<T> k = v;
    k.q = Vc.data();
    k.k = Gc.data();
    k.kt = Gt.data();
    k.a = A1.data();
    k.kw = Gw.data();
    k.v = Qc.data();
    k.s = R.data();
    k.qf = state_nonzero ? qf.data() : nullptr;
    k.o_init = nullptr;
    k.o = Ok.data();
    k.ldq = dv;
    k.ldv = dk;
    k.lds = ldr;
    k.ldo = dk;
    k.dk = dv;
    k.dv = dk;
    k.update_state = true;
    if (!safe) {
      simd::dispatch<ChunkScoresKernel>(static_cast<const ChunkOperands<T>*>(&v));
      simd::dispatch<ChunkColumnsKernel>(static_cast<const ChunkOperands<T>*>(&v));
      if (tiles) {
        // Reversed row i is time row first + L - 1 - i: entry (i, j) is the dQ tile's entry
        // (L - 1 - j, L - 1 - i), zero where j > i.
        k.a_view = tiles + (first + L - 1) * Cp + (L - 1);
        k.a_rs = -1;
        k.a_cs = -Cp;
      } else {
        simd::dispatch<ChunkScoresKernel>(static_cast<const ChunkOperands<T>*>(&k));
      }
    } else {
      // Row j from its own prefix only, the state read before the update below.
      for (Index j = 0; j < L; ++j) {
        auto a2 = A2.row(j).head(j + 1);
        a2.noalias() = Kc.row(j) * Qc.topRows(j + 1).transpose();
        a2.array() *= D.row(j).head(j + 1).array();
        auto ov = Ov.row(j);
        ov.noalias() = a2 * Gc.topRows(j + 1);
        if (state_nonzero) ov.noalias() += qf(j) * (Kc.row(j) * R.transpose());
        auto a1 = A1.row(j).head(j + 1);
        a1.noalias() = Vc.row(j) * Gc.topRows(j + 1).transpose();
        a1.array() *= D.row(j).head(j + 1).array();
        auto ok = Ok.row(j);
        ok.noalias() = a1 * Qc.topRows(j + 1);
        if (state_nonzero) ok.noalias() += qf(j) * (Vc.row(j) * R);
      }
      k.outputs = false;
    }
    simd::dispatch<ChunkColumnsKernel>(static_cast<const ChunkOperands<T>*>(&k));

    scatter_chunk_rows_reversed(Ok, first, L, dK, stream_k);
    scatter_chunk_rows_reversed(Ov, first, L, dV, stream_v);
    state_nonzero = true;
  }
  if (stream_k || stream_v) simd::stream_fence();
  if (final_R) *final_R = R;
}

/// ThreadScratch's tag for the score tiles of chunkwise_backward_by_retention, and KeptMatrices'
/// for its states.
struct BackwardTileScratch {};
struct BackwardStateScratch {};

/// Chunkwise backward of one CausalDecay head (state in the inputs' type) into dQ, dK [T, dk] and
/// dV [T, dv], T >= 1; the inputs are checked. Extra memory O(T + dk dv) besides the forward
/// kernels' chunk buffers, and T Cp for the score tiles when 4 Cp <= min(dk, dv) (a buffer the
/// thread keeps for its next call, ThreadScratch).
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class T>
void chunkwise_backward_by_retention(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                     const Eigen::MatrixBase<DV>& V, const CausalDecay& decay,
                                     Index chunk, const Eigen::MatrixBase<DG>& G, OQ& dQ, OK& dK,
                                     OV& dV, const BackwardArgs<T>& args) {
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Normalization norm = args.normalization;
  const bool normalize = norm != Normalization::none;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const RetentionState<T>* init = args.init;
  const RetentionState<T>* fgrad = args.final_grad;
  const Index p0 = args.start_position();
  const double gamma = decay.gamma();
  const bool divide = gamma > backward_divide_min_gamma;
  RetentionState<T>* const no_state = nullptr;  // typed: chunkwise_same_type deduces T from it

  // z_n = gamma z_{n-1} + k_n^T from z_init, in double; calls row(n, z_n) for n = 0..T-1.
  auto z_sweep = [&](auto&& row) {
    Vector<double> z =
        init ? Vector<double>(init->z.template cast<double>()) : Vector<double>::Zero(dk);
    for (Index n = 0; n < T_len; ++n) {
      z = gamma * z + K.row(n).transpose().template cast<double>();
      row(n, z);
    }
  };

  // Row factors: Gu_n = a_n G_n, beta_n (exact score path only).
  Vector<T> a(normalize ? T_len : 0), beta = Vector<T>::Zero(exact ? T_len : 0);
  if (normalize) {
    Vector<double> s = Vector<double>::Zero(T_len);
    if (score)
      z_sweep([&](Index n, const Vector<double>& z) {
        s(n) = Q.row(n).template cast<double>().dot(z.transpose());
      });
    if (exact) {
      // u_n = q_n S_n into dV, which the dV retention below overwrites.
      chunkwise_same_type(Q, K, V, decay, chunk, dV, Normalization::none, 0, init, no_state);
    }
    for (Index n = 0; n < T_len; ++n) {
      const double gu = exact ? static_cast<double>(G.row(n).dot(dV.row(n))) : 0.0;
      const BackwardRowFactors f =
          backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + n, s(n), gu);
      a(n) = static_cast<T>(f.a);
      if (exact) beta(n) = static_cast<T>(f.gs);
    }
  }

  // dS_final^T / gamma as the reversed sweep's initial state R.
  const bool divided = fgrad != nullptr && divide;
  KeptMatrices<T, BackwardStateScratch, 4> kept;
  Matrix<T>* const init_R = divided ? &kept.matrix(0, dv, dk) : nullptr;
  if (divided) init_R->noalias() = static_cast<T>(1.0 / gamma) * fgrad->S.transpose();
  Matrix<T>* const final_R = args.d_init ? &kept.matrix(1, dv, dk) : nullptr;

  // The dQ pass keeps its score tiles for the dK retention when a tile row (Cp entries) is at
  // most a quarter of a head's row: one scores kernel less a chunk for T Cp floats of memory
  // (bench/results/backward-ratio.md), at most (T / C) dk dv / 16.
  const Index Cp = ChunkSweep<T, CausalDecay>::padded_columns(chunk_length(chunk, T_len));
  const bool keep_tiles = 4 * Cp <= std::min(dk, dv);
  const ThreadScratch<T, BackwardTileScratch> tiles(keep_tiles ? T_len * Cp : 0);
  T* const tile_data = keep_tiles ? tiles.data() : nullptr;
  if (keep_tiles) std::fill_n(tile_data, T_len * Cp, T(0));

  auto run = [&](const auto& Gu) {
    RetentionState<T> init_q;
    Matrix<T>* const init_slot = init ? &kept.matrix(2, dv, dk) : nullptr;
    if (init) {
      init_q.S.swap(*init_slot);  // the slot's storage, handed back after the dQ pass
      init_q.S.noalias() = init->S.transpose();
      init_q.z = Vector<T>::Zero(dv);
    }
    chunkwise_same_type(Gu, V, K, decay, chunk, dQ, Normalization::none, 0,
                        init ? &init_q : nullptr, no_state, tile_data);
    if (init) init_q.S.swap(*init_slot);
    chunkwise_reversed_pair<T>(V, Gu, Q, K, decay, chunk, dK, dV, init_R, final_R, tile_data);
  };
  if (normalize)
    run(a.asDiagonal() * G);
  else
    run(G);

  if (exact)
    z_sweep([&](Index n, const Vector<double>& z) {
      dQ.row(n) += (static_cast<double>(beta(n)) * z.transpose()).template cast<T>();
    });
  // w_m, last row first; dz_init = gamma w_0.
  Vector<double> w = Vector<double>::Zero(dk);
  if (exact || fgrad) {
    if (fgrad) w = fgrad->z.template cast<double>();
    for (Index m = T_len - 1; m >= 0; --m) {
      if (m < T_len - 1) w *= gamma;
      if (exact) w += static_cast<double>(beta(m)) * Q.row(m).transpose().template cast<double>();
      dK.row(m) += w.transpose().template cast<T>();
    }
  }
  if (fgrad && !divide) {
    // gamma^(T-1-m) (V_m dS_final^T, K_m dS_final), from the last row back while the factor is
    // nonzero.
    for (Index m = T_len - 1; m >= 0; --m) {
      const T f = static_cast<T>(decay.chunk_factor(T_len - 1 - m));
      if (f == T(0)) break;
      dK.row(m).noalias() += f * (V.row(m) * fgrad->S.transpose());
      dV.row(m).noalias() += f * (K.row(m) * fgrad->S);
    }
  }

  if (args.d_init) {
    const T g = static_cast<T>(gamma);
    Matrix<T>& dS = kept.matrix(3, dk, dv);
    dS.noalias() = g * final_R->transpose();
    Vector<T> dz = (gamma * w).template cast<T>();
    if (fgrad && !divide) dS += static_cast<T>(decay.chunk_factor(T_len)) * fgrad->S;
    store_state(*args.d_init, dS, dz);
    args.d_init->position = p0;
  }
}

}  // namespace detail
}  // namespace retention
