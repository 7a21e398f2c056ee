// retention-test-links: compiled
// Non-finite inputs at the multi-head and layer level (issue 15 #1, docs/math.md §2.6): with an
// Inf, -Inf or NaN in ONE token t, every output that does not depend on token t stays finite and
// equal to the same call on the clean inputs (truncated to the first t rows for causal retention),
// in every form, and the forms agree on those rows. Covered: multi_head_retention (other heads and
// sequences untouched, final states included), MultiScaleRetention (forward, prefill + step,
// prefill_packed, step_batch), ViR's VirRetention and VirBlock (forward with and without carried
// states, step), and MaSA / MaSAD with QuadrantCausalDecay (outputs the bad cell is masked out of)
// and ManhattanDecay (what the math requires), their training forwards (saved lse and u too), and
// NaN propagation under ManhattanDecay in float and double alike. Clean rows are also checked
// against the independent double references of tests/reference/.
#include <retention/decay.hpp>
#include <retention/layers/msr.hpp>
#include <retention/layers/vir.hpp>
#include <retention/masa.hpp>
#include <retention/masa_backward.hpp>
#include <retention/multihead.hpp>

#include "reference/masa_backward_reference.hpp"
#include "reference/msr_reference.hpp"
#include "reference/retention_reference.hpp"
#include "reference/vir_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::ScalarName;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

template <class T>
class NonFiniteLayers : public ::testing::Test {};
TYPED_TEST_SUITE(NonFiniteLayers, retention_test::ScalarTypes, ScalarName);

/// The three hostile values with printable names.
template <class T>
std::vector<std::pair<T, std::string>> bad_values() {
  return {{std::numeric_limits<T>::infinity(), "+inf"},
          {-std::numeric_limits<T>::infinity(), "-inf"},
          {std::numeric_limits<T>::quiet_NaN(), "nan"}};
}

/// Counts the comparisons of a test and keeps the worst relative error seen.
struct Tracker {
  std::string name;
  double worst = 0.0;
  long checks = 0;

  /// got is finite and within tol of want (relative, whole block).
  template <class A, class B>
  void close(const A& got, const B& want, double tol, const std::string& where) {
    ++checks;
    EXPECT_TRUE(got.allFinite()) << name << ": non-finite where the input is clean: " << where;
    const double e = relative_error(got, want);
    if (std::isfinite(e)) worst = std::max(worst, e);
    EXPECT_LE(e, tol) << name << ": " << where;
  }
  void report() const {
    ::testing::Test::RecordProperty("checks", std::to_string(checks));
    ::testing::Test::RecordProperty("worst_relative_error", std::to_string(worst));
    std::cout << "[nonfinite-layers] " << name << ": " << checks
              << " comparisons, worst relative error " << worst << "\n";
  }
};

/// The forms of a causal call: parallel, recurrent and chunkwise with chunks around the length.
struct FormRun {
  Form form;
  Index chunk;
  std::string name() const {
    if (form == Form::parallel) return "parallel";
    if (form == Form::recurrent) return "recurrent";
    return "chunkwise " + std::to_string(chunk);
  }
};

std::vector<FormRun> forms_for(Index len) {
  return {{Form::recurrent, 0}, {Form::parallel, 0},    {Form::chunkwise, 1},
          {Form::chunkwise, 4}, {Form::chunkwise, len}, {Form::chunkwise, len + 1}};
}

/// Bad token positions: first, second, middle, last.
std::vector<Index> bad_tokens(Index len) { return {0, 1, len / 2, len - 1}; }

// =================================================================================================
// multi_head_retention
// =================================================================================================

/// Rows [0, rows) of every sequence of a dense [B, len, H*D] buffer: [B, rows, H*D].
template <class T>
Matrix<T> first_rows(const Matrix<T>& m, Index B, Index len, Index rows) {
  Matrix<T> out(B * rows, m.cols());
  for (Index b = 0; b < B; ++b) out.middleRows(b * rows, rows) = m.middleRows(b * len, rows);
  return out;
}

template <class T>
void check_multi_head(Index len, bool with_state, Normalization norm, Tracker& tr) {
  const Index B = 2, H = 3, dk = 4, dv = 3;
  const Index bad_b = 1, bad_h = 1;  // the one (sequence, head) pair that sees the bad value
  const std::vector<double> gammas = {0.9, 0.96875, 1.0};
  const Matrix<T> Q0 = random_matrix<T>(B * len, H * dk, 101 + static_cast<std::uint64_t>(len));
  const Matrix<T> K0 = random_matrix<T>(B * len, H * dk, 102 + static_cast<std::uint64_t>(len));
  const Matrix<T> V0 = random_matrix<T>(B * len, H * dv, 103 + static_cast<std::uint64_t>(len));
  std::vector<RetentionState<T>> init(static_cast<std::size_t>(B * H), RetentionState<T>(dk, dv));
  for (std::size_t i = 0; i < init.size(); ++i) {
    init[i].S = random_matrix<T>(dk, dv, 200 + i);
    init[i].z = random_matrix<T>(dk, 1, 300 + i);
    init[i].position = 4;
  }
  const double tol = 10 * spec_tolerance<T>();

  struct Result {
    Matrix<T> out;
    std::vector<RetentionState<T>> finals;
  };
  const auto run = [&](const FormRun& f, const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                       Index rows) {
    Result r;
    r.out.resize(B * rows, H * dv);
    retention::MultiHeadOptions<T> o;
    o.form = f.form;
    o.chunk = f.chunk;
    o.normalization = norm;
    if (with_state) o.initial_states = &init;
    o.final_states = &r.finals;
    retention::multi_head_retention(Q.data(), K.data(), V.data(), r.out.data(),
                                    retention::MultiHeadShape{B, rows, H, dk, dv}, gammas, o);
    return r;
  };
  const auto head = [&](const Matrix<T>& m, Index b, Index h, Index rows, Index dim, Index ld) {
    return m.block(b * ld, h * dim, rows, dim);
  };

  const std::vector<FormRun> forms = forms_for(len);
  std::vector<Result> clean;
  for (const FormRun& f : forms) clean.push_back(run(f, Q0, K0, V0, len));

  for (Index t : bad_tokens(len)) {
    // Clean prefix runs (rows < t), per form, and the reference of the bad pair's prefix.
    std::vector<Result> prefix;
    Mat want;
    if (t > 0) {
      const Matrix<T> Qt = first_rows(Q0, B, len, t), Kt = first_rows(K0, B, len, t),
                      Vt = first_rows(V0, B, len, t);
      for (const FormRun& f : forms) prefix.push_back(run(f, Qt, Kt, Vt, t));
      retention_reference::State rinit;
      const auto& s = init[static_cast<std::size_t>(bad_b * H + bad_h)];
      rinit.S = s.S.template cast<double>();
      rinit.z = s.z.template cast<double>();
      rinit.position = s.position;
      want = retention_reference::retention(
          head(Q0, bad_b, bad_h, t, dk, len).template cast<double>(),
          head(K0, bad_b, bad_h, t, dk, len).template cast<double>(),
          head(V0, bad_b, bad_h, t, dv, len).template cast<double>(),
          gammas[static_cast<std::size_t>(bad_h)], norm, with_state ? &rinit : nullptr);
    }
    for (int which = 0; which < 3; ++which)
      for (const auto& [bad, bad_name] : bad_values<T>()) {
        Matrix<T> Q = Q0, K = K0, V = V0;
        Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
        const Index dim = which == 2 ? dv : dk;
        X(bad_b * len + t, bad_h * dim + (t * 3) % dim) = bad;
        const std::string what = std::string(which == 0 ? "q" : (which == 1 ? "k" : "v")) + " = " +
                                 bad_name + " at token " + std::to_string(t) + " of T " +
                                 std::to_string(len) + ", norm " + retention::to_string(norm) +
                                 (with_state ? ", initial states" : "");
        Matrix<T> first_form_rows;
        for (std::size_t fi = 0; fi < forms.size(); ++fi) {
          const std::string where = forms[fi].name() + ", " + what;
          const Result r = run(forms[fi], Q, K, V, len);
          for (Index b = 0; b < B; ++b)
            for (Index h = 0; h < H; ++h) {
              const std::string pair =
                  where + ", (b, h) = (" + std::to_string(b) + ", " + std::to_string(h) + ")";
              const auto got = head(r.out, b, h, len, dv, len);
              if (b != bad_b || h != bad_h) {
                // Heads and sequences are independent: untouched entirely, final state too.
                tr.close(got, head(clean[fi].out, b, h, len, dv, len), tol, pair);
                const std::size_t i = static_cast<std::size_t>(b * H + h);
                tr.close(r.finals[i].S, clean[fi].finals[i].S, tol, pair + ", final S");
                tr.close(r.finals[i].z, clean[fi].finals[i].z, tol, pair + ", final z");
                EXPECT_EQ(r.finals[i].position, clean[fi].finals[i].position) << pair;
              } else if (t > 0) {
                tr.close(got.topRows(t), head(prefix[fi].out, b, h, t, dv, t), tol,
                         pair + ", rows before t vs the clean prefix");
                tr.close(got.topRows(t), want, tol, pair + ", rows before t vs the reference");
              }
            }
          // The forms agree on the bad pair's rows before t.
          if (t > 0) {
            const Matrix<T> rows = head(r.out, bad_b, bad_h, t, dv, len);
            if (fi == 0)
              first_form_rows = rows;
            else
              tr.close(rows, first_form_rows, tol, where + ", against the recurrent form");
          }
        }
      }
  }
}

TYPED_TEST(NonFiniteLayers, MultiHeadRetention) {
  using T = TypeParam;
  Tracker tr{"multi_head_retention"};
  for (Index len : {Index(13), Index(17)}) {
    check_multi_head<T>(len, false, Normalization::decay_and_score, tr);
    check_multi_head<T>(len, true, Normalization::none, tr);
  }
  check_multi_head<T>(13, true, Normalization::decay, tr);
  tr.report();
}

// =================================================================================================
// MultiScaleRetention
// =================================================================================================

/// The double reference layer with the library layer's weights (no biases).
template <class T>
msr_reference::Layer reference_of(const retention::MultiScaleRetention<T>& l) {
  msr_reference::Layer r;
  r.embed_dim = l.embed_dim();
  r.value_dim = l.value_dim();
  r.heads = l.heads();
  r.gammas = l.gammas();
  r.normalization = l.config().normalization;
  r.head_norm = l.config().head_norm;
  r.eps = l.config().eps;
  r.wq = l.q_proj().weight().template cast<double>();
  r.wk = l.k_proj().weight().template cast<double>();
  r.wv = l.v_proj().weight().template cast<double>();
  r.wg = l.g_proj().weight().template cast<double>();
  r.wo = l.out_proj().weight().template cast<double>();
  return r;
}

template <class T>
retention::MultiScaleRetention<T> make_msr(Normalization norm, retention::HeadNorm head_norm,
                                           std::uint64_t seed) {
  retention::MsrConfig c;
  c.embed_dim = 8;
  c.value_dim = 12;
  c.heads = 2;
  c.normalization = norm;
  c.head_norm = head_norm;
  retention::MultiScaleRetention<T> l(c);
  l.init_random(seed);
  return l;
}

template <class T>
void check_states_equal(const retention::MsrState<T>& got, const retention::MsrState<T>& want,
                        double tol, Tracker& tr, const std::string& where) {
  ASSERT_EQ(got.heads.size(), want.heads.size()) << where;
  EXPECT_EQ(got.position, want.position) << where;
  for (std::size_t h = 0; h < got.heads.size(); ++h) {
    tr.close(got.heads[h].S, want.heads[h].S, tol, where + ", S of head " + std::to_string(h));
    tr.close(got.heads[h].z, want.heads[h].z, tol, where + ", z of head " + std::to_string(h));
  }
}

template <class T>
void check_msr_forward_and_decode(const retention::MultiScaleRetention<T>& layer, Index len,
                                  Tracker& tr) {
  const Index d = layer.embed_dim();
  const double tol = 10 * spec_tolerance<T>();
  const Matrix<T> x0 = random_matrix<T>(len, d, 500 + static_cast<std::uint64_t>(len));
  const msr_reference::Layer ref = reference_of(layer);
  const std::vector<FormRun> forms = forms_for(len);
  for (Index t : bad_tokens(len)) {
    const Mat want =
        t > 0 ? msr_reference::forward(ref, x0.topRows(t).template cast<double>()) : Mat();
    std::vector<Matrix<T>> prefix;
    if (t > 0)
      for (const FormRun& f : forms)
        prefix.push_back(layer.forward(x0.topRows(t), f.form, f.chunk));
    for (const auto& [bad, bad_name] : bad_values<T>()) {
      Matrix<T> x = x0;
      x(t, (t * 5) % d) = bad;
      const std::string what =
          "x = " + bad_name + " at token " + std::to_string(t) + " of T " + std::to_string(len);
      Matrix<T> first_form_rows;
      for (std::size_t fi = 0; fi < forms.size(); ++fi) {
        const FormRun& f = forms[fi];
        const std::string where = "forward " + f.name() + ", " + what;
        const Matrix<T> y = layer.forward(x, f.form, f.chunk);
        ASSERT_EQ(y.rows(), len);
        if (t == 0) continue;
        tr.close(y.topRows(t), prefix[fi], tol, where + ", vs the clean prefix");
        tr.close(y.topRows(t), want, tol, where + ", vs the reference");
        if (fi == 0)
          first_form_rows = y.topRows(t);
        else
          tr.close(y.topRows(t), first_form_rows, tol, where + ", vs the recurrent form");
        // Prefill of the first P tokens in this form, then step() decoding of the rest: the bad
        // token lands in the prompt (t < P) or in decoding (t >= P).
        for (Index P : {Index(1), Index(5), len - 2}) {
          auto state = layer.make_state();
          Matrix<T> yd(len, d);
          yd.topRows(P) = layer.prefill(x.topRows(P), state, f.form, f.chunk);
          for (Index n = P; n < len; ++n) yd.row(n) = layer.step(x.row(n), state);
          tr.close(yd.topRows(t), prefix[fi], tol,
                   "prefill " + std::to_string(P) + " + step, " + f.name() + ", " + what);
        }
      }
    }
  }
}

template <class T>
void check_msr_packed(const retention::MultiScaleRetention<T>& layer, Index len, Tracker& tr) {
  using State = retention::MsrState<T>;
  const Index d = layer.embed_dim();
  const double tol = 10 * spec_tolerance<T>();
  // Four prompts, one of them empty; the bad token goes into prompt 1. Prompt 0 continues a state
  // that has already seen three tokens (its own position).
  const std::vector<Index> lengths = {5, len, 0, 7};
  const Index bad_seq = 1;
  std::vector<Index> cu = {0};
  for (Index n : lengths) cu.push_back(cu.back() + n);
  const Matrix<T> x0 = random_matrix<T>(cu.back(), d, 600 + static_cast<std::uint64_t>(len));
  std::vector<State> start(lengths.size(), layer.make_state());
  layer.prefill(random_matrix<T>(3, d, 601), start[0]);
  const auto prompt = [&](const Matrix<T>& x, std::size_t b) {
    return Matrix<T>(x.middleRows(cu[b], lengths[b]));
  };
  for (const FormRun& f : forms_for(len)) {
    // Solo runs of the clean prompts, their states, and one more decoding step from each.
    std::vector<Matrix<T>> solo(lengths.size());
    std::vector<State> solo_state = start;
    for (std::size_t b = 0; b < lengths.size(); ++b)
      if (lengths[b] > 0) solo[b] = layer.prefill(prompt(x0, b), solo_state[b], f.form, f.chunk);
    const Matrix<T> next = random_matrix<T>(static_cast<Index>(lengths.size()), d, 602);
    for (Index t : bad_tokens(len)) {
      Matrix<T> solo_prefix;
      if (t > 0) {
        State s = start[static_cast<std::size_t>(bad_seq)];
        solo_prefix = layer.prefill(prompt(x0, bad_seq).topRows(t), s, f.form, f.chunk);
      }
      for (const auto& [bad, bad_name] : bad_values<T>()) {
        Matrix<T> x = x0;
        x(cu[static_cast<std::size_t>(bad_seq)] + t, (t * 3) % d) = bad;
        const std::string where = "prefill_packed " + f.name() + ", x = " + bad_name +
                                  " at token " + std::to_string(t) + " of prompt 1";
        std::vector<State> states = start;
        std::vector<State*> ptrs;
        for (auto& s : states) ptrs.push_back(&s);
        const Matrix<T> y = layer.prefill_packed(x, cu, ptrs, f.form, f.chunk);
        ASSERT_EQ(y.rows(), cu.back());
        for (std::size_t b = 0; b < lengths.size(); ++b) {
          const std::string seq = where + ", prompt " + std::to_string(b);
          if (static_cast<Index>(b) == bad_seq) {
            if (t > 0) tr.close(y.middleRows(cu[b], t), solo_prefix, tol, seq + ", rows before t");
            EXPECT_EQ(states[b].position, start[b].position + lengths[b]) << seq;
            continue;
          }
          if (lengths[b] > 0) tr.close(y.middleRows(cu[b], lengths[b]), solo[b], tol, seq);
          check_states_equal(states[b], solo_state[b], tol, tr, seq + ", final state");
          // Decoding goes on correctly from the packed call's states.
          State a = states[b], c = solo_state[b];
          tr.close(layer.step(next.row(static_cast<Index>(b)), a),
                   layer.step(next.row(static_cast<Index>(b)), c), tol, seq + ", next step");
        }
      }
    }
  }
}

template <class T>
void check_msr_step_batch(const retention::MultiScaleRetention<T>& layer, Tracker& tr) {
  using State = retention::MsrState<T>;
  const Index d = layer.embed_dim(), B = 3, steps = 6, bad_seq = 1;
  const double tol = 10 * spec_tolerance<T>();
  // Three sequences after clean prompts of different lengths, so each decodes at its own position.
  std::vector<State> start(static_cast<std::size_t>(B), layer.make_state());
  const Index prompts[] = {2, 5, 3};
  for (Index b = 0; b < B; ++b)
    layer.prefill(random_matrix<T>(prompts[b], d, 700 + static_cast<std::uint64_t>(b)),
                  start[static_cast<std::size_t>(b)]);
  // Token s of sequence b is row b of xs[s].
  std::vector<Matrix<T>> xs;
  for (Index s = 0; s < steps; ++s)
    xs.push_back(random_matrix<T>(B, d, 710 + static_cast<std::uint64_t>(s)));
  // Solo decoding of the clean tokens: outputs and states after every step.
  std::vector<std::vector<retention::RowVector<T>>> solo_y(static_cast<std::size_t>(B));
  std::vector<std::vector<State>> solo_s(static_cast<std::size_t>(B));
  for (Index b = 0; b < B; ++b) {
    State s = start[static_cast<std::size_t>(b)];
    for (Index k = 0; k < steps; ++k) {
      solo_y[static_cast<std::size_t>(b)].push_back(
          layer.step(xs[static_cast<std::size_t>(k)].row(b), s));
      solo_s[static_cast<std::size_t>(b)].push_back(s);
    }
  }
  for (Index s0 : {Index(0), Index(2), steps - 1})
    for (const auto& [bad, bad_name] : bad_values<T>()) {
      std::vector<State> states = start;
      std::vector<State*> ptrs;
      for (auto& s : states) ptrs.push_back(&s);
      typename retention::MultiScaleRetention<T>::BatchWorkspace work;
      Matrix<T> y(B, d);
      for (Index k = 0; k < steps; ++k) {
        Matrix<T> x = xs[static_cast<std::size_t>(k)];
        if (k == s0) x(bad_seq, (s0 * 3) % d) = bad;
        layer.step_batch(x, ptrs, y, work);
        for (Index b = 0; b < B; ++b) {
          const std::string where = "step_batch, x = " + bad_name + " for sequence 1 at step " +
                                    std::to_string(s0) + "; sequence " + std::to_string(b) +
                                    " at step " + std::to_string(k);
          const std::size_t ib = static_cast<std::size_t>(b), ik = static_cast<std::size_t>(k);
          if (b == bad_seq && k >= s0) continue;  // its rows from s0 on are unspecified
          tr.close(y.row(b), solo_y[ib][ik], tol, where);
          check_states_equal(states[ib], solo_s[ib][ik], tol, tr, where + ", state");
        }
      }
    }
}

TYPED_TEST(NonFiniteLayers, MultiScaleRetention) {
  using T = TypeParam;
  Tracker tr{"MultiScaleRetention"};
  const auto a = make_msr<T>(Normalization::decay_and_score, retention::HeadNorm::rms, 41);
  const auto b = make_msr<T>(Normalization::none, retention::HeadNorm::layer, 42);
  for (Index len : {Index(13), Index(17)}) check_msr_forward_and_decode(a, len, tr);
  check_msr_forward_and_decode(b, 13, tr);
  check_msr_packed(a, 13, tr);
  check_msr_packed(b, 17, tr);
  check_msr_step_batch(a, tr);
  check_msr_step_batch(b, tr);
  tr.report();
}

// =================================================================================================
// ViR
// =================================================================================================

/// Random parameters for vir_reference's names (one block), exactly representable in T so that
/// the T model and the double reference use the same values; LayerNorm weights and layer scales
/// near 1.
template <class T>
vir_reference::Params vir_params(const vir_reference::Config& c, std::uint64_t seed) {
  vir_reference::Params P;
  std::uint64_t s = seed * 100;
  for (const auto& [name, shape] : vir_reference::parameter_shapes(c)) {
    Index n = 1;
    for (Index e : shape) n *= e;
    const bool matrix = shape.size() >= 2 && name.find(".weight") != std::string::npos;
    const bool near_one =
        name.find(".gamma") != std::string::npos ||
        (name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos);
    const double amp = matrix ? 1.5 / std::sqrt(static_cast<double>(n / shape[0])) : 0.3;
    const Matrix<T> r = random_matrix<T>(1, n, ++s, amp);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      const double e = static_cast<double>(r(0, i));
      v[static_cast<std::size_t>(i)] = near_one ? static_cast<double>(static_cast<T>(1.0 + e)) : e;
    }
    P[name] = vir_reference::Param{shape, v};
  }
  return P;
}

template <class T>
void check_vir(Index len, Tracker& tr) {
  vir_reference::Config rc;
  rc.dim = 8;
  rc.heads = 2;
  rc.depth = 1;
  rc.hidden = 16;
  rc.gammas = {0.9, 1.0};
  const vir_reference::Params P = vir_params<T>(rc, 800 + static_cast<std::uint64_t>(len));
  retention::ParameterMap map;
  for (const auto& [name, p] : P) map.add(name, p.values.data(), p.shape);
  retention::VirRetention<T> mhr(rc.dim, rc.heads, rc.gammas);
  mhr.load(map, "blocks.0.retention.");
  retention::VirConfig cfg;
  cfg.embed_dim = rc.dim;
  cfg.heads = rc.heads;
  cfg.mlp_ratio = static_cast<double>(rc.hidden) / static_cast<double>(rc.dim);
  cfg.layer_norm_eps = rc.eps;
  cfg.gammas = rc.gammas;
  retention::VirBlock<T> block(cfg);
  block.load(map, "blocks.0.");

  const double tol = 10 * spec_tolerance<T>();
  const Matrix<T> x0 = random_matrix<T>(len, rc.dim, 900 + static_cast<std::uint64_t>(len));
  const std::vector<FormRun> forms = forms_for(len);
  using States = std::vector<RetentionState<T>>;
  // layer(x, options, states): VirRetention::forward or VirBlock::forward.
  using Layer = std::function<Matrix<T>(const Matrix<T>&, const retention::VirOptions&, States*)>;
  const Layer layers[] = {[&](const Matrix<T>& x, const retention::VirOptions& o, States* s) {
                            return mhr.forward(x, o, s);
                          },
                          [&](const Matrix<T>& x, const retention::VirOptions& o, States* s) {
                            return block.forward(x, o, s);
                          }};
  const char* names[] = {"VirRetention", "VirBlock"};
  const auto options = [](const FormRun& f) {
    retention::VirOptions o;
    o.form = f.form;
    o.chunk = f.chunk;
    return o;
  };
  for (Index t : bad_tokens(len)) {
    Mat want[2];
    if (t > 0) {
      const Mat xt = x0.topRows(t).template cast<double>();
      want[0] = vir_reference::mhr(xt, P, "blocks.0.", rc);
      want[1] = vir_reference::block(xt, P, "blocks.0.", rc);
    }
    for (int li = 0; li < 2; ++li) {
      std::vector<Matrix<T>> prefix;
      if (t > 0)
        for (const FormRun& f : forms)
          prefix.push_back(layers[li](x0.topRows(t), options(f), nullptr));
      for (const auto& [bad, bad_name] : bad_values<T>()) {
        Matrix<T> x = x0;
        x(t, (t * 5) % rc.dim) = bad;
        const std::string what = std::string(names[li]) + ", x = " + bad_name + " at token " +
                                 std::to_string(t) + " of T " + std::to_string(len);
        Matrix<T> first_form_rows;
        for (std::size_t fi = 0; fi < forms.size(); ++fi) {
          const std::string where = what + ", " + forms[fi].name();
          const Matrix<T> y = layers[li](x, options(forms[fi]), nullptr);
          ASSERT_EQ(y.rows(), len);
          // Two calls, the second continuing from the states the first leaves.
          const Index split = len / 2 + 1;
          States states;
          Matrix<T> y2(len, rc.dim);
          y2.topRows(split) = layers[li](x.topRows(split), options(forms[fi]), &states);
          y2.bottomRows(len - split) =
              layers[li](x.bottomRows(len - split), options(forms[fi]), &states);
          if (t == 0) continue;
          tr.close(y.topRows(t), prefix[fi], tol, where + ", vs the clean prefix");
          tr.close(y.topRows(t), want[li], tol, where + ", vs the reference");
          tr.close(y2.topRows(t), prefix[fi], tol, where + ", split at " + std::to_string(split));
          if (fi == 0)
            first_form_rows = y.topRows(t);
          else
            tr.close(y.topRows(t), first_form_rows, tol, where + ", vs the recurrent form");
        }
        // VirRetention::step, token by token from empty states.
        if (li == 0) {
          States states;
          Matrix<T> ys(len, rc.dim);
          for (Index n = 0; n < len; ++n) ys.row(n) = mhr.step(x.row(n), states);
          if (t > 0) tr.close(ys.topRows(t), want[0], tol, what + ", step");
        }
      }
    }
  }
}

TYPED_TEST(NonFiniteLayers, Vir) {
  using T = TypeParam;
  Tracker tr{"ViR"};
  check_vir<T>(13, tr);
  check_vir<T>(17, tr);
  tr.report();
}

// =================================================================================================
// MaSA / MaSAD
// =================================================================================================

namespace mref = masa_backward_reference;

/// Whether output n may depend on a bad q (which = 0), k (1) or v (2) at cell (r, c).
/// Quadrant-causal mask, MaSA: a query row reads only its own q, and keys/values m with
/// D[n, m] != 0, i.e. y_m <= y_n and x_m <= x_n. MaSAD (docs/math.md §4.3, row pass then column
/// pass): q[r, c] enters u[r, c] (row pass) and o[r, c] (column pass), and u[r, c] reaches o[y, c]
/// for y >= r; k[r, c] and v[r, c] enter u[r, x] for x >= c, hence o[y, x] for y >= r, x >= c.
/// Manhattan mask (every weight > 0): MaSA's q reaches its own row only; MaSAD's q reaches u[r, c],
/// hence the whole column c; k and v reach everything.
bool reaches(bool quadrant, bool decomposed, int which, Index n, Index r, Index c, Index W) {
  const Index y = n / W, x = n % W;
  if (quadrant) {
    if (which == 0) return decomposed ? (x == c && y >= r) : (y == r && x == c);
    return y >= r && x >= c;
  }
  if (which == 0) return decomposed ? x == c : (y == r && x == c);
  return true;
}

/// The rows of m (an [N, dv] head) for which keep(n) holds, stacked.
template <class M>
Matrix<double> rows_where(const M& m, const std::function<bool(Index)>& keep) {
  std::vector<Index> rows;
  for (Index n = 0; n < m.rows(); ++n)
    if (keep(n)) rows.push_back(n);
  Matrix<double> out(static_cast<Index>(rows.size()), m.cols());
  for (std::size_t i = 0; i < rows.size(); ++i)
    out.row(static_cast<Index>(i)) = m.row(rows[i]).template cast<double>();
  return out;
}

const std::vector<std::pair<Index, Index>> kCells = {{0, 0}, {0, 4}, {1, 2},
                                                     {2, 0}, {3, 1}, {3, 4}};

/// What a bad q (which = 0), k (1) or v (2) at cell (r, c) may reach besides the outputs
/// (reaches above), for the training forwards' saved state. MaSAD's row pass (u, row_lse) runs
/// along grid rows: q reaches its own token; k and v the tokens (r, x) that weigh (r, c) (x >= c
/// quadrant-causal, every x Manhattan); its lse does not read v. The column pass's lse reads q and
/// k only: q its own token, k the tokens (y, c) that weigh (r, c). MaSA's lse reads q and k as
/// its output does, not v.
bool reaches_u(bool quadrant, int which, Index n, Index r, Index c, Index W) {
  const Index y = n / W, x = n % W;
  if (which == 0) return y == r && x == c;
  return y == r && (!quadrant || x >= c);
}
bool reaches_row_lse(bool quadrant, int which, Index n, Index r, Index c, Index W) {
  return which != 2 && reaches_u(quadrant, which, n, r, c, W);
}
bool reaches_column_lse(bool quadrant, int which, Index n, Index r, Index c, Index W) {
  const Index y = n / W, x = n % W;
  if (which == 0) return y == r && x == c;
  return which == 1 && x == c && (!quadrant || y >= r);
}
bool reaches_masa_lse(bool quadrant, int which, Index n, Index r, Index c, Index W) {
  return which != 2 && reaches(quadrant, false, which, n, r, c, W);
}

/// The outputs a bad cell does not reach (clean_of(n)) against `want`: finite and equal to
/// rounding. The rows it does reach are unspecified (docs/math.md §2.6) and not checked.
template <class A, class B>
void check_masked_out(const A& got, const B& want, const std::function<bool(Index)>& clean_of,
                      double tol, Tracker& tr, const std::string& where) {
  tr.close(rows_where(got, clean_of), rows_where(want, clean_of), tol, where);
}

/// Places `bad` in one of q (0), k (1), v (2) at token n, in column (r + c) % columns.
template <class T>
void poison(Matrix<T>& Q, Matrix<T>& K, Matrix<T>& V, int which, Index row, Index col_seed, T bad) {
  Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
  X(row, col_seed % X.cols()) = bad;
}

std::string input_name(int which) {
  return std::string(which == 0 ? "q" : (which == 1 ? "k" : "v"));
}

/// Quadrant-causal MaSA (decomposed = false) or MaSAD with a bad value in one of `inputs` (0 q,
/// 1 k, 2 v) at each cell of kCells: single-head against the clean run (several tilings for MaSA)
/// and the double reference; multi-head with the bad value in pair (1, 0), every other pair
/// untouched.
template <class T>
void check_quadrant(bool decomposed, const std::vector<int>& inputs, Tracker& tr) {
  const double tol = 10 * spec_tolerance<T>();
  const std::string fn = decomposed ? "masad" : "masa";
  {  // Single head, 4 x 5 grid.
    const Index Hg = 4, Wg = 5, N = Hg * Wg, dk = 4, dv = 3;
    const double gamma = 0.9;
    const retention::QuadrantCausalDecay mask(gamma, Hg, Wg);
    const Matrix<T> Q0 = random_matrix<T>(N, dk, 1001), K0 = random_matrix<T>(N, dk, 1002);
    const Matrix<T> V0 = random_matrix<T>(N, dv, 1003);
    const Mat Qd = Q0.template cast<double>(), Kd = K0.template cast<double>(),
              Vd = V0.template cast<double>();
    const Mat want = decomposed
                         ? mref::masad(Qd, Kd, Vd, mref::MaskKind::quadrant_causal, gamma, Hg, Wg).O
                         : mref::masa(Qd, Kd, Vd, mref::MaskKind::quadrant_causal, gamma, Hg, Wg).O;
    // MaSA's tilings (query x key tile): the default, single entries, ragged tiles across grid
    // rows; MaSAD has no tiles.
    const Index tiles[][2] = {{64, 256}, {1, 1}, {3, 7}, {5, 4}};
    std::vector<retention::MasaOptions> tilings(decomposed ? 1 : 4);
    for (std::size_t i = 0; i < tilings.size(); ++i) {
      tilings[i].query_tile = tiles[i][0];
      tilings[i].key_tile = tiles[i][1];
    }
    const auto run = [&](const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                         const retention::MasaOptions& o) {
      return decomposed ? retention::masad(Q, K, V, mask, o) : retention::masa(Q, K, V, mask, o);
    };
    for (const retention::MasaOptions& o : tilings) {
      const Matrix<T> clean = run(Q0, K0, V0, o);
      for (const auto& cell : kCells)
        for (int which : inputs)
          for (const auto& [bad, bad_name] : bad_values<T>()) {
            const Index r = cell.first, c = cell.second;  // captured below (not bindings)
            Matrix<T> Q = Q0, K = K0, V = V0;
            poison(Q, K, V, which, r * Wg + c, r + c, bad);
            const Matrix<T> out = run(Q, K, V, o);
            ASSERT_EQ(out.rows(), N);
            const std::string where = fn + " tiles " + std::to_string(o.query_tile) + "x" +
                                      std::to_string(o.key_tile) + ", " + input_name(which) +
                                      " = " + bad_name + " at cell (" + std::to_string(r) + ", " +
                                      std::to_string(c) + ")";
            const auto clean_of = [&](Index n) {
              return !reaches(true, decomposed, which, n, r, c, Wg);
            };
            check_masked_out(out, clean, clean_of, tol, tr,
                             where + ", masked-out outputs vs the clean run");
            check_masked_out(out, want, clean_of, tol, tr,
                             where + ", masked-out outputs vs the reference");
          }
    }
  }
  {  // Multi-head: 2 images x 2 heads with their own gammas on a 3 x 5 grid.
    const Index B = 2, heads = 2, Hg = 3, Wg = 5, N = Hg * Wg, dk = 4, dv = 3;
    const Index bad_b = 1, bad_h = 0;
    const std::vector<retention::QuadrantCausalDecay> masks = {{0.9, Hg, Wg}, {0.75, Hg, Wg}};
    const Matrix<T> Q0 = random_matrix<T>(B * N, heads * dk, 1101);
    const Matrix<T> K0 = random_matrix<T>(B * N, heads * dk, 1102);
    const Matrix<T> V0 = random_matrix<T>(B * N, heads * dv, 1103);
    const auto run = [&](const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V) {
      Matrix<T> out(B * N, heads * dv);
      const auto q = retention::heads_view(Q.data(), B, N, heads, dk);
      const auto k = retention::heads_view(K.data(), B, N, heads, dk);
      const auto v = retention::heads_view(V.data(), B, N, heads, dv);
      const auto o = retention::heads_view(out.data(), B, N, heads, dv);
      if (decomposed)
        retention::multi_head_masad(q, k, v, o, masks);
      else
        retention::multi_head_masa(q, k, v, o, masks);
      return out;
    };
    const Matrix<T> clean = run(Q0, K0, V0);
    for (const auto& cell : kCells) {
      const Index r = cell.first, c = cell.second;
      if (r >= Hg) continue;
      for (int which : inputs)
        for (const auto& [bad, bad_name] : bad_values<T>()) {
          Matrix<T> Q = Q0, K = K0, V = V0;
          Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
          const Index dim = which == 2 ? dv : dk;
          X(bad_b * N + r * Wg + c, bad_h * dim + (r + c) % dim) = bad;
          const Matrix<T> out = run(Q, K, V);
          const std::string where = "multi_head_" + fn + ", " + input_name(which) + " = " +
                                    bad_name + " at cell (" + std::to_string(r) + ", " +
                                    std::to_string(c) + ")";
          for (Index b = 0; b < B; ++b)
            for (Index h = 0; h < heads; ++h) {
              const auto got = out.block(b * N, h * dv, N, dv);
              const auto ref = clean.block(b * N, h * dv, N, dv);
              const std::string pair =
                  where + ", pair (" + std::to_string(b) + ", " + std::to_string(h) + ")";
              if (b != bad_b || h != bad_h) {
                tr.close(got, ref, tol, pair + ", untouched");
                continue;
              }
              const auto clean_of = [&](Index n) {
                return !reaches(true, decomposed, which, n, r, c, Wg);
              };
              check_masked_out(got, ref, clean_of, tol, tr, pair + ", masked-out outputs");
            }
        }
    }
  }
}

// A bad query reaches only its own MaSA row: every other output is clean.
TYPED_TEST(NonFiniteLayers, MasaQuadrantCausalBadQuery) {
  using T = TypeParam;
  Tracker tr{"masa quadrant-causal, bad q"};
  check_quadrant<T>(false, {0}, tr);
  tr.report();
}

// A bad key or value at cell m may reach only outputs n with y_m <= y_n and x_m <= x_n (masked
// keys are skipped, never weighted by 0: docs/math.md §2.6).
TYPED_TEST(NonFiniteLayers, MasaQuadrantCausalBadKeyOrValue) {
  using T = TypeParam;
  Tracker tr{"masa quadrant-causal, bad k or v"};
  check_quadrant<T>(false, {1, 2}, tr);
  tr.report();
}

// MaSAD: q at (r, c) reaches o[y >= r, c]; k and v reach o[y >= r, x >= c] (see reaches()); in
// the column pass u is the value, so a bad u[r, c] must not reach o[y < r, c] either.
TYPED_TEST(NonFiniteLayers, MasadQuadrantCausal) {
  using T = TypeParam;
  Tracker tr{"masad quadrant-causal"};
  check_quadrant<T>(true, {0, 1, 2}, tr);
  tr.report();
}

// MaSAD on lines longer than the fused kernels take (64 tokens is the longest, float under
// AVX-512), so the tiled line path runs in every build: grids 3 x 70 (long row lines) and 70 x 3
// (long column lines), one head, bad q, k or v at a few cells; masked-out outputs against the
// clean run and the double reference.
TYPED_TEST(NonFiniteLayers, MasadQuadrantCausalLongLines) {
  using T = TypeParam;
  Tracker tr{"masad quadrant-causal, long lines"};
  const double tol = 10 * spec_tolerance<T>();
  const double gamma = 0.95;
  const Index dk = 3, dv = 5;
  for (const auto& grid : {std::pair<Index, Index>{3, 70}, std::pair<Index, Index>{70, 3}}) {
    // Plain variables: lambdas below capture them (C++17 lets no lambda capture a binding).
    const Index Hg = grid.first, Wg = grid.second;
    const Index N = Hg * Wg;
    const retention::QuadrantCausalDecay mask(gamma, Hg, Wg);
    const Matrix<T> Q0 = random_matrix<T>(N, dk, 1301), K0 = random_matrix<T>(N, dk, 1302);
    const Matrix<T> V0 = random_matrix<T>(N, dv, 1303);
    const Mat want =
        mref::masad(Q0.template cast<double>(), K0.template cast<double>(),
                    V0.template cast<double>(), mref::MaskKind::quadrant_causal, gamma, Hg, Wg)
            .O;
    const Matrix<T> clean = retention::masad(Q0, K0, V0, mask);
    tr.close(clean, want, tol, "clean run vs the reference");
    const std::vector<std::pair<Index, Index>> cells = {
        {0, 0}, {1, Wg / 2}, {Hg / 2, 1}, {Hg - 1, Wg - 1}};
    for (const auto& cell : cells)
      for (int which = 0; which < 3; ++which)
        for (const auto& [bad, bad_name] : bad_values<T>()) {
          const Index r = cell.first, c = cell.second;
          Matrix<T> Q = Q0, K = K0, V = V0;
          poison(Q, K, V, which, r * Wg + c, r + c, bad);
          const Matrix<T> out = retention::masad(Q, K, V, mask);
          const std::string where = std::to_string(Hg) + " x " + std::to_string(Wg) + ", " +
                                    input_name(which) + " = " + bad_name + " at cell (" +
                                    std::to_string(r) + ", " + std::to_string(c) + ")";
          const auto clean_of = [&](Index n) { return !reaches(true, true, which, n, r, c, Wg); };
          check_masked_out(out, clean, clean_of, tol, tr, where + ", vs the clean run");
          check_masked_out(out, want, clean_of, tol, tr, where + ", vs the reference");
        }
  }
  tr.report();
}

// The training forwards (masa_forward_train, masad_forward_train and their multi-head forms)
// follow the same rule: with a quadrant-causal mask, every output and saved value (lse, u,
// row_lse, column_lse) that the bad cell does not reach equals the clean run's. MaSAD's training
// forward batches short lines into groups sharing one product, so a bad key must not reach the
// other lines of its group either.
TYPED_TEST(NonFiniteLayers, MasaTrainingForwardQuadrantCausal) {
  using T = TypeParam;
  Tracker tr{"masa/masad training forwards quadrant-causal"};
  const double tol = 10 * spec_tolerance<T>();
  const Index Hg = 4, Wg = 5, N = Hg * Wg, dk = 4, dv = 3;
  const retention::QuadrantCausalDecay mask(0.9, Hg, Wg);
  const Matrix<T> Q0 = random_matrix<T>(N, dk, 1401), K0 = random_matrix<T>(N, dk, 1402);
  const Matrix<T> V0 = random_matrix<T>(N, dv, 1403);
  retention::MasaTrainOptions opt;
  opt.query_tile = 3;  // ragged tiles across grid rows
  opt.key_tile = 7;
  const auto masa_clean = retention::masa_forward_train(Q0, K0, V0, mask, opt);
  const auto masad_clean = retention::masad_forward_train(Q0, K0, V0, mask, opt);
  const auto vec = [](const retention::Vector<T>& v) { return Matrix<T>(v); };
  for (const auto& cell : kCells)
    for (int which = 0; which < 3; ++which)
      for (const auto& [bad, bad_name] : bad_values<T>()) {
        const Index r = cell.first, c = cell.second;
        Matrix<T> Q = Q0, K = K0, V = V0;
        poison(Q, K, V, which, r * Wg + c, r + c, bad);
        const std::string where = input_name(which) + " = " + bad_name + " at cell (" +
                                  std::to_string(r) + ", " + std::to_string(c) + ")";
        const auto clean = [&](bool (*reach)(bool, int, Index, Index, Index, Index)) {
          return [=](Index n) { return !reach(true, which, n, r, c, Wg); };
        };
        const auto f = retention::masa_forward_train(Q, K, V, mask, opt);
        check_masked_out(
            f.out, masa_clean.out,
            [&](Index n) { return !reaches(true, false, which, n, r, c, Wg); }, tol, tr,
            "masa_forward_train, " + where + ", out");
        check_masked_out(vec(f.lse), vec(masa_clean.lse), clean(reaches_masa_lse), tol, tr,
                         "masa_forward_train, " + where + ", lse");
        const auto g = retention::masad_forward_train(Q, K, V, mask, opt);
        check_masked_out(
            g.out, masad_clean.out,
            [&](Index n) { return !reaches(true, true, which, n, r, c, Wg); }, tol, tr,
            "masad_forward_train, " + where + ", out");
        check_masked_out(g.u, masad_clean.u, clean(reaches_u), tol, tr,
                         "masad_forward_train, " + where + ", u");
        check_masked_out(vec(g.row_lse), vec(masad_clean.row_lse), clean(reaches_row_lse), tol, tr,
                         "masad_forward_train, " + where + ", row_lse");
        check_masked_out(vec(g.column_lse), vec(masad_clean.column_lse), clean(reaches_column_lse),
                         tol, tr, "masad_forward_train, " + where + ", column_lse");
      }
  {  // Multi-head: 2 images x 2 heads, bad value in pair (1, 0); every other pair untouched.
    const Index B = 2, heads = 2, bad_b = 1, bad_h = 0;
    const std::vector<retention::QuadrantCausalDecay> masks = {{0.9, Hg, Wg}, {0.75, Hg, Wg}};
    const Matrix<T> MQ0 = random_matrix<T>(B * N, heads * dk, 1501);
    const Matrix<T> MK0 = random_matrix<T>(B * N, heads * dk, 1502);
    const Matrix<T> MV0 = random_matrix<T>(B * N, heads * dv, 1503);
    struct Saved {
      Matrix<T> out, u, lse, row_lse, column_lse;
    };
    const auto run = [&](const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                         bool decomposed) {
      Saved s;
      s.out.resize(B * N, heads * dv);
      s.u.resize(B * N, heads * dv);
      s.lse.resize(B * N, heads);
      s.row_lse.resize(B * N, heads);
      s.column_lse.resize(B * N, heads);
      const auto q = retention::heads_view(Q.data(), B, N, heads, dk);
      const auto k = retention::heads_view(K.data(), B, N, heads, dk);
      const auto v = retention::heads_view(V.data(), B, N, heads, dv);
      const auto view = [&](Matrix<T>& m, Index d) {
        return retention::heads_view(m.data(), B, N, heads, d);
      };
      if (decomposed)
        retention::multi_head_masad_forward_train(q, k, v, masks, view(s.out, dv), view(s.u, dv),
                                                  view(s.row_lse, 1), view(s.column_lse, 1), opt);
      else
        retention::multi_head_masa_forward_train(q, k, v, masks, view(s.out, dv), view(s.lse, 1),
                                                 opt);
      return s;
    };
    for (bool decomposed : {false, true}) {
      const Saved clean0 = run(MQ0, MK0, MV0, decomposed);
      for (const auto& cell : kCells)
        for (int which = 0; which < 3; ++which) {
          const Index r = cell.first, c = cell.second;
          Matrix<T> Q = MQ0, K = MK0, V = MV0;
          Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
          const Index dim = which == 2 ? dv : dk;
          X(bad_b * N + r * Wg + c, bad_h * dim + (r + c) % dim) =
              std::numeric_limits<T>::quiet_NaN();
          const Saved s = run(Q, K, V, decomposed);
          const std::string where = std::string(decomposed ? "multi_head_masad_forward_train"
                                                           : "multi_head_masa_forward_train") +
                                    ", " + input_name(which) + " = nan at cell (" +
                                    std::to_string(r) + ", " + std::to_string(c) + ")";
          for (Index b = 0; b < B; ++b)
            for (Index h = 0; h < heads; ++h) {
              const std::string pair =
                  where + ", pair (" + std::to_string(b) + ", " + std::to_string(h) + ")";
              const auto blk = [&](const Matrix<T>& m, Index d) {
                return m.block(b * N, h * d, N, d);
              };
              const bool bad_pair = b == bad_b && h == bad_h;
              const auto keep = [&](bool reached) { return !bad_pair || !reached; };
              check_masked_out(
                  blk(s.out, dv), blk(clean0.out, dv),
                  [&](Index n) { return keep(reaches(true, decomposed, which, n, r, c, Wg)); }, tol,
                  tr, pair + ", out");
              if (decomposed) {
                check_masked_out(
                    blk(s.u, dv), blk(clean0.u, dv),
                    [&](Index n) { return keep(reaches_u(true, which, n, r, c, Wg)); }, tol, tr,
                    pair + ", u");
                check_masked_out(
                    blk(s.row_lse, 1), blk(clean0.row_lse, 1),
                    [&](Index n) { return keep(reaches_row_lse(true, which, n, r, c, Wg)); }, tol,
                    tr, pair + ", row_lse");
                check_masked_out(
                    blk(s.column_lse, 1), blk(clean0.column_lse, 1),
                    [&](Index n) { return keep(reaches_column_lse(true, which, n, r, c, Wg)); },
                    tol, tr, pair + ", column_lse");
              } else {
                check_masked_out(
                    blk(s.lse, 1), blk(clean0.lse, 1),
                    [&](Index n) { return keep(reaches_masa_lse(true, which, n, r, c, Wg)); }, tol,
                    tr, pair + ", lse");
              }
            }
        }
    }
  }
  tr.report();
}

// Manhattan mask: every weight is > 0, so a bad key or value reaches every output of MaSA and
// (through both passes) of MaSAD. What the math requires and is asserted:
//   - a bad q at cell m reaches only MaSA's row m and MaSAD's column of m: the rest stays clean;
//   - any non-finite v makes every output row non-finite in both (each output is a sum with a
//     weight > 0 on v_m: one infinite or NaN term in a sum of finite ones stays non-finite).
// Not asserted, since docs/math.md §2.6 leaves outputs that depend on the bad token unspecified:
//   - +-Inf in k: the logit q_n . k_m is +Inf or -Inf by the sign of q_n's matching entry; -Inf
//     gives key m weight 0 (the row stays finite: the softmax over the other keys), +Inf gives
//     exp(Inf - Inf) = NaN in IEEE arithmetic although the limit is "all weight on m".
// A NaN anywhere is asserted to propagate, in float and double alike, by
// MasaManhattanNanPropagates.
TYPED_TEST(NonFiniteLayers, MasaManhattan) {
  using T = TypeParam;
  Tracker tr{"MaSA/MaSAD Manhattan"};
  const Index Hg = 3, Wg = 5, N = Hg * Wg, dk = 4, dv = 3;
  const double tol = 10 * spec_tolerance<T>();
  const retention::ManhattanDecay mask(0.9, Hg, Wg);
  const Matrix<T> Q0 = random_matrix<T>(N, dk, 1201), K0 = random_matrix<T>(N, dk, 1202);
  const Matrix<T> V0 = random_matrix<T>(N, dv, 1203);
  int all_bad_checks = 0;
  for (bool decomposed : {false, true}) {
    const Matrix<T> clean =
        decomposed ? retention::masad(Q0, K0, V0, mask) : retention::masa(Q0, K0, V0, mask);
    for (const auto& cell : kCells) {
      const Index r = cell.first, c = cell.second;
      if (r >= Hg) continue;
      for (int which = 0; which < 3; ++which)
        for (const auto& [bad, bad_name] : bad_values<T>()) {
          Matrix<T> Q = Q0, K = K0, V = V0;
          poison(Q, K, V, which, r * Wg + c, r + c, bad);
          const Matrix<T> out =
              decomposed ? retention::masad(Q, K, V, mask) : retention::masa(Q, K, V, mask);
          ASSERT_EQ(out.rows(), N);
          const std::string where = std::string(decomposed ? "masad" : "masa") + ", " +
                                    input_name(which) + " = " + bad_name + " at cell (" +
                                    std::to_string(r) + ", " + std::to_string(c) + ")";
          if (which == 0) {
            const auto clean_of = [&](Index n) {
              return !reaches(false, decomposed, which, n, r, c, Wg);
            };
            tr.close(rows_where(out, clean_of), rows_where(clean, clean_of), tol, where);
          } else if (which == 2) {
            ++all_bad_checks;
            for (Index n = 0; n < N; ++n)
              EXPECT_FALSE(out.row(n).allFinite()) << where << ", output " << n;
          }
        }
    }
  }
  EXPECT_GT(all_bad_checks, 0);
  tr.report();
}

/// Per output entry of a NaN run, row-major: 1 if NaN, 0 if finite, -1 if +-Inf.
template <class M>
std::vector<int> nan_entries(const M& m) {
  std::vector<int> e;
  for (Index n = 0; n < m.rows(); ++n)
    for (Index c = 0; c < m.cols(); ++c) {
      const double x = static_cast<double>(m(n, c));
      e.push_back(std::isnan(x) ? 1 : (std::isfinite(x) ? 0 : -1));
    }
  return e;
}

/// The NaN pattern of every MaSA / MaSAD entry point (inference, multi-head, training forward)
/// for a NaN in input `which` at cell (r, c) under a Manhattan mask, scalar type T.
template <class T>
std::vector<std::vector<int>> manhattan_nan_patterns(Index Hg, Index Wg, int which, Index r,
                                                     Index c, std::vector<std::string>& names) {
  const Index N = Hg * Wg, dk = 4, dv = 3;
  const retention::ManhattanDecay mask(0.9, Hg, Wg);
  // The same draws for float and double: double inputs rounded to float and back.
  Matrix<T> Q = random_matrix<double>(N, dk, 1601).cast<float>().template cast<T>();
  Matrix<T> K = random_matrix<double>(N, dk, 1602).cast<float>().template cast<T>();
  Matrix<T> V = random_matrix<double>(N, dv, 1603).cast<float>().template cast<T>();
  poison(Q, K, V, which, r * Wg + c, r + c, std::numeric_limits<T>::quiet_NaN());
  names = {"masa",
           "masad",
           "multi_head_masa",
           "multi_head_masad",
           "masa_forward_train",
           "masad_forward_train"};
  std::vector<std::vector<int>> p;
  p.push_back(nan_entries(retention::masa(Q, K, V, mask)));
  p.push_back(nan_entries(retention::masad(Q, K, V, mask)));
  const retention::GridHeadsShape shape{1, Hg, Wg, 1, dk, dv};
  p.push_back(nan_entries(retention::multi_head_masa(Q, K, V, shape, {0.9})));
  p.push_back(nan_entries(retention::multi_head_masad(Q, K, V, shape, {0.9})));
  p.push_back(nan_entries(retention::masa_forward_train(Q, K, V, mask).out));
  p.push_back(nan_entries(retention::masad_forward_train(Q, K, V, mask).out));
  return p;
}

// A NaN propagates to every output that depends on it, in float and double alike (docs/math.md
// §2.6; the float kernels' exp clamps its argument from below, and a clamp must not turn a NaN
// into a weight). Manhattan mask, every weight > 0: a NaN key or value reaches every output of
// MaSA and MaSAD; a NaN query reaches MaSA's own row and MaSAD's own column. Every output entry
// that depends on the NaN must be NaN (not merely non-finite), every other one finite, in float
// and in double (so both give the same pattern). Grids 3 x 5 (fused MaSAD lines) and 3 x 70 (long
// rows: the tiled line path).
TEST(NonFiniteLayersNan, MasaManhattanNanPropagates) {
  long checks = 0;
  for (const auto& [Hg, Wg] : {std::pair<Index, Index>{3, 5}, std::pair<Index, Index>{3, 70}})
    for (const auto& cell :
         {std::pair<Index, Index>{0, 0}, std::pair<Index, Index>{1, 2}, {Hg - 1, Wg - 1}})
      for (int which = 0; which < 3; ++which) {
        const Index r = cell.first, c = cell.second;
        std::vector<std::string> names;
        const auto pf = manhattan_nan_patterns<float>(Hg, Wg, which, r, c, names);
        const auto pd = manhattan_nan_patterns<double>(Hg, Wg, which, r, c, names);
        for (std::size_t e = 0; e < names.size(); ++e) {
          const bool decomposed = names[e].find("masad") != std::string::npos;
          const std::string where = names[e] + ", " + std::to_string(Hg) + " x " +
                                    std::to_string(Wg) + ", " + input_name(which) +
                                    " = nan at cell (" + std::to_string(r) + ", " +
                                    std::to_string(c) + ")";
          // A NaN in q or k makes every logit it enters NaN, hence the whole output row; a NaN
          // in entry j of v reaches entry j of the outputs only.
          const Index dv = 3, bad_col = (r + c) % dv;
          for (Index n = 0; n < Hg * Wg; ++n)
            for (Index j = 0; j < dv; ++j) {
              const bool reached = reaches(false, decomposed, which, n, r, c, Wg);
              const int want = reached && (which != 2 || j == bad_col) ? 1 : 0;
              const std::size_t i = static_cast<std::size_t>(n * dv + j);
              EXPECT_EQ(pf[e][i], want) << where << ", float, output " << n << ", entry " << j;
              EXPECT_EQ(pd[e][i], want) << where << ", double, output " << n << ", entry " << j;
              ++checks;
            }
        }
      }
  std::cout << "[nonfinite-layers] NaN under Manhattan: " << checks
            << " output entries checked in float and double\n";
  EXPECT_GT(checks, 0);
}

}  // namespace
