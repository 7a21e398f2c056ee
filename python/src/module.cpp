// retention Python module: the module itself, its error type, the gamma schedules and the
// multi-head retention state. The kernels and the layers are bound in the other translation units
// (compile time: each of them instantiates the heavy templates for float and double only).
#include "common.hpp"

#include <cstring>

namespace retention_py {

retention::Form form_of(const std::string& s) {
  if (s == "parallel") return retention::Form::parallel;
  if (s == "recurrent") return retention::Form::recurrent;
  if (s == "chunkwise") return retention::Form::chunkwise;
  value_error("form must be one of 'parallel', 'recurrent', 'chunkwise', got '" + s + "'");
}

retention::Normalization normalization_of(const std::string& s) {
  if (s == "none") return retention::Normalization::none;
  if (s == "decay") return retention::Normalization::decay;
  if (s == "decay_and_score") return retention::Normalization::decay_and_score;
  value_error("normalization must be one of 'none', 'decay', 'decay_and_score', got '" + s + "'");
}

States::States(Index batch, Index heads, Index key_dim, Index value_dim, Scalar scalar)
    : scalar_(scalar), batch_(batch), heads_(heads), key_dim_(key_dim), value_dim_(value_dim) {
  const char* fn = "RetentionState";
  retention::detail::check_positive(fn, "batch", batch);
  retention::detail::check_positive(fn, "heads", heads);
  retention::detail::check_positive(fn, "key_dim", key_dim);
  retention::detail::check_positive(fn, "value_dim", value_dim);
  const Index pairs = retention::detail::checked_product(fn, "batch * heads", batch, heads);
  retention::detail::checked_product(
      fn, "batch * heads * key_dim * value_dim",
      retention::detail::checked_product(fn, "batch * heads * key_dim", pairs, key_dim), value_dim);
  if (scalar == Scalar::float64)
    s64_.assign(static_cast<std::size_t>(pairs),
                retention::RetentionState<double>(key_dim, value_dim));
  else
    s32_.assign(static_cast<std::size_t>(pairs),
                retention::RetentionState<float>(key_dim, value_dim));
}

template <>
std::vector<retention::RetentionState<double>>& States::get<double>() {
  return s64_;
}
template <>
std::vector<retention::RetentionState<float>>& States::get<float>() {
  return s32_;
}
template <>
const std::vector<retention::RetentionState<double>>& States::get<double>() const {
  return s64_;
}
template <>
const std::vector<retention::RetentionState<float>>& States::get<float>() const {
  return s32_;
}

const std::vector<retention::CausalDecay>& States::masks(const std::vector<double>& gammas) {
  if (gammas != mask_gammas_ || masks_.size() != gammas.size()) {
    masks_ = retention::causal_masks(gammas);
    mask_gammas_ = gammas;
  }
  return masks_;
}

void States::check(const char* fn, const char* name, Index batch, Index heads, Index dk, Index dv,
                   Scalar s) const {
  if (s != scalar_)
    type_error(std::string(fn) + ": " + name + " holds " + scalar_name(scalar_) +
               " states, the inputs are " + scalar_name(s));
  if (batch != batch_ || heads != heads_ || dk != key_dim_ || dv != value_dim_)
    value_error(std::string(fn) + ": " + name + " is for [batch " + std::to_string(batch_) +
                ", heads " + std::to_string(heads_) + ", key_dim " + std::to_string(key_dim_) +
                ", value_dim " + std::to_string(value_dim_) + "], the inputs have [batch " +
                std::to_string(batch) + ", heads " + std::to_string(heads) + ", key_dim " +
                std::to_string(dk) + ", value_dim " + std::to_string(dv) + "]");
}

namespace {

Scalar scalar_named(const std::string& dtype) {
  if (dtype == "float64" || dtype == "double") return Scalar::float64;
  if (dtype == "float32" || dtype == "float") return Scalar::float32;
  type_error("dtype must be 'float64' or 'float32', got '" + dtype + "'");
}

/// S as a fresh [batch, heads, dk, dv] array, z as [batch, heads, dk].
template <class T>
py::array states_S(const States& st) {
  const auto& v = st.get<T>();
  py::array_t<T> out({st.batch(), st.heads(), st.key_dim(), st.value_dim()});
  T* p = out.mutable_data();
  const Index n = st.key_dim() * st.value_dim();
  for (std::size_t i = 0; i < v.size(); ++i)
    std::memcpy(p + static_cast<Index>(i) * n, v[i].S.data(),
                static_cast<std::size_t>(n) * sizeof(T));
  return std::move(out);
}

template <class T>
py::array states_z(const States& st) {
  const auto& v = st.get<T>();
  py::array_t<T> out({st.batch(), st.heads(), st.key_dim()});
  T* p = out.mutable_data();
  const Index n = st.key_dim();
  for (std::size_t i = 0; i < v.size(); ++i)
    std::memcpy(p + static_cast<Index>(i) * n, v[i].z.data(),
                static_cast<std::size_t>(n) * sizeof(T));
  return std::move(out);
}

template <class T>
void states_set(States& st, const py::array& S, const py::array& z, const py::array& positions) {
  const char* fn = "RetentionState.set";
  const py::ssize_t B = st.batch(), H = st.heads(), dk = st.key_dim(), dv = st.value_dim();
  expect_dims(fn, "S", S, {B, H, dk, dv}, "[batch, heads, key_dim, value_dim]");
  expect_dims(fn, "z", z, {B, H, dk}, "[batch, heads, key_dim]");
  expect_dims(fn, "positions", positions, {B, H}, "[batch, heads]");
  check_scalar(fn, "S", S, scalar_of<T>());
  check_scalar(fn, "z", z, scalar_of<T>());
  if (!py::isinstance<py::array_t<std::int64_t>>(positions))
    type_error(std::string(fn) + ": positions must be int64");
  // Through unchecked accessors: any strides are fine here, this is a copy into the states.
  const auto s = py::array_t<T>(S).template unchecked<4>();
  const auto zz = py::array_t<T>(z).template unchecked<3>();
  const auto pos = py::array_t<std::int64_t>(positions).template unchecked<2>();
  for (py::ssize_t b = 0; b < B; ++b)
    for (py::ssize_t h = 0; h < H; ++h)
      if (pos(b, h) < 0) value_error(std::string(fn) + ": positions must be >= 0");
  auto& v = st.get<T>();
  for (py::ssize_t b = 0; b < B; ++b)
    for (py::ssize_t h = 0; h < H; ++h) {
      auto& one = v[static_cast<std::size_t>(b * H + h)];
      for (py::ssize_t i = 0; i < dk; ++i) {
        for (py::ssize_t j = 0; j < dv; ++j) one.S(i, j) = s(b, h, i, j);
        one.z(i) = zz(b, h, i);
      }
      one.position = static_cast<Index>(pos(b, h));
    }
}

py::array states_positions(const States& st) {
  py::array_t<std::int64_t> out({st.batch(), st.heads()});
  auto p = out.mutable_unchecked<2>();
  for (Index b = 0; b < st.batch(); ++b)
    for (Index h = 0; h < st.heads(); ++h) {
      const auto i = static_cast<std::size_t>(b * st.heads() + h);
      p(b, h) = st.scalar() == Scalar::float64 ? st.get<double>()[i].position
                                               : st.get<float>()[i].position;
    }
  return std::move(out);
}

}  // namespace

void bind_states(py::module_& m) {
  py::class_<States>(m, "RetentionState", R"doc(
Recurrent state of every (batch, head) pair of a multi-head retention call: per pair
S [key_dim, value_dim], z [key_dim] (the score normaliser's sum of decayed keys) and the absolute
position. Returned by retention(..., return_state=True), advanced in place by retention_step, and
accepted as initial_state by every form, so a prefill in one form continues in any other.
)doc")
      .def(py::init([](Index batch, Index heads, Index key_dim, Index value_dim,
                       const std::string& dtype) {
             return States(batch, heads, key_dim, value_dim, scalar_named(dtype));
           }),
           py::arg("batch"), py::arg("heads"), py::arg("key_dim"), py::arg("value_dim"),
           py::arg("dtype") = "float64", "A zero state at position 0.")
      .def_property_readonly("batch", &States::batch)
      .def_property_readonly("heads", &States::heads)
      .def_property_readonly("key_dim", &States::key_dim)
      .def_property_readonly("value_dim", &States::value_dim)
      .def_property_readonly("dtype",
                             [](const States& s) { return std::string(scalar_name(s.scalar())); })
      .def_property_readonly(
          "S",
          [](const States& s) {
            return s.scalar() == Scalar::float64 ? states_S<double>(s) : states_S<float>(s);
          },
          "A copy of every S as [batch, heads, key_dim, value_dim].")
      .def_property_readonly(
          "z",
          [](const States& s) {
            return s.scalar() == Scalar::float64 ? states_z<double>(s) : states_z<float>(s);
          },
          "A copy of every z as [batch, heads, key_dim].")
      .def_property_readonly("positions", &states_positions,
                             "Tokens seen by each pair, int64 [batch, heads].")
      .def(
          "set",
          [](States& s, const py::array& S, const py::array& z, const py::array& positions) {
            if (s.scalar() == Scalar::float64)
              states_set<double>(s, S, z, positions);
            else
              states_set<float>(s, S, z, positions);
          },
          py::arg("S"), py::arg("z"), py::arg("positions"),
          "Copies S [B, H, dk, dv], z [B, H, dk] and positions (int64 [B, H]) into the state.")
      .def(
          "reset",
          [](States& s) {
            if (s.scalar() == Scalar::float64)
              for (auto& x : s.get<double>()) x.reset();
            else
              for (auto& x : s.get<float>()) x.reset();
          },
          "Back to zero at position 0.")
      .def(
          "copy", [](const States& s) { return States(s); }, "An independent copy.")
      .def("__copy__", [](const States& s) { return States(s); })
      .def("__deepcopy__", [](const States& s, py::dict) { return States(s); })
      .def("__repr__", [](const States& s) {
        return "RetentionState(batch=" + std::to_string(s.batch()) +
               ", heads=" + std::to_string(s.heads()) + ", key_dim=" + std::to_string(s.key_dim()) +
               ", value_dim=" + std::to_string(s.value_dim()) + ", dtype='" +
               scalar_name(s.scalar()) + "')";
      });
}

}  // namespace retention_py

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  using namespace retention_py;
  m.doc() = "retention kernels (RetNet retention, RMT MaSA/MaSAD, ViR) over NumPy arrays";
  // Every library error is a retention::shape_error (a std::invalid_argument): ShapeError, a
  // ValueError, with the C++ message unchanged.
  py::register_exception<retention::shape_error>(m, "ShapeError", PyExc_ValueError);

  m.def("retnet_gammas", &retention::retnet_gammas, py::arg("heads"),
        "RetNet eq. 8: gamma_h = 1 - 2^(-5-h).");
  m.def("linspace_gammas", &retention::linspace_gammas, py::arg("heads"),
        py::arg("first") = 1.0 / 32, py::arg("last") = 1.0 / 512,
        "gamma_h = 1 - exp(linspace(ln first, ln last, heads))_h (RetNet LM runs, ViR).");
  m.def("rmt_gammas", &retention::rmt_gammas, py::arg("heads"), py::arg("initial_value") = 2.0,
        py::arg("heads_range") = 4.0,
        "RMT: gamma_h = 1 - 2^-(initial_value + heads_range * h / heads).");
  m.def("recommended_chunk", &retention::recommended_chunk, py::arg("key_dim"),
        py::arg("value_dim"), "The chunk length chunk=0 selects.");

  bind_states(m);
  bind_retention(m);
  bind_masa(m);
  bind_layers(m);
}
