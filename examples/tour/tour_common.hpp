// Helpers shared by the tour's sections: timing and one aligned output line per operator.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace tour {

/// Median wall time in milliseconds of `repeats` calls of f (after one warm-up call).
template <class F>
double median_ms(F&& f, int repeats = 3) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    const auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::milli>(b - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// max over pairs of norm(a - b) / norm(b), in double.
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  const double den = b.template cast<double>().norm();
  const double num = (a.template cast<double>() - b.template cast<double>()).norm();
  return den == 0.0 ? num : num / den;
}

struct FormTime {
  std::string form;
  double ms;
};

/// One line: operator, shape, each form's time, worst relative disagreement between forms.
inline void print_line(const std::string& op, const std::string& shape,
                       const std::vector<FormTime>& times, double worst_disagreement) {
  std::printf("%-26s %-28s", op.c_str(), shape.c_str());
  for (const auto& t : times) std::printf(" %s %8.2f ms", t.form.c_str(), t.ms);
  std::printf("   worst rel. disagreement %.2e\n", worst_disagreement);
}

inline void print_header() {
  std::printf("%-26s %-28s %s\n", "operator", "shape", "forms: median time of 3 runs | agreement");
}

}  // namespace tour
