// retention::detail: the row step shared by MaSA's careful forward and backward (docs/math.md
// §2.6).
#pragma once

#include <retention/core.hpp>

#include <cmath>
#include <cstddef>
#include <limits>

namespace retention {
namespace detail {

/// The unmasked logits of query row n: for each key m < keys whose log_weight(n, m) is > -inf,
/// logit[i] = log_weight(n, m) + q_n . k_m and key[i] = m, in key order; a masked key is skipped
/// (never -inf + q.k). qd [rows, dk] and kd [keys, dk] in double. Returns how many were written
/// and sets mx to their max (NaN once any logit is NaN; -inf when none).
template <class Rows, class LogWeight>
std::size_t careful_row_logits(const Rows& qd, const Rows& kd, Index n, Index keys,
                               const LogWeight& log_weight, double* logit, Index* key, double& mx) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::size_t seen = 0;
  mx = neg_inf;
  for (Index m = 0; m < keys; ++m) {
    const double w = static_cast<double>(log_weight(n, m));
    if (w == neg_inf) continue;
    const double l = w + qd.row(n).dot(kd.row(m));
    logit[seen] = l;
    key[seen++] = m;
    if (std::isnan(l) || l > mx) mx = l;  // once NaN, l > mx is false: mx stays NaN
  }
  return seen;
}

}  // namespace detail
}  // namespace retention
