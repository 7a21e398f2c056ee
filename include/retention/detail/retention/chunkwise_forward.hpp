// retention::detail: the chunkwise form's one-head kernels (docs/math.md §2) on the
// register-blocked chunk kernels; chunkwise.hpp is their public front.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/chunk_kernels.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/threading.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace retention {
namespace detail {

/// KeptMatrices' tag for chunkwise_same_type's chunk buffers and state.
struct ChunkwiseSweepScratch {};

/// Chunkwise retention with the state in the inputs' own type, on the register-blocked kernels of
/// chunk_kernels.hpp. Per chunk: K_i^T and K~_i = diag(gamma^(L-1-l)) K_i are formed once; the
/// masked score tile A = Q_i K_i^T (.) D_L (lower triangle only); then, one block of dv columns at
/// a time, O_i = norm (.) (diag(gamma^(j+1)) Q_i S_prev + A V_i) and S_next = gamma^L S_prev +
/// K~_i^T V_i on the same columns, so each block of S is read from L2 once per chunk and reused
/// from L1. tiles, if set, is a zero-filled [T, Cp] buffer (Cp = ChunkSweep::Cp) that keeps every
/// chunk's masked score tile: the chunk at row i0 writes rows [i0, i0 + L), its lower triangle
/// exactly and nothing but zeros above it (the backward reuses them).
template <class DQ, class DK, class DV, class DOut, class Mask, class T>
void chunkwise_same_type(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                         const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk, DOut& out,
                         Normalization normalization, Index p0, const RetentionState<T>* init,
                         RetentionState<T>* final_state, T* tiles = nullptr) {
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  ChunkSweep<T, Mask> sweep(decay, chunk, T_len);
  const Index C = sweep.C, Cp = sweep.Cp;
  const bool score = normalization == Normalization::decay_and_score;
  const bool normalize = normalization != Normalization::none;

  // The chunk's rows are copied into contiguous buffers (and the output goes through one): in the
  // multi-head layout [B, T, H, D] consecutive token rows of a head are H D elements apart, 4 KiB
  // for 8 heads of 128 floats, so that the rows of one chunk all fall into the same few sets of the
  // L1 cache and evict each other while the kernels sweep over them.
  KeptMatrices<T, ChunkwiseSweepScratch, 8, 3> kept;
  Matrix<T>& Qc = kept.matrix(0, C, dk);
  Matrix<T>& Kc = kept.matrix(1, C, dk);
  Matrix<T>& Vc = kept.matrix(2, C, dv);
  Matrix<T>& Oc = kept.matrix(3, C, dv);
  // Kt and A start at zero: the kernels read a few entries they never write (keys beyond a short
  // last chunk, scores above the diagonal), and those must be finite so that D = 0 zeroes them.
  Matrix<T>& Kt = kept.zero_matrix(4, dk, Cp);
  T* const A_own = tiles ? nullptr : kept.zero_matrix(5, C, Cp).data();
  Matrix<T>& Kw = kept.matrix(6, C, dk);
  const Index lds = padded_state_stride<T>(dv);
  auto S = kept.matrix(7, dk, lds).leftCols(dv);
  Vector<T>& z = kept.vector(0, dk);
  Vector<T>& r = kept.vector(1, C);
  Vector<T>& norm = kept.vector(2, C);
  bool state_nonzero = init != nullptr;
  if (init) {
    S = init->S;
    z = init->z;
  } else {
    S.setZero();
    z.setZero();
  }

  const Matrix<T>& D = sweep.D;
  const Vector<T>& qf = sweep.qf;
  const Vector<T>& kf = sweep.kf;
  // A large output is written past the caches: its lines are not read in before being overwritten.
  const bool stream_out = streams_chunk_rows<T>(out);

  for (Index i0 = 0; i0 < T_len; i0 += C) {
    const Index L = std::min(C, T_len - i0);
    const T gL = sweep.start(L);
    Eigen::Map<Matrix<T>> A(tiles ? tiles + i0 * Cp : A_own, L, Cp);
    gather_chunk_rows(Q, i0, L, Qc);
    gather_chunk_rows(K, i0, L, Kc);
    gather_chunk_rows(V, i0, L, Vc);
    ChunkOperands<T> ops;
    ops.q = Qc.data();
    ops.k = Kc.data();
    ops.kt = Kt.data();
    ops.d = D.data();
    ops.a = A.data();
    ops.ld = Cp;
    ops.kw = Kw.data();
    ops.v = Vc.data();
    ops.s = S.data();
    ops.o = Oc.data();
    ops.row_sum = score ? r.data() : nullptr;
    ops.ldq = dk;
    ops.ldv = dv;
    ops.lds = lds;
    ops.ldo = dv;
    ops.rows = L;
    ops.dk = dk;
    ops.dv = dv;

    // Row j of the chunk may see keys and values up to j only. The kernels mask by multiplying
    // (0 x Inf = NaN) and a row block reads a few values past its rows, so a chunk whose keys or
    // values hold an Inf or NaN (an O(L d) scan of rows already in L1) takes an exact path that
    // never reads past the diagonal.
    const bool safe = has_nonfinite(Kc.topRows(L)) || has_nonfinite(Vc.topRows(L));
    Kw.topRows(L).noalias() = kf.head(L).asDiagonal() * Kc.topRows(L);
    if (!safe) {
      simd::dispatch<ChunkScoresKernel>(static_cast<const ChunkOperands<T>*>(&ops));
    } else {
      for (Index j = 0; j < L; ++j) {
        auto a = A.row(j).head(j + 1);
        a.noalias() = Qc.row(j) * Kc.topRows(j + 1).transpose();
        a.array() *= D.row(j).head(j + 1).array();
        r(j) = a.sum();
      }
    }

    if (normalize) {
      if (score && state_nonzero) {
        r.head(L).array() += qf.head(L).array() * (Qc.topRows(L) * z).array();
      }
      // As normalize_rows: 1 / sqrt(sum_{i<=p} gamma^i), further / max(|r| / sqrt(..), 1).
      for (Index j = 0; j < L; ++j) {
        const double s = std::sqrt(decay.decay_sum(p0 + i0 + j));
        double scale = 1.0 / s;
        if (score) scale /= std::max(std::abs(static_cast<double>(r(j))) / s, 1.0);
        norm(j) = static_cast<T>(scale);
      }
    }

    ops.qf = state_nonzero ? qf.data() : nullptr;
    ops.norm = normalize ? norm.data() : nullptr;
    ops.beta = gL;
    ops.zero_state = !state_nonzero;
    ops.outputs = !safe;
    if (safe) {
      // Output rows first (they read the state before this chunk), each from its own prefix.
      for (Index j = 0; j < L; ++j) {
        auto oj = Oc.row(j);
        oj.noalias() = A.row(j).head(j + 1) * Vc.topRows(j + 1);
        if (state_nonzero) oj.noalias() += qf(j) * (Qc.row(j) * S);
        if (normalize) oj *= norm(j);
      }
    }
    simd::dispatch<ChunkColumnsKernel>(static_cast<const ChunkOperands<T>*>(&ops));
    if (state_nonzero)
      z = gL * z + Kw.topRows(L).colwise().sum().transpose();
    else
      z = Kw.topRows(L).colwise().sum().transpose();
    scatter_chunk_rows(Oc, i0, L, out, stream_out);
    state_nonzero = true;
  }
  if (stream_out) simd::stream_fence();

  if (final_state) {
    store_state(*final_state, S, z);
    final_state->position = p0 + T_len;
  }
}

/// Chunkwise retention with a wider state than the inputs (e.g. double state, float inputs): the
/// state products run in the state's type.
template <class DQ, class DK, class DV, class DOut, class Mask, class Acc>
void chunkwise_wide_state(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                          const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk, DOut& out,
                          Normalization normalization, Index p0, const RetentionState<Acc>* init,
                          RetentionState<Acc>* final_state) {
  using T = typename DQ::Scalar;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  bool state_nonzero = false;
  if (init) {
    S = init->S;
    z = init->z;
    state_nonzero = true;
  }
  const Index C = chunk_length(chunk, T_len);
  const Matrix<T> D = decay.template weights<T>(0, C, 0, C);
  const Vector<Acc> qf = decay.template query_factors<Acc>(C);
  Vector<Acc> kf = decay.template key_factors<Acc>(C);
  const Acc gC = static_cast<Acc>(decay.chunk_factor(C));

  Matrix<T> A(C, C);
  Matrix<Acc> Qa(C, dk), Ka(C, dk), Va(C, dv), inter(C, dv);
  Vector<T> r(C);
  for (Index i0 = 0; i0 < T_len; i0 += C) {
    const Index L = std::min(C, T_len - i0);
    if (L != C) kf = decay.template key_factors<Acc>(L);
    const Acc gL = L == C ? gC : static_cast<Acc>(decay.chunk_factor(L));
    const auto Qi = Q.middleRows(i0, L);
    const auto Ki = K.middleRows(i0, L);
    const auto Vi = V.middleRows(i0, L);
    auto Oi = out.middleRows(i0, L);
    auto Ai = A.topLeftCorner(L, L);
    Ai.noalias() = Qi * Ki.transpose();
    // As in chunkwise_same_type: a chunk with a non-finite key or value must not multiply it by
    // the mask's zeros; its masked scores are set to 0 and each output row reads its own prefix.
    const bool safe = has_nonfinite(Ki) || has_nonfinite(Vi);
    if (safe) Ai.template triangularView<Eigen::StrictlyUpper>().setZero();
    Ai.array() *= D.topLeftCorner(L, L).array();
    if (!safe) {
      Oi.noalias() = Ai * Vi;
    } else {
      for (Index j = 0; j < L; ++j) Oi.row(j).noalias() = Ai.row(j).head(j + 1) * Vi.topRows(j + 1);
    }
    r.head(L) = Ai.rowwise().sum();
    if (state_nonzero) {
      auto Qs = Qa.topRows(L);
      Qs.noalias() = qf.head(L).asDiagonal() * Qi.template cast<Acc>();
      auto In = inter.topRows(L);
      In.noalias() = Qs * S;
      Oi += In.template cast<T>();
      r.head(L) += (Qs * z).template cast<T>();
    }
    normalize_rows(decay, normalization, p0 + i0, Oi, r.head(L));
    auto Kwi = Ka.topRows(L);
    Kwi.noalias() = kf.head(L).asDiagonal() * Ki.template cast<Acc>();
    auto Vai = Va.topRows(L);
    Vai = Vi.template cast<Acc>();
    if (state_nonzero) {
      S *= gL;
      z *= gL;
    }
    S.noalias() += Kwi.transpose() * Vai;
    z.noalias() += Kwi.colwise().sum().transpose();
    state_nonzero = true;
  }
  if (final_state) {
    final_state->S = std::move(S);
    final_state->z = std::move(z);
    final_state->position = p0 + T_len;
  }
}

template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void chunkwise_retention_rows(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk,
                              DOut& out, const RetentionOptions<StateScalar>& options) {
  using T = typename DQ::Scalar;
  const RetentionState<StateScalar>* init = options.initial_state;
  const SerialEigenScope serial_products;  // threads belong over heads, not small chunks
  const Index p0 = init ? init->position : 0;
  // Both paths read the initial state before writing the final one, so they may alias.
  if constexpr (std::is_same<T, StateScalar>::value) {
    chunkwise_same_type(Q, K, V, decay, chunk, out, options.normalization, p0, init,
                        options.final_state);
  } else {
    chunkwise_wide_state(Q, K, V, decay, chunk, out, options.normalization, p0, init,
                         options.final_state);
  }
}

/// chunkwise_retention_rows on the kernels' operand type (forward_on_rows).
template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void chunkwise_retention_impl(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk,
                              DOut& out, const RetentionOptions<StateScalar>& options) {
  forward_on_rows(Q, K, V, out, [&](const auto& q, const auto& k, const auto& v, auto& o) {
    chunkwise_retention_rows(q, k, v, decay, chunk, o, options);
  });
}

}  // namespace detail
}  // namespace retention
