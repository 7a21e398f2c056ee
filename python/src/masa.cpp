// retention Python module: RMT's Manhattan self-attention MaSA and its decomposed form MaSAD
// (docs/math.md §4), forward, forward for training (with the saved softmax statistics) and
// backward (§7), over [B, N, H, D] arrays (N = height * width tokens in raster order).
#include "common.hpp"

#include <retention/masa.hpp>
#include <retention/masa_backward.hpp>

namespace retention_py {
namespace {

using retention::HeadsView;

/// The arrays of one call: inputs first (read-only views), then outputs (written in place).
struct Operands {
  std::vector<py::array> in, out;
};

/// Converts and type-checks every operand against q's dtype.
Operands operands(const char* fn, const py::array& q,
                  std::initializer_list<std::pair<const char*, py::handle>> inputs,
                  std::initializer_list<std::pair<const char*, py::handle>> outputs, Scalar& s) {
  s = scalar_of(fn, "q", q);
  Operands o;
  o.in.push_back(q);
  for (const auto& i : inputs) {
    o.in.push_back(as_array(fn, i.first, i.second));
    check_scalar(fn, i.first, o.in.back(), s);
  }
  for (const auto& i : outputs) {
    o.out.push_back(as_array(fn, i.first, i.second));
    check_scalar(fn, i.first, o.out.back(), s);
  }
  return o;
}

/// Views of the operands; each output is checked against every input and every other output.
template <class T>
struct Views {
  std::vector<HeadsView<const T>> in;
  std::vector<HeadsView<T>> out;
};

template <class T>
Views<T> views(const char* fn, const Operands& o, const std::vector<const char*>& in_names,
               const std::vector<const char*>& out_names) {
  Views<T> v;
  for (std::size_t i = 0; i < o.in.size(); ++i)
    v.in.push_back(heads_of<const T>(fn, in_names[i], o.in[i], false));
  for (std::size_t i = 0; i < o.out.size(); ++i)
    v.out.push_back(heads_of<T>(fn, out_names[i], o.out[i], true));
  for (std::size_t i = 0; i < v.out.size(); ++i) {
    for (std::size_t j = 0; j < v.in.size(); ++j)
      check_disjoint(fn, out_names[i], v.out[i], in_names[j], v.in[j]);
    for (std::size_t j = i + 1; j < v.out.size(); ++j)
      check_disjoint(fn, out_names[i], v.out[i], out_names[j], v.out[j]);
  }
  return v;
}

std::vector<retention::ManhattanDecay> masks_of(const char* fn, const std::vector<double>& gammas,
                                                Index height, Index width) {
  retention::detail::check_positive(fn, "height", height);
  retention::detail::check_positive(fn, "width", width);
  for (double g : gammas) retention::detail::check_gamma(fn, g);
  return retention::manhattan_masks(gammas, height, width);
}

// ---- inference forward ----------------------------------------------------------------------

template <class T>
void attend_impl(bool decomposed, const Operands& o, const std::vector<double>& gammas,
                 Index height, Index width, int threads) {
  const char* fn = decomposed ? "masad" : "masa";
  const auto v = views<T>(fn, o, {"q", "k", "v"}, {"out"});
  const auto masks = masks_of(fn, gammas, height, width);
  retention::MasaOptions opt;
  opt.threads = threads;
  py::gil_scoped_release release;
  if (decomposed)
    retention::multi_head_masad(v.in[0], v.in[1], v.in[2], v.out[0], masks, opt);
  else
    retention::multi_head_masa(v.in[0], v.in[1], v.in[2], v.out[0], masks, opt);
}

void attend(bool decomposed, const py::array& q, const py::handle& k, const py::handle& v,
            const py::handle& out, const std::vector<double>& gammas, Index height, Index width,
            int threads) {
  const char* fn = decomposed ? "masad" : "masa";
  Scalar s;
  const Operands o = operands(fn, q, {{"k", k}, {"v", v}}, {{"out", out}}, s);
  if (s == Scalar::float64)
    attend_impl<double>(decomposed, o, gammas, height, width, threads);
  else
    attend_impl<float>(decomposed, o, gammas, height, width, threads);
}

// ---- training: forward with saved statistics, backward --------------------------------------

template <class T>
void masa_train_impl(const Operands& o, const std::vector<double>& gammas, Index height,
                     Index width, int threads) {
  const char* fn = "masa_forward_train";
  const auto v = views<T>(fn, o, {"q", "k", "v"}, {"out", "lse"});
  const auto masks = masks_of(fn, gammas, height, width);
  retention::MasaTrainOptions opt;
  opt.threads = threads;
  py::gil_scoped_release release;
  retention::multi_head_masa_forward_train(v.in[0], v.in[1], v.in[2], masks, v.out[0], v.out[1],
                                           opt);
}

template <class T>
void masa_backward_impl(const Operands& o, const std::vector<double>& gammas, Index height,
                        Index width, int threads) {
  const char* fn = "masa_backward";
  const auto v = views<T>(fn, o, {"q", "k", "v", "out", "lse", "d_out"}, {"dq", "dk", "dv"});
  const auto masks = masks_of(fn, gammas, height, width);
  retention::MasaTrainOptions opt;
  opt.threads = threads;
  py::gil_scoped_release release;
  retention::multi_head_masa_backward(v.in[0], v.in[1], v.in[2], masks, v.in[3], v.in[4], v.in[5],
                                      v.out[0], v.out[1], v.out[2], opt);
}

template <class T>
void masad_train_impl(const Operands& o, const std::vector<double>& gammas, Index height,
                      Index width, int threads) {
  const char* fn = "masad_forward_train";
  const auto v = views<T>(fn, o, {"q", "k", "v"}, {"out", "u", "row_lse", "column_lse"});
  const auto masks = masks_of(fn, gammas, height, width);
  retention::MasaTrainOptions opt;
  opt.threads = threads;
  py::gil_scoped_release release;
  retention::multi_head_masad_forward_train(v.in[0], v.in[1], v.in[2], masks, v.out[0], v.out[1],
                                            v.out[2], v.out[3], opt);
}

template <class T>
void masad_backward_impl(const Operands& o, const std::vector<double>& gammas, Index height,
                         Index width, int threads) {
  const char* fn = "masad_backward";
  const auto v = views<T>(fn, o, {"q", "k", "v", "out", "u", "row_lse", "column_lse", "d_out"},
                          {"dq", "dk", "dv"});
  const auto masks = masks_of(fn, gammas, height, width);
  retention::MasaTrainOptions opt;
  opt.threads = threads;
  py::gil_scoped_release release;
  retention::multi_head_masad_backward(v.in[0], v.in[1], v.in[2], masks, v.in[3], v.in[4], v.in[5],
                                       v.in[6], v.in[7], v.out[0], v.out[1], v.out[2], opt);
}

template <void (*F64)(const Operands&, const std::vector<double>&, Index, Index, int),
          void (*F32)(const Operands&, const std::vector<double>&, Index, Index, int)>
void dispatch(const Operands& o, Scalar s, const std::vector<double>& gammas, Index height,
              Index width, int threads) {
  if (s == Scalar::float64)
    F64(o, gammas, height, width, threads);
  else
    F32(o, gammas, height, width, threads);
}

}  // namespace

void bind_masa(py::module_& m) {
  m.def(
      "masa_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const std::vector<double>& gammas, Index height, Index width,
         int threads) { attend(false, q, k, v, out, gammas, height, width, threads); },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("gammas"),
      py::arg("height"), py::arg("width"), py::arg("threads") = 0,
      R"doc(MaSA written into out: per head softmax_row(q k^T + ln D) v with the Manhattan decay
of gammas[h] on a height x width grid. q, k [B, N, H, dk], v and out [B, N, H, dv], N = height *
width tokens in raster order.)doc");
  m.def(
      "masad_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const std::vector<double>& gammas, Index height, Index width,
         int threads) { attend(true, q, k, v, out, gammas, height, width, threads); },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("gammas"),
      py::arg("height"), py::arg("width"), py::arg("threads") = 0,
      "MaSAD (rows, then columns) written into out; operands as masa_into.");
  m.def(
      "masa_forward_train_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const py::handle& lse, const std::vector<double>& gammas, Index height, Index width,
         int threads) {
        Scalar s;
        const auto o = operands("masa_forward_train", q, {{"k", k}, {"v", v}},
                                {{"out", out}, {"lse", lse}}, s);
        dispatch<masa_train_impl<double>, masa_train_impl<float>>(o, s, gammas, height, width,
                                                                  threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("gammas"),
      py::arg("height"), py::arg("width"), py::arg("threads") = 0,
      "MaSA forward for training: out [B, N, H, dv] and the row log-sum-exp lse [B, N, H].");
  m.def(
      "masa_backward_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const py::handle& lse, const py::handle& d_out, const py::handle& dq, const py::handle& dk,
         const py::handle& dv, const std::vector<double>& gammas, Index height, Index width,
         int threads) {
        Scalar s;
        const auto o = operands("masa_backward", q,
                                {{"k", k}, {"v", v}, {"out", out}, {"lse", lse}, {"d_out", d_out}},
                                {{"dq", dq}, {"dk", dk}, {"dv", dv}}, s);
        dispatch<masa_backward_impl<double>, masa_backward_impl<float>>(o, s, gammas, height, width,
                                                                        threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("d_out"),
      py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("gammas"), py::arg("height"),
      py::arg("width"), py::arg("threads") = 0,
      "MaSA backward from masa_forward_train's out and lse: writes dq, dk, dv.");
  m.def(
      "masad_forward_train_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const py::handle& u, const py::handle& row_lse, const py::handle& column_lse,
         const std::vector<double>& gammas, Index height, Index width, int threads) {
        Scalar s;
        const auto o =
            operands("masad_forward_train", q, {{"k", k}, {"v", v}},
                     {{"out", out}, {"u", u}, {"row_lse", row_lse}, {"column_lse", column_lse}}, s);
        dispatch<masad_train_impl<double>, masad_train_impl<float>>(o, s, gammas, height, width,
                                                                    threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("u"), py::arg("row_lse"),
      py::arg("column_lse"), py::arg("gammas"), py::arg("height"), py::arg("width"),
      py::arg("threads") = 0,
      "MaSAD forward for training: out and the row pass's u [B, N, H, dv], both passes' "
      "log-sum-exp [B, N, H].");
  m.def(
      "masad_backward_into",
      [](const py::array& q, const py::handle& k, const py::handle& v, const py::handle& out,
         const py::handle& u, const py::handle& row_lse, const py::handle& column_lse,
         const py::handle& d_out, const py::handle& dq, const py::handle& dk, const py::handle& dv,
         const std::vector<double>& gammas, Index height, Index width, int threads) {
        Scalar s;
        const auto o = operands("masad_backward", q,
                                {{"k", k},
                                 {"v", v},
                                 {"out", out},
                                 {"u", u},
                                 {"row_lse", row_lse},
                                 {"column_lse", column_lse},
                                 {"d_out", d_out}},
                                {{"dq", dq}, {"dk", dk}, {"dv", dv}}, s);
        dispatch<masad_backward_impl<double>, masad_backward_impl<float>>(o, s, gammas, height,
                                                                          width, threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("u"), py::arg("row_lse"),
      py::arg("column_lse"), py::arg("d_out"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("gammas"), py::arg("height"), py::arg("width"), py::arg("threads") = 0,
      "MaSAD backward from masad_forward_train's saved arrays: writes dq, dk, dv.");
}

}  // namespace retention_py
