// retention Python module: multi-head retention in its three forms, the decoding step and the
// backward passes (docs/math.md §2, §7), over [B, T, H, D] arrays read and written in place.
#include "common.hpp"

#include <retention/backward.hpp>
#include <retention/multihead.hpp>

namespace retention_py {
namespace {

/// Optional States argument (None or a RetentionState).
States* optional_states(const py::object& o) { return o.is_none() ? nullptr : o.cast<States*>(); }

template <class T>
void forward_impl(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
                  const std::vector<double>& gammas, retention::Form form, Index chunk,
                  retention::Normalization norm, States* init, States* final_state, int threads) {
  const char* fn = "retention";
  const auto qv = heads_of<const T>(fn, "q", q, false);
  const auto kv = heads_of<const T>(fn, "k", k, false);
  const auto vv = heads_of<const T>(fn, "v", v, false);
  const auto ov = heads_of<T>(fn, "out", out, true);
  retention::MultiHeadOptions<T> opt;
  opt.form = form;
  opt.chunk = chunk;
  opt.normalization = norm;
  opt.threads = threads;
  if (init) {
    init->check(fn, "initial_state", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
    opt.initial_states = &init->get<T>();
  }
  if (final_state) {
    final_state->check(fn, "final_state", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
    opt.final_states = &final_state->get<T>();
  }
  const auto masks = retention::causal_masks(gammas);
  py::gil_scoped_release release;
  retention::multi_head_retention(qv, kv, vv, ov, masks, opt);
}

void forward(const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
             const std::vector<double>& gammas, const std::string& form, Index chunk,
             const std::string& normalization, const py::object& initial_state,
             const py::object& final_state, int threads) {
  const char* fn = "retention";
  const Scalar s = scalar_of(fn, "q", q);
  const py::array ka = as_array(fn, "k", k), va = as_array(fn, "v", v),
                  oa = as_array(fn, "out", out);
  check_scalar(fn, "k", ka, s);
  check_scalar(fn, "v", va, s);
  check_scalar(fn, "out", oa, s);
  const auto f = form_of(form);
  const auto n = normalization_of(normalization);
  States* init = optional_states(initial_state);
  States* fin = optional_states(final_state);
  if (s == Scalar::float64)
    forward_impl<double>(q, ka, va, oa, gammas, f, chunk, n, init, fin, threads);
  else
    forward_impl<float>(q, ka, va, oa, gammas, f, chunk, n, init, fin, threads);
}

template <class T>
void step_impl(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
               const std::vector<double>& gammas, States& state, retention::Normalization norm,
               int threads, retention::StepWorkspace<T>* ws) {
  const char* fn = "retention_step";
  const auto qv = heads_of<const T>(fn, "q", q, false, true);
  const auto kv = heads_of<const T>(fn, "k", k, false, true);
  const auto vv = heads_of<const T>(fn, "v", v, false, true);
  const auto ov = heads_of<T>(fn, "out", out, true, true);
  state.check(fn, "state", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
  const auto& masks = state.masks(gammas);
  py::gil_scoped_release release;
  retention::multi_head_step(qv, kv, vv, ov, masks, state.get<T>(), norm, threads, ws);
}

void step(const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
          const std::vector<double>& gammas, States& state, const std::string& normalization,
          int threads) {
  const char* fn = "retention_step";
  const Scalar s = scalar_of(fn, "q", q);
  const py::array ka = as_array(fn, "k", k), va = as_array(fn, "v", v),
                  oa = as_array(fn, "out", out);
  check_scalar(fn, "k", ka, s);
  check_scalar(fn, "v", va, s);
  check_scalar(fn, "out", oa, s);
  const auto n = normalization_of(normalization);
  if (s == Scalar::float64)
    step_impl<double>(q, ka, va, oa, gammas, state, n, threads, state.workspace64());
  else
    step_impl<float>(q, ka, va, oa, gammas, state, n, threads, state.workspace32());
}

template <class T>
void backward_impl(const py::array& q, const py::array& k, const py::array& v,
                   const py::array& d_out, const py::array& dq, const py::array& dk,
                   const py::array& dv, const std::vector<double>& gammas, retention::Form form,
                   Index chunk, retention::Normalization norm, bool detach, States* init,
                   States* final_grad, States* init_grad, int threads) {
  const char* fn = "retention_backward";
  const auto qv = heads_of<const T>(fn, "q", q, false);
  const auto kv = heads_of<const T>(fn, "k", k, false);
  const auto vv = heads_of<const T>(fn, "v", v, false);
  const auto gv = heads_of<const T>(fn, "d_out", d_out, false);
  const auto dqv = heads_of<T>(fn, "dq", dq, true);
  const auto dkv = heads_of<T>(fn, "dk", dk, true);
  const auto dvv = heads_of<T>(fn, "dv", dv, true);
  // Gradients must not alias the inputs or each other (the kernels write them while reading).
  for (const auto& o :
       {std::make_pair("dq", dqv), std::make_pair("dk", dkv), std::make_pair("dv", dvv)}) {
    for (const auto& i : {std::make_pair("q", qv), std::make_pair("k", kv), std::make_pair("v", vv),
                          std::make_pair("d_out", gv)})
      check_disjoint(fn, o.first, o.second, i.first, i.second);
  }
  check_disjoint(fn, "dq", dqv, "dk", dkv);
  check_disjoint(fn, "dq", dqv, "dv", dvv);
  check_disjoint(fn, "dk", dkv, "dv", dvv);
  retention::MultiHeadBackwardOptions<T> opt;
  opt.form = form;
  opt.chunk = chunk;
  opt.normalization = norm;
  opt.detach_score_normalizer = detach;
  opt.threads = threads;
  if (init) {
    init->check(fn, "initial_state", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
    opt.initial_states = &init->get<T>();
  }
  if (final_grad) {
    final_grad->check(fn, "final_state_grad", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
    opt.final_state_gradients = &final_grad->get<T>();
  }
  std::vector<retention::RetentionState<T>> grads;
  if (init_grad) {
    if (!init) value_error(std::string(fn) + ": initial_state_grad needs initial_state");
    init_grad->check(fn, "initial_state_grad", qv.batch, qv.heads, qv.dim, vv.dim, scalar_of<T>());
    opt.initial_state_gradients = &grads;
  }
  {
    py::gil_scoped_release release;
    retention::multi_head_retention_backward(qv, kv, vv, gv, gammas, dqv, dkv, dvv, opt);
  }
  if (init_grad) init_grad->get<T>().swap(grads);
}

void backward(const py::array& q, const py::handle& k, const py::handle& v, const py::handle& d_out,
              const py::handle& dq, const py::handle& dk, const py::handle& dv,
              const std::vector<double>& gammas, const std::string& form, Index chunk,
              const std::string& normalization, bool detach, const py::object& initial_state,
              const py::object& final_state_grad, const py::object& initial_state_grad,
              int threads) {
  const char* fn = "retention_backward";
  const Scalar s = scalar_of(fn, "q", q);
  const char* names[] = {"k", "v", "d_out", "dq", "dk", "dv"};
  const py::handle handles[] = {k, v, d_out, dq, dk, dv};
  py::array a[6];
  for (int i = 0; i < 6; ++i) {
    a[i] = as_array(fn, names[i], handles[i]);
    check_scalar(fn, names[i], a[i], s);
  }
  const auto f = form_of(form);
  const auto n = normalization_of(normalization);
  States* init = optional_states(initial_state);
  States* fg = optional_states(final_state_grad);
  States* ig = optional_states(initial_state_grad);
  if (s == Scalar::float64)
    backward_impl<double>(q, a[0], a[1], a[2], a[3], a[4], a[5], gammas, f, chunk, n, detach, init,
                          fg, ig, threads);
  else
    backward_impl<float>(q, a[0], a[1], a[2], a[3], a[4], a[5], gammas, f, chunk, n, detach, init,
                         fg, ig, threads);
}

}  // namespace

void bind_retention(py::module_& m) {
  m.def("retention_into", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("gammas"), py::arg("form") = "chunkwise", py::arg("chunk") = 0,
        py::arg("normalization") = "none", py::arg("initial_state") = py::none(),
        py::arg("final_state") = py::none(), py::arg("threads") = 0,
        R"doc(Multi-head retention written into out (docs/math.md §2).
q, k [B, T, H, dk], v and out [B, T, H, dv] float32/float64 arrays, any non-negative strides with
a contiguous last dimension (no copies). gammas: H floats in (0, 1]. initial_state / final_state:
RetentionState objects (final_state may be initial_state). The GIL is released while it runs.)doc");
  m.def("retention_step_into", &step, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("gammas"), py::arg("state"), py::arg("normalization") = "none",
        py::arg("threads") = 0,
        R"doc(One decoding step: q, k [B, H, dk], v and out [B, H, dv] (or [B, 1, H, D]); state
(a RetentionState) advances in place.)doc");
  m.def("retention_backward_into", &backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("d_out"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("gammas"),
        py::arg("form") = "chunkwise", py::arg("chunk") = 0, py::arg("normalization") = "none",
        py::arg("detach_score_normalizer") = false, py::arg("initial_state") = py::none(),
        py::arg("final_state_grad") = py::none(), py::arg("initial_state_grad") = py::none(),
        py::arg("threads") = 0,
        R"doc(Gradients of retention (docs/math.md §7) written into dq, dk [B, T, H, dk] and
dv [B, T, H, dv] from d_out = dL/dout [B, T, H, dv]. final_state_grad: dL/d(final state) as a
RetentionState; initial_state_grad (needs initial_state) receives dL/d(initial state).)doc");
}

}  // namespace retention_py
