// retention::detail: the recurrent backward pass (docs/math.md §7), a reverse-time recurrence.
// Token n with state S_n (after the token), raw row u_n = q_n S_n and score s_n = q_n . z_n:
//   dS_tot = dS + q_n^T Gu_n,  dz_tot = dz + q_n^T gs_n
//   dq_n = Gu_n S_n^T + gs_n z_n,  dk_n = v_n dS_tot^T + dz_tot,  dv_n = k_n dS_tot
//   dS <- gamma dS_tot,  dz <- gamma dz_tot            (dS = dL/dS_{n-1} afterwards)
// The states are needed in reverse order, and a decay cannot be undone by dividing (gamma^n may
// underflow, SPEC 1), so they are recomputed: a forward sweep stores a checkpoint every
// ceil(sqrt(T)) tokens, and each segment is recomputed from its checkpoint into a buffer of
// ceil(sqrt(T)) states before it is walked backwards. Two forward state sweeps in all, O(sqrt(T))
// states of memory.
#pragma once

#include <retention/detail/retention/backward_kernels.hpp>

#include <algorithm>
#include <cmath>

namespace retention {
namespace detail {

/// Tokens between two checkpoints of the recurrent backward: ceil(sqrt(T)), at least 1.
inline Index recurrent_backward_segment(Index T) {
  Index s = static_cast<Index>(std::sqrt(static_cast<double>(T)));
  while (s * s < T) ++s;
  return std::max<Index>(s, 1);
}

/// Recurrent backward of one head into dQ, dK [T, dk] and dV [T, dv]; the inputs are checked.
/// Extra memory: (ceil(T/s) + s) (dk dv + dk) values of Acc, s = ceil(sqrt(T)).
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class Acc>
void recurrent_backward(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                        const Eigen::MatrixBase<DV>& V, const Mask& decay,
                        const Eigen::MatrixBase<DG>& G, OQ&& dQ, OK&& dK, OV&& dV,
                        const BackwardArgs<Acc>& args) {
  using T = typename DQ::Scalar;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index p0 = args.start_position();
  const Normalization norm = args.normalization;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const Acc g = static_cast<Acc>(decay.step_factor());
  const Index seg = recurrent_backward_segment(T_len);
  const Index segments = (T_len + seg - 1) / seg;

  RowVector<Acc> q(dk), k(dk), v(dv), gr(dv), dq(dk), dkr(dk), dvr(dv);
  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  if (args.init) {
    S = args.init->S;
    z = args.init->z;
  }
  // Checkpoint i: the state before token i * seg.
  Matrix<Acc> check_S(segments * dk, dv), check_z(segments, dk);
  for (Index t = 0; t < T_len; ++t) {
    if (t % seg == 0) {
      check_S.middleRows((t / seg) * dk, dk) = S;
      check_z.row(t / seg) = z.transpose();
      if (t / seg == segments - 1) break;  // the last segment's states are recomputed anyway
    }
    k = K.row(t).template cast<Acc>();
    v = V.row(t).template cast<Acc>();
    S *= g;
    S.noalias() += k.transpose() * v;
    z = g * z + k.transpose();
  }

  Matrix<Acc> dS = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> dz = Vector<Acc>::Zero(dk);
  if (args.final_grad) {
    dS = args.final_grad->S;
    dz = args.final_grad->z;
  }
  Matrix<Acc> S_seg(seg * dk, dv), z_seg(seg, dk);
  RowVector<Acc> u(exact ? dv : 0);
  for (Index i = segments - 1; i >= 0; --i) {
    const Index t0 = i * seg, Ls = std::min(seg, T_len - t0);
    // The segment's states S_n (after token n), recomputed from its checkpoint.
    for (Index l = 0; l < Ls; ++l) {
      k = K.row(t0 + l).template cast<Acc>();
      v = V.row(t0 + l).template cast<Acc>();
      auto Sn = S_seg.middleRows(l * dk, dk);
      const auto Sprev =
          l == 0 ? check_S.middleRows(i * dk, dk) : S_seg.middleRows((l - 1) * dk, dk);
      Sn.noalias() = k.transpose() * v;
      Sn += g * Sprev;
      if (l == 0)
        z_seg.row(0) = g * check_z.row(i) + k;
      else
        z_seg.row(l) = g * z_seg.row(l - 1) + k;
    }
    for (Index l = Ls - 1; l >= 0; --l) {
      const Index t = t0 + l;
      const auto Sn = S_seg.middleRows(l * dk, dk);
      const auto zn = z_seg.row(l);
      q = Q.row(t).template cast<Acc>();
      k = K.row(t).template cast<Acc>();
      v = V.row(t).template cast<Acc>();
      gr = G.row(t).template cast<Acc>();
      double s = 0.0, gu = 0.0;
      if (score) s = static_cast<double>(q.dot(zn));
      if (exact) {
        u.noalias() = q * Sn;
        gu = static_cast<double>(gr.dot(u));
      }
      const BackwardRowFactors f =
          backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + t, s, gu);
      gr *= static_cast<Acc>(f.a);
      const Acc gsn = static_cast<Acc>(f.gs);
      // One pass over the rows of S_n and dS.
      dvr.setZero();
      for (Index r = 0; r < dk; ++r) {
        auto dSr = dS.row(r);
        dq(r) = Sn.row(r).dot(gr) + gsn * zn(r);
        dSr += q(r) * gr;
        const Acc dz_tot = dz(r) + q(r) * gsn;
        dkr(r) = dSr.dot(v) + dz_tot;
        dvr += k(r) * dSr;
        dSr *= g;
        dz(r) = g * dz_tot;
      }
      dQ.row(t) = dq.template cast<T>();
      dK.row(t) = dkr.template cast<T>();
      dV.row(t) = dvr.template cast<T>();
    }
  }

  if (args.d_init) {
    args.d_init->S = std::move(dS);
    args.d_init->z = std::move(dz);
    args.d_init->position = p0;
  }
}

}  // namespace detail
}  // namespace retention
