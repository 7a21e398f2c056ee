// Runs the README's "Training" example (its second ```cpp block, compiled beside this file): one
// SGD step on Q with the gradient of L = sum(W .* O). The step must match the gradient of the
// loss measured independently by central finite differences of the forward pass in double
// (first-order change L(Q - lr g) - L(Q) = -lr |g|^2), and decrease the loss.
#include <retention/retention.hpp>

#include <cmath>
#include <cstdio>
#include <random>

void train_step(retention::Matrix<float>& Q, const retention::Matrix<float>& K,
                const retention::Matrix<float>& V, const retention::Matrix<float>& W);

namespace {

using retention::Index;

template <class T>
retention::Matrix<T> random_matrix(Index r, Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  retention::Matrix<T> m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(n(rng));
  return m;
}

// L(Q) = sum(W .* O(Q)) in double, the forward of the README example (chunk 64, decay norm).
double loss(const retention::Matrix<double>& Q, const retention::Matrix<double>& K,
            const retention::Matrix<double>& V, const retention::Matrix<double>& W) {
  retention::RetentionOptions<double> o;
  o.normalization = retention::Normalization::decay;
  const retention::Matrix<double> O =
      retention::recurrent_retention(Q, K, V, retention::CausalDecay(0.96875), o);
  return (W.array() * O.array()).sum();
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261201);
  const Index T = 70, dk = 5, dv = 3;  // two chunks of 64, the second ragged
  retention::Matrix<float> Q = random_matrix<float>(T, dk, rng);
  const retention::Matrix<float> K = random_matrix<float>(T, dk, rng);
  const retention::Matrix<float> V = random_matrix<float>(T, dv, rng);
  const retention::Matrix<float> W = random_matrix<float>(T, dv, rng);
  const retention::Matrix<double> Qd = Q.cast<double>(), Kd = K.cast<double>(),
                                  Vd = V.cast<double>(), Wd = W.cast<double>();
  // dL/dQ by central differences.
  retention::Matrix<double> g(T, dk);
  const double h = 1e-6;
  for (Index i = 0; i < T; ++i)
    for (Index j = 0; j < dk; ++j) {
      retention::Matrix<double> p = Qd, m = Qd;
      p(i, j) += h;
      m(i, j) -= h;
      g(i, j) = (loss(p, Kd, Vd, Wd) - loss(m, Kd, Vd, Wd)) / (2 * h);
    }
  const retention::Matrix<float> before = Q;
  train_step(Q, K, V, W);
  const retention::Matrix<double> step = (before - Q).cast<double>() / 1e-3;  // = g.dQ
  const double err = (step - g).norm() / g.norm();
  const double l0 = loss(Qd, Kd, Vd, Wd), l1 = loss(Q.cast<double>(), Kd, Vd, Wd);
  std::printf("README training step: |dQ - finite differences| / |fd| = %.3g, loss %.6f -> %.6f\n",
              err, l0, l1);
  // float inputs and float accumulation, and the step is recovered from a float difference of
  // magnitude ~1e-3 |Q|: a relative error of a few 1e-4 is what float allows there.
  if (!(err < 5e-4)) return 1;
  if (!(l1 < l0)) return 1;
  return 0;
}
