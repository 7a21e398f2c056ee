// Quickstart: multi-head retention (RetNet's MSR core) in its three forms on random float inputs.
//
// q, k, v are [B, T, H, D] buffers, the layout a Linear layer produces; head h decays with RetNet's
// gamma_h = 1 - 2^(-5-h). The three forms compute the same function (SPEC 2), so their outputs
// agree to float rounding; the program prints each form's median time and the worst relative
// disagreement, and exits with status 1 if that exceeds 1e-5.
#include <retention/retention.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

/// Median wall time in ms of `repeats` runs of f, after one warm-up run.
template <class F>
double median_ms(F&& f, int repeats = 3) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// norm(a - b) / norm(b) over whole buffers, in double.
double relative_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main() {
  using retention::Form;
  const retention::MultiHeadShape shape{/*batch*/ 1, /*time*/ 2048, /*heads*/ 8, /*key_dim*/ 64,
                                        /*value_dim*/ 64};
  const std::vector<double> gammas = retention::retnet_gammas(shape.heads);

  // Random inputs in [-1, 1); k scaled by dk^-1/2 as in RetNet's MSR layer.
  const std::size_t n =
      static_cast<std::size_t>(shape.batch * shape.time * shape.heads * shape.key_dim);
  std::vector<float> q(n), k(n), v(n);
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (std::size_t i = 0; i < n; ++i) {
    q[i] = uniform(rng);
    k[i] = uniform(rng) * 0.125f;
    v[i] = uniform(rng);
  }

  const Form forms[] = {Form::parallel, Form::recurrent, Form::chunkwise};
  std::vector<std::vector<float>> outs;
  std::printf(
      "multi-head retention, float, B=%ld T=%ld H=%ld dk=%ld dv=%ld, decay_and_score "
      "normalisation\n",
      static_cast<long>(shape.batch), static_cast<long>(shape.time), static_cast<long>(shape.heads),
      static_cast<long>(shape.key_dim), static_cast<long>(shape.value_dim));
  for (Form form : forms) {
    std::vector<float> out(n);
    retention::MultiHeadOptions<float> opt;
    opt.form = form;
    opt.chunk = 64;
    opt.normalization = retention::Normalization::decay_and_score;
    const double ms = median_ms([&] {
      retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape, gammas, opt);
    });
    std::printf("  %-10s %9.2f ms  (%.1f k tokens/s)\n", retention::to_string(form), ms,
                static_cast<double>(shape.batch * shape.time) / ms);
    outs.push_back(std::move(out));
  }

  double worst = 0.0;
  for (std::size_t a = 0; a < outs.size(); ++a)
    for (std::size_t b = a + 1; b < outs.size(); ++b) {
      const double d = relative_diff(outs[a], outs[b]);
      std::printf("  %s vs %s: relative difference %.2e\n", retention::to_string(forms[a]),
                  retention::to_string(forms[b]), d);
      worst = std::max(worst, d);
    }
  const bool ok = worst <= 1e-5 && worst == worst;  // NaN never passes
  std::printf("worst disagreement %.2e (%s 1e-5)\n", worst, ok ? "<=" : "EXCEEDS");
  return ok ? 0 : 1;
}
