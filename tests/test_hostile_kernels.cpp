// retention-test-links: compiled
// retention-test-labels: sanitize
// Hostile and careless calls into every kernel-level public entry point (issue 15): gamma
// schedules, the four decay masks, the three retention forms and their _into variants,
// retention_step, ThetaShift and the group norms. Each case expects a shape_error naming the
// function and the argument, or a documented result checked against an independent reference;
// the table of outcomes is printed and the test fails unless nothing returned a wrong result
// silently and nothing threw an unexpected exception type. Random shape fuzzing (fixed seeds)
// covers sizes 0, negative, huge (2^40, 2^62, the largest Index) and mismatched.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/nn/norms.hpp>
#include <retention/nn/rotation.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "reference/retention_reference.hpp"
#include "support/hostile_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Index;
using retention::ManhattanDecay;
using retention::Matrix;
using retention::Normalization;
using retention::QuadrantCausalDecay;
using retention::RetentionOptions;
using retention::RetentionState;
using retention::SymmetricDecay;
using retention::ThetaShift;
using retention_hostile::Suite;
using retention_test::random_matrix;
using retention_test::relative_error;
using Mat = Matrix<double>;

constexpr Index kMax = std::numeric_limits<Index>::max();
constexpr Index k40 = Index(1) << 40;
constexpr Index k62 = Index(1) << 62;
const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

bool close(double a, double b, double tol) {
  return std::abs(a - b) <= tol * std::max(1.0, std::abs(b));
}

/// gamma^d straight from the definition (exp(d ln gamma)), 0 for masked pairs (d < 0).
double direct_weight(double gamma, Index d) {
  if (d < 0) return 0.0;
  if (d == 0) return 1.0;
  return std::exp(static_cast<double>(d) * std::log1p(gamma - 1.0));
}

// ------------------------------------------------------------------------------------------------
// Reference for the retention forms: SPEC 2 by direct summation (tests/reference). For positions
// too large to sum the decay series term by term, the series' closed value is used: p + 1 at
// gamma = 1, 1 / (1 - gamma) where gamma^p has underflowed (p > 1e5, gamma <= 0.9 here).
// ------------------------------------------------------------------------------------------------

Mat reference_output(const Mat& Q, const Mat& K, const Mat& V, double gamma, Normalization norm,
                     const ref::State* init, ref::State* final_state) {
  const Index p0 = init ? init->position : 0;
  if (p0 <= 100000) return ref::retention(Q, K, V, gamma, norm, init, final_state);
  ref::State shifted = *init;
  shifted.position = 0;
  ref::Raw raw = ref::raw(Q, K, V, gamma, &shifted);
  for (Index n = 0; n < Q.rows(); ++n)
    raw.decay_sum(n) =
        gamma == 1.0 ? static_cast<double>(p0) + static_cast<double>(n) + 1.0 : 1.0 / (1.0 - gamma);
  if (final_state) {
    *final_state = raw.final_state;
    final_state->position = p0 + Q.rows();
  }
  return ref::normalize(raw, norm);
}

ref::State to_ref(const RetentionState<double>& s) {
  ref::State r;
  r.S = s.S;
  r.z = s.z;
  r.position = s.position;
  return r;
}

bool state_matches(const RetentionState<double>& got, const ref::State& want, double tol) {
  if (got.position != want.position) return false;
  if (got.S.rows() != want.S.rows() || got.S.cols() != want.S.cols()) return false;
  return relative_error(got.S, want.S) <= tol && relative_error(got.z, want.z) <= tol;
}

enum class Entry {
  parallel,
  recurrent,
  chunkwise,
  parallel_into,
  recurrent_into,
  chunkwise_into,
};

const char* family(Entry e) {
  switch (e) {
    case Entry::parallel:
    case Entry::parallel_into:
      return "parallel_retention";
    case Entry::recurrent:
    case Entry::recurrent_into:
      return "recurrent_retention";
    case Entry::chunkwise:
    case Entry::chunkwise_into:
      return "chunkwise_retention";
  }
  return "?";
}

/// Calls one form; `out` is used by the _into entries and receives the result otherwise.
void call_form(Entry e, const Mat& Q, const Mat& K, const Mat& V, const CausalDecay& decay,
               Index chunk, const RetentionOptions<double>& o, Mat& out) {
  switch (e) {
    case Entry::parallel:
      out = retention::parallel_retention(Q, K, V, decay, o);
      break;
    case Entry::recurrent:
      out = retention::recurrent_retention(Q, K, V, decay, o);
      break;
    case Entry::chunkwise:
      out = retention::chunkwise_retention(Q, K, V, decay, chunk, o);
      break;
    case Entry::parallel_into:
      retention::parallel_retention_into(Q, K, V, decay, out, o);
      break;
    case Entry::recurrent_into:
      retention::recurrent_retention_into(Q, K, V, decay, out, o);
      break;
    case Entry::chunkwise_into:
      retention::chunkwise_retention_into(Q, K, V, decay, chunk, out, o);
      break;
  }
}

const Entry kEntries[] = {Entry::parallel,      Entry::recurrent,      Entry::chunkwise,
                          Entry::parallel_into, Entry::recurrent_into, Entry::chunkwise_into};

// ------------------------------------------------------------------------------------------------
// Gamma schedules
// ------------------------------------------------------------------------------------------------

void add_schedule_cases(Suite& s) {
  using retention::linspace_gammas;
  using retention::retnet_gammas;
  using retention::rmt_gammas;
  for (Index h : {Index(0), Index(-1), k40, kMax})
    s.error("retnet_gammas", "heads = " + std::to_string(h), "heads", [h] { retnet_gammas(h); });
  s.result("retnet_gammas", "64 heads: 1 - 2^-(5+h), exactly 1 once that rounds", [] {
    const std::vector<double> g = retnet_gammas(64);
    for (std::size_t h = 0; h < g.size(); ++h) {
      const double want = 1.0 - std::ldexp(1.0, -5 - static_cast<int>(h));
      if (g[h] != want || !(g[h] > 0.0 && g[h] <= 1.0)) return false;
    }
    return g.back() == 1.0;
  });
  for (Index h : {Index(0), Index(-3), k62})
    s.error("linspace_gammas", "heads = " + std::to_string(h), "heads",
            [h] { linspace_gammas(h); });
  const std::pair<double, double> bad_ends[] = {{0.0, 0.5},  {0.5, 1.0},  {kNaN, 0.1},
                                                {0.1, kInf}, {-0.5, 0.1}, {0.1, -kInf}};
  for (const auto& e : bad_ends)
    s.error_any("linspace_gammas",
                "first = " + std::to_string(e.first) + ", last = " + std::to_string(e.second),
                {"first", "last"}, [e] { linspace_gammas(4, e.first, e.second); });
  s.result("linspace_gammas", "one head: 1 - first", [] {
    const std::vector<double> g = linspace_gammas(1, 0.25, 0.01);
    return g.size() == 1 && g[0] == 0.75;
  });
  s.result("linspace_gammas", "first = last just below 1: gammas in (0, 1]", [] {
    const double f = std::nextafter(1.0, 0.0);
    const std::vector<double> g = linspace_gammas(3, f, f);
    for (double x : g)
      if (!(x > 0.0 && x <= 1.0)) return false;
    return true;
  });
  // Issue 15 #8: rmt_gammas(4, 2, INFINITY) gave {NaN, 1, 1, 1}, (4, 1e-300, 0) gave {0, 0, 0, 0}.
  s.error("rmt_gammas", "heads_range = inf", "heads_range", [] { rmt_gammas(4, 2.0, kInf); });
  s.error("rmt_gammas", "initial_value = 1e-300 makes gamma 0", "initial_value",
          [] { rmt_gammas(4, 1e-300, 0.0); });
  s.error("rmt_gammas", "initial_value = inf", "initial_value", [] { rmt_gammas(4, kInf, 1.0); });
  s.error("rmt_gammas", "initial_value = NaN", "initial_value", [] { rmt_gammas(4, kNaN, 1.0); });
  s.error("rmt_gammas", "heads_range = NaN", "heads_range", [] { rmt_gammas(4, 2.0, kNaN); });
  s.error("rmt_gammas", "heads_range < 0", "heads_range", [] { rmt_gammas(4, 2.0, -1.0); });
  s.error("rmt_gammas", "initial_value < 0", "initial_value", [] { rmt_gammas(4, -2.0, 1.0); });
  for (Index h : {Index(0), k40})
    s.error("rmt_gammas", "heads = " + std::to_string(h), "heads",
            [h] { rmt_gammas(h, 2.0, 4.0); });
  s.result("rmt_gammas", "4 heads: 1 - 2^-(2 + 4 h / 4)", [] {
    const std::vector<double> g = rmt_gammas(4, 2.0, 4.0);
    for (std::size_t h = 0; h < 4; ++h)
      if (!close(g[h], 1.0 - std::pow(2.0, -(2.0 + static_cast<double>(h))), 1e-15)) return false;
    return true;
  });
}

// ------------------------------------------------------------------------------------------------
// Masks: constructors, scalar accessors, tiles
// ------------------------------------------------------------------------------------------------

/// The distance of each mask written from its definition (SPEC 1).
struct MaskModel {
  int kind = 0;  // 0 causal, 1 symmetric, 2 Manhattan, 3 quadrant
  Index H = 0, W = 0;
  Index limit() const { return kind < 2 ? kMax : H * W; }
  Index distance(Index n, Index m) const {
    switch (kind) {
      case 0:
        return m <= n ? n - m : -1;
      case 1:
        return n >= m ? n - m : m - n;
      case 2:
        return std::abs(n / W - m / W) + std::abs(n % W - m % W);
      default: {
        const Index dy = n / W - m / W, dx = n % W - m % W;
        return dy < 0 || dx < 0 ? -1 : dy + dx;
      }
    }
  }
  const char* name() const {
    static const char* names[] = {"CausalDecay", "SymmetricDecay", "ManhattanDecay",
                                  "QuadrantCausalDecay"};
    return names[kind];
  }
};

/// The arguments a tile breaks (empty = valid), as the rules say: sizes and offsets >= 0, ends
/// within the positions, rows x cols representable.
std::vector<std::string> tile_violations(const MaskModel& m, Index n0, Index rows, Index m0,
                                         Index cols, bool allocates) {
  std::vector<std::string> v;
  if (rows < 0) v.push_back("rows");
  if (cols < 0) v.push_back("cols");
  if (n0 < 0) v.push_back("n0");
  if (m0 < 0) v.push_back("m0");
  if (!v.empty()) return v;
  if (n0 > m.limit() - rows) v.push_back("rows");
  if (m0 > m.limit() - cols) v.push_back("cols");
  Index p = 0;
  if (allocates && __builtin_mul_overflow(rows, cols, &p)) v.push_back("rows x cols");
  return v;
}

template <class Mask>
bool tile_matches(const Mask& mask, const MaskModel& model, double gamma, const Mat& w,
                  const Mat& lw, Index n0, Index m0) {
  if (w.size() == 0 || lw.size() == 0) return w.size() == 0 && lw.size() == 0;
  for (Index i = 0; i < w.rows(); ++i)
    for (Index j = 0; j < w.cols(); ++j) {
      const Index d = model.distance(n0 + i, m0 + j);
      if (!close(w(i, j), direct_weight(gamma, d), 1e-13)) return false;
      const double want_log = d < 0 ? -kInf : static_cast<double>(d) * std::log1p(gamma - 1.0);
      if (d < 0 ? !(std::isinf(lw(i, j)) && lw(i, j) < 0) : !close(lw(i, j), want_log, 1e-13))
        return false;
    }
  (void)mask;
  return true;
}

template <class Mask>
void add_tile_case(Suite& s, const Mask& mask, const MaskModel& model, double gamma, Index n0,
                   Index rows, Index m0, Index cols) {
  const std::string desc = "tile (" + std::to_string(n0) + ", " + std::to_string(rows) + ", " +
                           std::to_string(m0) + ", " + std::to_string(cols) + ")";
  const std::string w_fn = std::string(model.name()) + "::weights";
  const std::string lw_fn = std::string(model.name()) + "::log_weights";
  const std::vector<std::string> bad = tile_violations(model, n0, rows, m0, cols, true);
  if (!bad.empty()) {
    s.error_any(w_fn, desc, bad, [=] { (void)mask.template weights<double>(n0, rows, m0, cols); });
    s.error_any(lw_fn, desc, bad,
                [=] { (void)mask.template log_weights<float>(n0, rows, m0, cols); });
    return;
  }
  s.result(w_fn, desc, [=] {
    const Mat w = mask.template weights<double>(n0, rows, m0, cols);
    const Mat lw = mask.template log_weights<double>(n0, rows, m0, cols);
    if (w.rows() != rows || w.cols() != cols || lw.rows() != rows || lw.cols() != cols)
      return false;
    return tile_matches(mask, model, gamma, w, lw, n0, m0);
  });
}

template <class Mask>
void add_scalar_cases(Suite& s, const Mask& mask, const MaskModel& model, double gamma) {
  const std::string n = model.name();
  s.error(n + "::factor", "k = -1", "k", [=] { (void)mask.factor(-1); });
  s.result(n + "::factor", "k = 2^62 underflows to 0 (1 at gamma = 1)",
           [=] { return mask.factor(k62) == (gamma == 1.0 ? 1.0 : 0.0); });
  s.error(n + "::weight", "n = -1", "n", [=] { (void)mask.weight(-1, 0); });
  s.error(n + "::log_weight", "m = -5", "m", [=] { (void)mask.log_weight(0, -5); });
  s.error(n + "::distance", "n = min Index", "n",
          [=] { (void)mask.distance(std::numeric_limits<Index>::min(), 0); });
  if (model.kind >= 2) {
    const Index N = model.limit();
    s.error(n + "::weight", "n = H * W (outside the grid)", "n", [=] { (void)mask.weight(N, 0); });
    s.error(n + "::log_weight", "m = 2^40 (outside the grid)", "m",
            [=] { (void)mask.log_weight(0, k40); });
    s.result(n + "::weight", "last grid cell", [=] {
      return close(mask.weight(N - 1, 0), direct_weight(gamma, model.distance(N - 1, 0)), 1e-14);
    });
  } else {
    s.result(n + "::weight", "n = max Index, m = 0", [=] {
      return close(mask.weight(kMax - 1, 0), direct_weight(gamma, model.distance(kMax - 1, 0)),
                   1e-14);
    });
  }
  // weights_into with a block beyond the positions.
  if (model.kind >= 2) {
    const Index N = model.limit();
    s.error(n + "::weights_into", "tile one row past the grid", "rows", [=] {
      Mat big(N + 1, N);
      mask.weights_into(0, 0, big.topRows(N + 1));
    });
  }
  s.error(n + "::log_weights_into", "m0 = -1", "m0", [=] {
    Mat w(2, 2);
    mask.log_weights_into(0, -1, w);
  });
}

void add_mask_cases(Suite& s) {
  const double bad_gammas[] = {0.0, -0.5, 1.5, kNaN, kInf, -kInf};
  for (double g : bad_gammas) {
    const std::string d = "gamma = " + std::to_string(g);
    s.error("CausalDecay", d, "gamma", [g] { CausalDecay c(g); });
    s.error("SymmetricDecay", d, "gamma", [g] { SymmetricDecay c(g); });
    s.error("ManhattanDecay", d, "gamma", [g] { ManhattanDecay c(g, 2, 2); });
    s.error("QuadrantCausalDecay", d, "gamma", [g] { QuadrantCausalDecay c(g, 2, 2); });
  }
  for (Index h : {Index(0), Index(-1)}) {
    s.error("ManhattanDecay", "height = " + std::to_string(h), "height",
            [h] { ManhattanDecay c(0.9, h, 3); });
    s.error("QuadrantCausalDecay", "width = " + std::to_string(h), "width",
            [h] { QuadrantCausalDecay c(0.9, 3, h); });
  }
  s.error("ManhattanDecay", "height x width overflows (2^40 x 2^40)", "height x width",
          [] { ManhattanDecay c(0.9, k40, k40); });
  s.error("QuadrantCausalDecay", "height x width overflows (2^62 x 4)", "height x width",
          [] { QuadrantCausalDecay c(0.9, k62, 4); });
  // Issue 15 #4: a tile beyond the grid read past the distance table.
  s.error("ManhattanDecay::weights", "ManhattanDecay(0.9, 2, 2).weights(0, 8, 0, 8)", "rows",
          [] { (void)ManhattanDecay(0.9, 2, 2).weights<double>(0, 8, 0, 8); });
  s.error("QuadrantCausalDecay::log_weights", "tile (3, 2, 0, 1) on a 2 x 2 grid", "rows",
          [] { (void)QuadrantCausalDecay(0.9, 2, 2).log_weights<double>(3, 2, 0, 1); });
  s.result("ManhattanDecay", "a 2^20 x 2^20 grid: size, and a tile in its far corner", [] {
    const ManhattanDecay m(0.5, Index(1) << 20, Index(1) << 20);
    const Index N = m.size();
    const Mat w = m.weights<double>(N - 2, 2, N - 2, 2);
    return N == (Index(1) << 40) && w(0, 0) == 1.0 && w(1, 0) == 0.5 && w(0, 1) == 0.5;
  });

  // CausalDecay's chunk helpers and the decay series.
  const CausalDecay c(0.9);
  s.error("CausalDecay::decay_sum", "p = -1", "p", [c] { (void)c.decay_sum(-1); });
  s.result("CausalDecay::decay_sum", "p = max Index: 1 / (1 - gamma)",
           [c] { return close(c.decay_sum(kMax), 1.0 / (1.0 - 0.9), 1e-14); });
  s.result("CausalDecay::decay_sum", "gamma = 1, p = max Index: p + 1 in double",
           [] { return CausalDecay(1.0).decay_sum(kMax) == static_cast<double>(kMax) + 1.0; });
  s.error("CausalDecay::chunk_factor", "length = -2", "length", [c] { (void)c.chunk_factor(-2); });
  s.error("CausalDecay::query_factors", "length = -1", "length",
          [c] { (void)c.query_factors<float>(-1); });
  s.error("CausalDecay::key_factors", "length = min Index", "length",
          [c] { (void)c.key_factors<double>(std::numeric_limits<Index>::min()); });
  s.result("CausalDecay::key_factors", "length = 0: empty", [c] {
    return c.key_factors<double>(0).size() == 0 && c.query_factors<double>(0).size() == 0;
  });

  // Scalar accessors of every mask kind.
  for (double g : {0.9, 1.0}) {
    add_scalar_cases(s, CausalDecay(g), MaskModel{0, 0, 0}, g);
    add_scalar_cases(s, SymmetricDecay(g), MaskModel{1, 0, 0}, g);
    add_scalar_cases(s, ManhattanDecay(g, 3, 2), MaskModel{2, 3, 2}, g);
    add_scalar_cases(s, QuadrantCausalDecay(g, 2, 3), MaskModel{3, 2, 3}, g);
  }

  // Tile fuzzing: offsets and sizes from a hostile set, every mask kind.
  const Index values[] = {-3, -1, 0, 1, 2, 3, 5, k40, k62, kMax};
  std::mt19937_64 rng(1515);
  auto pick = [&] { return values[rng() % (sizeof(values) / sizeof(values[0]))]; };
  for (int i = 0; i < 160; ++i) {
    const int kind = static_cast<int>(rng() % 4);
    const Index H = 1 + static_cast<Index>(rng() % 3), W = 1 + static_cast<Index>(rng() % 3);
    const double g = (rng() % 3 == 0) ? 1.0 : 0.7;
    Index n0 = pick(), rows = pick(), m0 = pick(), cols = pick();
    // A valid tile must also fit in memory: keep huge sizes for the overflow and empty cases.
    Index prod = 0;
    if (rows > 64 && cols > 0 && !__builtin_mul_overflow(rows, cols, &prod)) cols = 0;
    if (cols > 64 && rows > 0 && !__builtin_mul_overflow(rows, cols, &prod)) rows = 0;
    const MaskModel model{kind, H, W};
    switch (kind) {
      case 0:
        add_tile_case(s, CausalDecay(g), model, g, n0, rows, m0, cols);
        break;
      case 1:
        add_tile_case(s, SymmetricDecay(g), model, g, n0, rows, m0, cols);
        break;
      case 2:
        add_tile_case(s, ManhattanDecay(g, H, W), model, g, n0, rows, m0, cols);
        break;
      default:
        add_tile_case(s, QuadrantCausalDecay(g, H, W), model, g, n0, rows, m0, cols);
        break;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Retention forms
// ------------------------------------------------------------------------------------------------

/// One form call with its expectation derived from the documented rules.
struct FormCall {
  Entry entry = Entry::parallel;
  Index T = 4, dk = 3, dv = 2;
  Index k_rows = -1, k_cols = -1, v_rows = -1;  // -1: consistent with Q
  Index out_rows = -1, out_cols = -1;
  Index chunk = 3, tile = 0;
  Normalization norm = Normalization::none;
  double gamma = 0.9;
  bool with_state = false;
  Index state_dk = -1, state_dv = -1, z_size = -1;
  Index position = 0;
  std::uint64_t seed = 1;

  std::string describe() const {
    std::ostringstream s;
    s << "T=" << T << " dk=" << dk << " dv=" << dv << " K=[" << k_rows << "x" << k_cols
      << "] Vrows=" << v_rows << " out=[" << out_rows << "x" << out_cols << "] chunk=" << chunk
      << " tile=" << tile << " norm=" << static_cast<int>(norm) << " gamma=" << gamma;
    if (with_state)
      s << " state S=[" << state_dk << "x" << state_dv << "] z=" << z_size << " p=" << position;
    return s.str();
  }
};

void add_form_call(Suite& s, FormCall c) {
  if (c.k_rows < 0) c.k_rows = c.T;
  if (c.k_cols < 0) c.k_cols = c.dk;
  if (c.v_rows < 0) c.v_rows = c.T;
  if (c.out_rows < 0) c.out_rows = c.T;
  if (c.out_cols < 0) c.out_cols = c.dv;
  if (c.state_dk < 0) c.state_dk = c.dk;
  if (c.state_dv < 0) c.state_dv = c.dv;
  if (c.z_size < 0) c.z_size = c.state_dk;
  const bool into = c.entry == Entry::parallel_into || c.entry == Entry::recurrent_into ||
                    c.entry == Entry::chunkwise_into;
  const bool is_chunk = c.entry == Entry::chunkwise || c.entry == Entry::chunkwise_into;
  const bool is_par = c.entry == Entry::parallel || c.entry == Entry::parallel_into;

  std::vector<std::string> bad;
  if (c.dk < 1) bad.push_back("Q");
  if (c.k_rows != c.T || c.k_cols != c.dk) bad.push_back("K");
  if (c.v_rows != c.T || c.dv < 1) bad.push_back("V");
  if (into && (c.out_rows != c.T || c.out_cols != c.dv)) bad.push_back("out");
  if (is_chunk && c.chunk < 1) bad.push_back("chunk");
  if (is_par && c.tile < 0) bad.push_back("tile");
  if (c.norm != Normalization::none && c.norm != Normalization::decay &&
      c.norm != Normalization::decay_and_score)
    bad.push_back("normalization");
  if (c.with_state) {
    if (c.state_dk != c.dk || c.state_dv != c.dv || c.z_size != c.dk || c.position < 0)
      bad.push_back("initial_state");
    else if (c.position > kMax - c.T)
      bad.push_back("initial_state.position");
  }
  const std::string entry = family(c.entry);
  const std::string desc = c.describe();
  auto run = [c](Mat& out, RetentionState<double>* fin, const RetentionState<double>* init) {
    const Mat Q = random_matrix<double>(c.T, c.dk, c.seed);
    const Mat K = random_matrix<double>(c.k_rows, c.k_cols, c.seed + 1);
    const Mat V = random_matrix<double>(c.v_rows, c.dv, c.seed + 2);
    RetentionOptions<double> o;
    o.normalization = c.norm;
    o.tile = c.tile;
    o.initial_state = init;
    o.final_state = fin;
    out.resize(c.out_rows, c.out_cols);
    call_form(c.entry, Q, K, V, CausalDecay(c.gamma), c.chunk, o, out);
  };
  auto make_state = [c] {
    RetentionState<double> st;
    st.S = random_matrix<double>(c.state_dk, c.state_dv, c.seed + 3);
    st.z = random_matrix<double>(c.z_size, 1, c.seed + 4);
    st.position = c.position;
    return st;
  };
  if (!bad.empty()) {
    s.error_any(entry, desc, bad, [run, make_state, c] {
      Mat out;
      RetentionState<double> init = make_state(), fin;
      run(out, &fin, c.with_state ? &init : nullptr);
    });
    return;
  }
  s.result(entry, desc, [run, make_state, c] {
    Mat out;
    RetentionState<double> init = make_state(), fin;
    run(out, &fin, c.with_state ? &init : nullptr);
    const Mat Q = random_matrix<double>(c.T, c.dk, c.seed);
    const Mat K = random_matrix<double>(c.T, c.dk, c.seed + 1);
    const Mat V = random_matrix<double>(c.T, c.dv, c.seed + 2);
    const ref::State rinit = to_ref(init);
    ref::State rfin;
    const Mat want =
        reference_output(Q, K, V, c.gamma, c.norm, c.with_state ? &rinit : nullptr, &rfin);
    return out.rows() == c.T && out.cols() == c.dv && relative_error(out, want) <= 1e-10 &&
           state_matches(fin, rfin, 1e-10);
  });
}

void add_retention_cases(Suite& s) {
  // Fixed cases: each documented rule once per entry point.
  for (Entry e : kEntries) {
    FormCall c;
    c.entry = e;
    FormCall k_rows = c;
    k_rows.k_rows = 3;
    add_form_call(s, k_rows);
    FormCall k_cols = c;
    k_cols.k_cols = 4;
    add_form_call(s, k_cols);
    FormCall v_rows = c;
    v_rows.v_rows = 5;
    add_form_call(s, v_rows);
    FormCall dv0 = c;
    dv0.dv = 0;
    add_form_call(s, dv0);
    FormCall dk0 = c;
    dk0.dk = 0;
    add_form_call(s, dk0);
    FormCall t0 = c;
    t0.T = 0;
    add_form_call(s, t0);
    FormCall t0s = t0;
    t0s.with_state = true;
    t0s.position = kMax;  // nothing to add: valid, state passes through
    add_form_call(s, t0s);
    FormCall huge_chunk = c;
    huge_chunk.chunk = k62;
    huge_chunk.tile = k62;
    add_form_call(s, huge_chunk);
    FormCall neg = c;
    neg.chunk = -1;
    neg.tile = -1;
    add_form_call(s, neg);
    FormCall bad_norm = c;
    bad_norm.norm = static_cast<Normalization>(7);
    add_form_call(s, bad_norm);
    FormCall overflow = c;
    overflow.with_state = true;
    overflow.position = kMax - 2;  // + T = 4 overflows
    add_form_call(s, overflow);
    FormCall at_edge = c;
    at_edge.with_state = true;
    at_edge.position = kMax - 4;  // + T = 4 is the largest Index: fine
    at_edge.norm = Normalization::decay;
    add_form_call(s, at_edge);
    FormCall neg_pos = c;
    neg_pos.with_state = true;
    neg_pos.position = -1;
    add_form_call(s, neg_pos);
    FormCall bad_s = c;
    bad_s.with_state = true;
    bad_s.state_dv = 3;
    add_form_call(s, bad_s);
    FormCall bad_z = c;
    bad_z.with_state = true;
    bad_z.z_size = 2;
    add_form_call(s, bad_z);
    FormCall out_rows = c;
    out_rows.out_rows = 5;
    add_form_call(s, out_rows);
  }

  // Random shape fuzzing: sizes 0..17, mismatches, hostile chunk/tile/positions, every entry.
  std::mt19937_64 rng(151515);
  const Index Ts[] = {0, 1, 2, 3, 5, 9, 17};
  const Index dims[] = {0, 1, 2, 3, 4, 7};
  const Index chunks[] = {-5, 0, 1, 2, 3, 8, k40, k62, kMax};
  const Index tiles[] = {-1, 0, 1, 2, 5, k62};
  const Index positions[] = {0, 7, -1, kMax - 20, kMax - 3, kMax};
  const double gammas[] = {0.9, 0.5, 1.0};
  auto pick = [&rng](const auto& arr) { return arr[rng() % (sizeof(arr) / sizeof(arr[0]))]; };
  for (int i = 0; i < 300; ++i) {
    FormCall c;
    c.entry = kEntries[rng() % 6];
    c.T = pick(Ts);
    c.dk = pick(dims);
    c.dv = pick(dims);
    if (rng() % 6 == 0) c.k_rows = c.T + 1;
    if (rng() % 6 == 0) c.k_cols = c.dk + 1;
    if (rng() % 6 == 0) c.v_rows = c.T == 0 ? 1 : c.T - 1;
    if (rng() % 8 == 0) c.out_rows = c.T + 2;
    if (rng() % 8 == 0) c.out_cols = c.dv + 1;
    c.chunk = pick(chunks);
    c.tile = pick(tiles);
    const int n = static_cast<int>(rng() % 13);
    c.norm =
        n < 4
            ? Normalization::none
            : (n < 8 ? Normalization::decay
                     : (n < 12 ? Normalization::decay_and_score : static_cast<Normalization>(-1)));
    c.gamma = pick(gammas);
    c.with_state = rng() % 2 == 0;
    if (c.with_state) {
      c.position = pick(positions);
      if (rng() % 8 == 0) c.state_dk = c.dk + 1;
      if (rng() % 8 == 0) c.state_dv = c.dv + 1;
      if (rng() % 10 == 0) c.z_size = c.dk == 0 ? 1 : c.dk - 1;
    }
    c.seed = 1000 + static_cast<std::uint64_t>(i) * 7;
    add_form_call(s, c);
  }
}

// ------------------------------------------------------------------------------------------------
// retention_step
// ------------------------------------------------------------------------------------------------

void add_step_cases(Suite& s) {
  const CausalDecay decay(0.9);
  const char* fn = "retention_step";
  s.error(fn, "dk = 0 (q, k [1 x 0], state S [0 x 2])", "q", [decay] {
    RetentionState<double> st;
    st.S.resize(0, 2);
    st.z.resize(0);
    (void)retention::retention_step(Mat(1, 0), Mat(1, 0), Mat::Ones(1, 2), decay, st);
  });
  s.error(fn, "dv = 0", "v", [decay] {
    RetentionState<double> st;
    st.S.resize(2, 0);
    st.z = retention::Vector<double>::Zero(2);
    (void)retention::retention_step(Mat::Ones(1, 2), Mat::Ones(1, 2), Mat(1, 0), decay, st);
  });
  s.error(fn, "state.position = max Index: position + 1 overflows", "position", [decay] {
    RetentionState<double> st(2, 2);
    st.position = kMax;
    (void)retention::retention_step(Mat::Ones(1, 2), Mat::Ones(1, 2), Mat::Ones(1, 2), decay, st);
  });
  s.error(fn, "normalization = 3", "normalization", [decay] {
    RetentionState<double> st(2, 2);
    (void)retention::retention_step(Mat::Ones(1, 2), Mat::Ones(1, 2), Mat::Ones(1, 2), decay, st,
                                    static_cast<Normalization>(3));
  });
  s.error(fn, "q is a Map over state.S", "q", [decay] {
    RetentionState<double> st(2, 2);
    const Eigen::Map<const Mat> q(st.S.data(), 1, 2);
    (void)retention::retention_step(q, Mat::Ones(1, 2), Mat::Ones(1, 2), decay, st);
  });
  s.error(fn, "v is a Map over state.z", "v", [decay] {
    RetentionState<double> st(2, 2);
    const Eigen::Map<const Mat> v(st.z.data(), 1, 2);
    (void)retention::retention_step(Mat::Ones(1, 2), Mat::Ones(1, 2), v, decay, st);
  });
  s.result(fn, "a failed step leaves the state unchanged", [decay] {
    RetentionState<double> st(2, 2);
    st.S = random_matrix<double>(2, 2, 5);
    st.position = kMax;
    const RetentionState<double> before = st;
    try {
      (void)retention::retention_step(Mat::Ones(1, 2), Mat::Ones(1, 2), Mat::Ones(1, 2), decay, st);
    } catch (const retention::shape_error&) {
    }
    return st.S == before.S && st.z == before.z && st.position == before.position;
  });
  s.result(fn, "position max Index - 1: one more step is fine", [decay] {
    RetentionState<double> st(2, 3);
    st.position = kMax - 1;
    const Mat q = random_matrix<double>(1, 2, 1), k = random_matrix<double>(1, 2, 2);
    const Mat v = random_matrix<double>(1, 3, 3);
    const Mat o = retention::retention_step(q, k, v, decay, st, Normalization::decay);
    // S = k^T v; o = q S / sqrt(1 / (1 - gamma)) (gamma^p has underflowed).
    const Mat want = (q * (k.transpose() * v)) * std::sqrt(1.0 - 0.9);
    return st.position == kMax && relative_error(o, want) <= 1e-12;
  });
}

// ------------------------------------------------------------------------------------------------
// ThetaShift and the group norms
// ------------------------------------------------------------------------------------------------

/// Rotation of SPEC 3 from its definition, in double.
Mat rotate_reference(const Mat& x, Index head_dim, Index first) {
  Mat y = x;
  const Index half = head_dim / 2;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g = 0; g < x.cols() / head_dim; ++g)
      for (Index j = 0; j < half; ++j) {
        const double e = half == 1 ? 0.0 : static_cast<double>(j) / static_cast<double>(half - 1);
        const double a = static_cast<double>(first + t) * std::pow(10000.0, -e);
        const Index i = g * head_dim + 2 * j;
        y(t, i) = x(t, i) * std::cos(a) - x(t, i + 1) * std::sin(a);
        y(t, i + 1) = x(t, i + 1) * std::cos(a) + x(t, i) * std::sin(a);
      }
  return y;
}

/// Group norm from its definition with the documented 0/0 = 0 convention.
Mat norm_reference(const Mat& x, Index group, double eps, bool subtract_mean) {
  Mat y = x;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g0 = 0; g0 < x.cols(); g0 += group) {
      double mean = 0.0;
      if (subtract_mean) {
        for (Index c = 0; c < group; ++c) mean += x(t, g0 + c);
        mean /= static_cast<double>(group);
      }
      double ms = 0.0;
      for (Index c = 0; c < group; ++c) ms += (x(t, g0 + c) - mean) * (x(t, g0 + c) - mean);
      ms /= static_cast<double>(group);
      const double f = ms + eps == 0.0 ? 0.0 : 1.0 / std::sqrt(ms + eps);
      for (Index c = 0; c < group; ++c) y(t, g0 + c) = (x(t, g0 + c) - mean) * f;
    }
  return y;
}

void add_rotation_and_norm_cases(Suite& s) {
  for (Index hd : {Index(3), Index(0), Index(-2), Index(1), k40, k62 + 2})
    s.error("ThetaShift", "head_dim = " + std::to_string(hd), "head_dim",
            [hd] { ThetaShift r(hd); });
  const ThetaShift rot(4);
  s.error("ThetaShift::apply", "first_position = -1", "first_position", [rot] {
    Mat x = Mat::Ones(2, 4);
    rot.apply(x, -1);
  });
  s.error("ThetaShift::apply", "first_position + rows overflows", "first_position", [rot] {
    Mat x = Mat::Ones(3, 4);
    rot.apply(x, kMax - 1);
  });
  s.error("ThetaShift::apply", "x has 6 columns", "x", [rot] {
    Mat x = Mat::Ones(2, 6);
    rot.apply(x, 0);
  });
  // Issue 15 #9: apply_pair(x, x) rotated x twice.
  s.error("ThetaShift::apply_pair", "apply_pair(x, x)", "y overlaps x", [rot] {
    Mat x = Mat::Ones(2, 4);
    rot.apply_pair(x, x, 0);
  });
  s.error("ThetaShift::apply_pair", "y is a block overlapping x", "y overlaps x", [rot] {
    Mat x = Mat::Ones(2, 12);
    rot.apply_pair(x.leftCols(8), x.rightCols(8), 0);
  });
  s.result("ThetaShift::apply_pair", "x and y disjoint column blocks of one matrix", [rot] {
    const Mat x0 = random_matrix<double>(3, 12, 9);
    Mat x = x0;
    rot.apply_pair(x.leftCols(4), x.rightCols(8), 5);
    return relative_error(x, rotate_reference(x0, 4, 5)) <= 1e-13;
  });
  s.result("ThetaShift::apply", "first_position = max Index - 2, 2 rows", [rot] {
    const Mat x0 = random_matrix<double>(2, 8, 10);
    Mat x = x0;
    rot.apply(x, kMax - 2);
    return relative_error(x, rotate_reference(x0, 4, kMax - 2)) <= 1e-12;
  });

  // Rotation fuzz.
  std::mt19937_64 rng(42);
  const Index hds[] = {-2, 0, 1, 2, 3, 4, 6, k40};
  const Index cols[] = {0, 2, 4, 6, 8, 12};
  const Index firsts[] = {-1, 0, 5, k62, kMax - 1, kMax};
  for (int i = 0; i < 60; ++i) {
    const Index hd = hds[rng() % 8], c = cols[rng() % 6], first = firsts[rng() % 6];
    const Index rows = static_cast<Index>(rng() % 4);
    const std::string desc = "head_dim " + std::to_string(hd) + ", x [" + std::to_string(rows) +
                             " x " + std::to_string(c) + "], first " + std::to_string(first);
    if (hd < 2 || hd % 2 != 0 || hd > ThetaShift::max_head_dim) {
      s.error("ThetaShift", desc, "head_dim", [hd] { ThetaShift r(hd); });
      continue;
    }
    std::vector<std::string> bad;
    if (c % hd != 0) bad.push_back("x");
    if (first < 0 || first > kMax - rows) bad.push_back("first_position");
    const std::uint64_t seed = 300 + static_cast<std::uint64_t>(i);
    if (!bad.empty()) {
      s.error_any("ThetaShift::apply", desc, bad, [=] {
        Mat x = random_matrix<double>(rows, c, seed);
        ThetaShift(hd).apply(x, first);
      });
      continue;
    }
    s.result("ThetaShift::apply", desc, [=] {
      const Mat x0 = random_matrix<double>(rows, c, seed);
      Mat x = x0;
      ThetaShift(hd).apply(x, first);
      return relative_error(x, rotate_reference(x0, hd, first)) <= 1e-12;
    });
  }

  // Views with 2^40 rows and no columns are valid and empty: nothing to do, done at once.
  s.result("ThetaShift::apply", "x [2^40 x 0] (a Map over nothing)", [rot] {
    Eigen::Map<Mat> x(nullptr, k40, 0);
    rot.apply(x, 0);
    return x.size() == 0;
  });
  s.result("rms_norm_groups", "x [2^40 x 0] (a Map over nothing)", [] {
    Eigen::Map<Mat> x(nullptr, k40, 0);
    retention::rms_norm_groups(x, 3, 0.0);
    retention::layer_norm_groups(x, 5, 1e-6);
    return x.size() == 0;
  });

  // Norms.
  s.result("rms_norm_groups", "eps = 0, an all-zero group (fresh zero-weight layer) stays 0", [] {
    Mat x = Mat::Zero(2, 6);
    x.row(1).tail(3) << 1.0, 2.0, 2.0;
    retention::rms_norm_groups(x, 3, 0.0);
    return x.allFinite() && x.row(0).isZero(0) && x.row(1).head(3).isZero(0) &&
           close(x(1, 3), 1.0 / std::sqrt(3.0), 1e-15);
  });
  s.result("layer_norm_groups", "eps = 0, a constant group becomes 0", [] {
    Mat x = Mat::Constant(1, 4, 0.0);
    retention::layer_norm_groups(x, 2, 0.0);
    return x.allFinite() && x.isZero(0);
  });
  s.result("layer_norm", "eps = 0, a zero row gives the bias", [] {
    const Mat x = Mat::Zero(2, 3);
    const retention::Vector<double> w = retention::Vector<double>::Ones(3);
    const retention::Vector<double> b(retention::Vector<double>::LinSpaced(3, 1.0, 3.0));
    const Mat y = retention::layer_norm(x, w, b, 0.0);
    return y.allFinite() && y.row(0) == b.transpose() && y.row(1) == b.transpose();
  });
  s.result("rms_norm_groups", "a NaN stays in its own group", [] {
    Mat x = random_matrix<double>(1, 6, 3);
    x(0, 1) = kNaN;
    retention::rms_norm_groups(x, 3, 1e-6);
    return std::isnan(x(0, 0)) && x.row(0).tail(3).allFinite();
  });
  s.error("layer_norm", "weight is a 2 x 3 matrix for 6 columns", "weight", [] {
    const Mat x = Mat::Ones(2, 6);
    (void)retention::layer_norm(x, Mat::Ones(2, 3), retention::Vector<double>::Ones(6), 1e-5);
  });
  s.error("layer_norm", "eps = -1 names layer_norm", "eps", [] {
    const Mat x = Mat::Ones(2, 3);
    (void)retention::layer_norm(x, retention::Vector<double>::Ones(3),
                                retention::Vector<double>::Ones(3), -1.0);
  });
  const Index groups[] = {-1, 0, 1, 2, 3, 6, k40};
  const Index xcols[] = {0, 3, 6};
  const double epss[] = {-1.0, 0.0, 1e-6, kNaN, kInf};
  for (int i = 0; i < 60; ++i) {
    const Index g = groups[rng() % 7], c = xcols[rng() % 3];
    const double eps = epss[rng() % 5];
    const bool layer = rng() % 2 == 0;
    const std::string fn = layer ? "layer_norm_groups" : "rms_norm_groups";
    const std::string desc = "group " + std::to_string(g) + ", x [2 x " + std::to_string(c) +
                             "], eps " + std::to_string(eps);
    std::vector<std::string> bad;
    if (g < 1 || c % g != 0) bad.push_back("group");
    if (!(eps >= 0.0) || !std::isfinite(eps)) bad.push_back("eps");
    const std::uint64_t seed = 700 + static_cast<std::uint64_t>(i);
    auto call = [=](Mat& x) {
      if (layer)
        retention::layer_norm_groups(x, g, eps);
      else
        retention::rms_norm_groups(x, g, eps);
    };
    if (!bad.empty()) {
      s.error_any(fn, desc, bad, [=] {
        Mat x = random_matrix<double>(2, c, seed);
        call(x);
      });
      continue;
    }
    s.result(fn, desc, [=] {
      const Mat x0 = random_matrix<double>(2, c, seed);
      Mat x = x0;
      call(x);
      return relative_error(x, norm_reference(x0, g, eps, layer)) <= 1e-13;
    });
  }
}

TEST(HostileKernels, EveryEntryPointClearErrorOrDocumentedResult) {
  Suite s("kernels");
  add_schedule_cases(s);
  add_mask_cases(s);
  add_retention_cases(s);
  add_step_cases(s);
  add_rotation_and_norm_cases(s);
  EXPECT_GE(s.size(), 700u);
  s.run_and_expect_clean();
}

// The framework itself: each column is reachable, so a broken library cannot pass by accident.
TEST(HostileKernels, FrameworkClassifiesEveryColumn) {
  Suite s("framework");
  s.error("f", "clear", "arg", [] { throw retention::shape_error("f: arg is bad"); });
  s.result("f", "documented", [] { return true; });
  s.error("f", "no error", "arg", [] {});
  s.error("f", "error without the argument", "arg", [] { throw retention::shape_error("f: x"); });
  s.error("f", "error without the function", "arg", [] { throw retention::shape_error("g: arg"); });
  s.result("f", "predicate false", [] { return false; });
  s.result("f", "unexpected shape_error", []() -> bool { throw retention::shape_error("f: arg"); });
  s.result("f", "bad_alloc", []() -> bool { throw std::bad_alloc(); });
  std::ostringstream sink;
  const retention_hostile::Report r = s.run(sink);
  using retention_hostile::Column;
  EXPECT_EQ(r.tried, 8);
  EXPECT_EQ(r.count(Column::clear_error), 1);
  EXPECT_EQ(r.count(Column::documented_result), 1);
  EXPECT_EQ(r.count(Column::silent_wrong), 5);
  EXPECT_EQ(r.count(Column::crash_like), 1);
  EXPECT_EQ(r.failures.size(), 6u);
}

// Issue 15 #9: no macro of the library leaks into the user's translation unit.
#if defined(RETENTION_HAS_MXCSR)
#error "RETENTION_HAS_MXCSR leaked out of the retention headers"
#endif

}  // namespace
