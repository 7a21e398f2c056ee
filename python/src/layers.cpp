// retention Python module: the layers (RetNet MSR, RMT ManhattanAttention, ViR retention, block and
// encoder), each in float64 and float32, loaded by their PyTorch state_dict names from a
// ParameterMap of views of the caller's arrays.
#include "common.hpp"

#include <retention/layers/msr.hpp>
#include <retention/layers/rmt.hpp>
#include <retention/layers/vir.hpp>
#include <retention/nn/parameters.hpp>

namespace retention_py {
namespace {

/// A ParameterMap together with the arrays its views point into, so that they outlive it.
struct Parameters {
  retention::ParameterMap map;
  std::vector<py::object> keep;

  void add(const std::string& name, const py::array& a, const std::string& dtype) {
    const char* fn = "ParameterMap.add";
    if (!(a.flags() & py::array::c_style))
      value_error(std::string(fn) + ": '" + name + "' must be C-contiguous");
    retention::TensorRef t;
    py::ssize_t item = 0;
    if (dtype == "float64")
      t.dtype = retention::DType::float64, item = 8;
    else if (dtype == "float32")
      t.dtype = retention::DType::float32, item = 4;
    else if (dtype == "float16")
      t.dtype = retention::DType::float16, item = 2;
    else if (dtype == "bfloat16")
      t.dtype = retention::DType::bfloat16, item = 2;
    else
      type_error(std::string(fn) + ": '" + name + "' has dtype " + dtype +
                 ", expected float64, float32, float16 or bfloat16");
    if (a.itemsize() != item)
      type_error(std::string(fn) + ": '" + name + "' has items of " + std::to_string(a.itemsize()) +
                 " bytes, dtype " + dtype + " needs " + std::to_string(item));
    for (py::ssize_t i = 0; i < a.ndim(); ++i) t.shape.push_back(static_cast<Index>(a.shape(i)));
    // A 0-element tensor still needs a non-null pointer for ParameterMap; it is never read.
    static const double empty = 0.0;
    t.data = a.size() > 0 ? a.data() : &empty;
    map.add(name, std::move(t));
    keep.push_back(a);
  }
};

template <class T>
const char* dtype_name() {
  return std::is_same<T, double>::value ? "float64" : "float32";
}

/// x as a [rows, cols] map of T (TypeError for another dtype).
template <class T>
RowsMap<T> input_rows(const char* fn, const py::handle& x) {
  const py::array a = as_array(fn, "x", x);
  check_scalar(fn, "x", a, scalar_of<T>());
  return rows_of<T>(fn, "x", a);
}

retention::VirOptions vir_options(const std::string& form, Index chunk, const std::string& order,
                                  int threads) {
  retention::VirOptions o;
  o.form = form_of(form);
  o.chunk = chunk;
  if (order == "layer_major")
    o.order = retention::VirOrder::layer_major;
  else if (order == "chunk_major")
    o.order = retention::VirOrder::chunk_major;
  else
    value_error("order must be 'layer_major' or 'chunk_major', got '" + order + "'");
  o.threads = threads;
  return o;
}

retention::RmtMode mode_of(const std::string& s) {
  if (s == "full" || s == "masa") return retention::RmtMode::full;
  if (s == "decomposed" || s == "masad") return retention::RmtMode::decomposed;
  value_error("mode must be 'full' (MaSA) or 'decomposed' (MaSAD), got '" + s + "'");
}

template <class T>
void bind_msr(py::module_& m, const std::string& suffix) {
  using Layer = retention::MultiScaleRetention<T>;
  using State = typename Layer::State;
  py::class_<State>(m, ("MsrState_" + suffix).c_str(),
                    "Decoding state of one sequence through one MultiScaleRetention layer.")
      .def_property_readonly("position", [](const State& s) { return s.position; })
      .def_property_readonly("bytes", &State::bytes)
      .def("reset", &State::reset)
      .def("copy", [](const State& s) { return State(s); });
  py::class_<Layer>(m, ("MultiScaleRetention_" + suffix).c_str(),
                    "RetNet multi-scale retention (docs/math.md §3), torchscale's names.")
      .def(py::init([](Index embed_dim, Index heads, Index value_dim,
                       const std::vector<double>& gammas, const std::string& normalization,
                       const std::string& head_norm, double eps, bool biases,
                       const std::string& form, Index chunk, int threads, bool packed_weights,
                       bool keep_buffers) {
             retention::MsrConfig c;
             c.embed_dim = embed_dim;
             c.heads = heads;
             c.value_dim = value_dim;
             c.gammas = gammas;
             c.normalization = normalization_of(normalization);
             if (head_norm == "rms")
               c.head_norm = retention::HeadNorm::rms;
             else if (head_norm == "layer")
               c.head_norm = retention::HeadNorm::layer;
             else
               value_error("head_norm must be 'rms' or 'layer', got '" + head_norm + "'");
             c.eps = eps;
             c.biases = biases;
             c.form = form_of(form);
             c.chunk = chunk;
             c.threads = threads;
             c.packed_weights = packed_weights;
             c.keep_buffers = keep_buffers;
             return Layer(c);
           }),
           py::arg("embed_dim"), py::arg("heads"), py::arg("value_dim") = 0,
           py::arg("gammas") = std::vector<double>(), py::arg("normalization") = "decay_and_score",
           py::arg("head_norm") = "rms", py::arg("eps") = 1e-6, py::arg("biases") = false,
           py::arg("form") = "chunkwise", py::arg("chunk") = 0, py::arg("threads") = 0,
           py::arg("packed_weights") = false, py::arg("keep_buffers") = true)
      .def_property_readonly("packed_weights",
                             [](const Layer& l) { return l.config().packed_weights; })
      .def_property_readonly("keep_buffers", [](const Layer& l) { return l.config().keep_buffers; })
      .def_property_readonly("embed_dim", &Layer::embed_dim)
      .def_property_readonly("value_dim", &Layer::value_dim)
      .def_property_readonly("heads", &Layer::heads)
      .def_property_readonly("key_dim", &Layer::key_dim)
      .def_property_readonly("head_value_dim", &Layer::head_value_dim)
      .def_property_readonly("gammas", &Layer::gammas)
      .def_property_readonly("dtype", [](const Layer&) { return dtype_name<T>(); })
      .def(
          "load",
          [](Layer& l, const Parameters& p, const std::string& prefix) { l.load(p.map, prefix); },
          py::arg("parameters"), py::arg("prefix") = "")
      .def("init_random", &Layer::init_random, py::arg("seed"))
      .def(
          "forward",
          [](const Layer& l, const py::handle& x, Index batch, const std::string& form,
             Index chunk) {
            const auto xm = input_rows<T>("MultiScaleRetention.forward", x);
            const auto f = form_of(form);
            Matrix<T> y;
            {
              py::gil_scoped_release release;
              y = l.forward_batch(xm, batch, f, chunk);
            }
            return to_numpy(std::move(y));
          },
          py::arg("x"), py::arg("batch") = 1, py::arg("form") = "chunkwise", py::arg("chunk") = 0,
          "x [batch * T, embed_dim] (batch sequences stacked) -> [batch * T, embed_dim].")
      .def("make_state", &Layer::make_state)
      .def(
          "prefill",
          [](const Layer& l, const py::handle& x, State& state, const std::string& form,
             Index chunk) {
            const auto xm = input_rows<T>("MultiScaleRetention.prefill", x);
            const auto f = form_of(form);
            Matrix<T> y;
            {
              py::gil_scoped_release release;
              y = l.prefill(xm, state, f, chunk);
            }
            return to_numpy(std::move(y));
          },
          py::arg("x"), py::arg("state"), py::arg("form") = "chunkwise", py::arg("chunk") = 0)
      .def(
          "step",
          [](const Layer& l, const py::handle& x, State& state) {
            const auto xm = input_rows<T>("MultiScaleRetention.step", x);
            retention::RowVector<T> y;
            {
              py::gil_scoped_release release;
              y = l.step(xm, state);
            }
            return to_numpy(std::move(y), {1, static_cast<py::ssize_t>(l.embed_dim())});
          },
          py::arg("x_t"), py::arg("state"), "x_t [1, embed_dim] -> [1, embed_dim].");
}

template <class T>
void bind_rmt(py::module_& m, const std::string& suffix) {
  using Layer = retention::ManhattanAttention<T>;
  py::class_<Layer>(m, ("ManhattanAttention_" + suffix).c_str(),
                    "RMT attention with Manhattan decay and LCE (docs/math.md §4), RMT's names.")
      .def(py::init([](Index embed_dim, Index heads, Index value_factor, double initial_value,
                       double heads_range, const std::vector<double>& gammas,
                       const std::string& mode, int threads, bool packed_weights) {
             retention::ManhattanAttentionConfig c;
             c.embed_dim = embed_dim;
             c.heads = heads;
             c.value_factor = value_factor;
             c.initial_value = initial_value;
             c.heads_range = heads_range;
             c.gammas = gammas;
             c.mode = mode_of(mode);
             c.tile.threads = threads;
             c.packed_weights = packed_weights;
             return Layer(c);
           }),
           py::arg("embed_dim"), py::arg("heads"), py::arg("value_factor") = 1,
           py::arg("initial_value") = 2.0, py::arg("heads_range") = 4.0,
           py::arg("gammas") = std::vector<double>(), py::arg("mode") = "full",
           py::arg("threads") = 0, py::arg("packed_weights") = false)
      .def_property_readonly("packed_weights",
                             [](const Layer& l) { return l.config().packed_weights; })
      .def_property_readonly("embed_dim", &Layer::embed_dim)
      .def_property_readonly("heads", &Layer::heads)
      .def_property_readonly("value_dim", &Layer::value_dim)
      .def_property_readonly("gammas", &Layer::gammas)
      .def_property_readonly("dtype", [](const Layer&) { return dtype_name<T>(); })
      .def(
          "load",
          [](Layer& l, const Parameters& p, const std::string& prefix,
             const std::string& decay_name) { l.load(p.map, prefix, decay_name); },
          py::arg("parameters"), py::arg("prefix") = "", py::arg("decay_name") = "")
      .def("init_random", &Layer::init_random, py::arg("seed"))
      .def(
          "forward",
          [](const Layer& l, const py::handle& x, Index batch, Index height, Index width,
             const std::string& mode) {
            const auto xm = input_rows<T>("ManhattanAttention.forward", x);
            const auto md = mode_of(mode);
            Matrix<T> y;
            {
              py::gil_scoped_release release;
              y = l.forward(xm, batch, height, width, md);
            }
            return to_numpy(std::move(y));
          },
          py::arg("x"), py::arg("batch"), py::arg("height"), py::arg("width"),
          py::arg("mode") = "full",
          "x [batch * height * width, C] (raster order per image) -> the same shape.");
}

retention::VirConfig vir_config(Index image_size, Index patch_size, Index in_channels,
                                Index embed_dim, Index heads, Index depth, double mlp_ratio,
                                double layer_norm_eps, double layer_scale_init,
                                const std::vector<double>& gammas, bool packed_weights) {
  retention::VirConfig c;
  c.image_size = image_size;
  c.patch_size = patch_size;
  c.in_channels = in_channels;
  c.embed_dim = embed_dim;
  c.heads = heads;
  c.depth = depth;
  c.mlp_ratio = mlp_ratio;
  c.layer_norm_eps = layer_norm_eps;
  c.layer_scale_init = layer_scale_init;
  c.gammas = gammas;
  c.packed_weights = packed_weights;
  return c;
}

#define RETENTION_PY_VIR_ARGS                                                                      \
  py::arg("image_size") = 224, py::arg("patch_size") = 16, py::arg("in_channels") = 3,             \
  py::arg("embed_dim") = 384, py::arg("heads") = 6, py::arg("depth") = 12,                         \
  py::arg("mlp_ratio") = 4.0, py::arg("layer_norm_eps") = 1e-6, py::arg("layer_scale_init") = 1.0, \
  py::arg("gammas") = std::vector<double>()

template <class T>
void bind_vir(py::module_& m, const std::string& suffix) {
  using Ret = retention::VirRetention<T>;
  using Block = retention::VirBlock<T>;
  using Encoder = retention::VirEncoder<T>;
  // x [T, C] -> [T, C] through a layer's forward in the given form.
  auto layer_forward = [](const char* fn, const auto& layer, const py::handle& x,
                          const std::string& form, Index chunk, int threads) {
    const auto xm = input_rows<T>(fn, x);
    const auto o = vir_options(form, chunk, "layer_major", threads);
    Matrix<T> y;
    {
      py::gil_scoped_release release;
      y = layer.forward(xm, o);
    }
    return to_numpy(std::move(y));
  };

  py::class_<Ret>(m, ("VirRetention_" + suffix).c_str(),
                  "ViR multi-head retention (docs/math.md §5): qkv, out_proj.")
      .def(py::init(
               [](Index dim, Index heads, const std::vector<double>& gammas, bool packed_weights) {
                 Ret r(dim, heads, gammas);
                 r.set_packed_weights(packed_weights);
                 return r;
               }),
           py::arg("embed_dim"), py::arg("heads"), py::arg("gammas") = std::vector<double>(),
           py::arg("packed_weights") = false)
      .def_property_readonly("packed_weights", [](const Ret& l) { return l.qkv().packed(); })
      .def_property_readonly("embed_dim", &Ret::dim)
      .def_property_readonly("heads", &Ret::heads)
      .def_property_readonly("gammas", &Ret::gammas)
      .def_property_readonly("dtype", [](const Ret&) { return dtype_name<T>(); })
      .def(
          "load",
          [](Ret& l, const Parameters& p, const std::string& prefix) { l.load(p.map, prefix); },
          py::arg("parameters"), py::arg("prefix") = "")
      .def(
          "forward",
          [layer_forward](const Ret& l, const py::handle& x, const std::string& form, Index chunk,
                          int threads) {
            return layer_forward("VirRetention.forward", l, x, form, chunk, threads);
          },
          py::arg("x"), py::arg("form") = "parallel", py::arg("chunk") = 0, py::arg("threads") = 0,
          "x [T, C] -> [T, C].");

  py::class_<Block>(m, ("VirBlock_" + suffix).c_str(), "ViR block (docs/math.md §5).")
      .def(py::init([](Index embed_dim, Index heads, double mlp_ratio, double layer_norm_eps,
                       double layer_scale_init, const std::vector<double>& gammas,
                       bool packed_weights) {
             return Block(vir_config(224, 16, 3, embed_dim, heads, 1, mlp_ratio, layer_norm_eps,
                                     layer_scale_init, gammas, packed_weights));
           }),
           py::arg("embed_dim"), py::arg("heads"), py::arg("mlp_ratio") = 4.0,
           py::arg("layer_norm_eps") = 1e-6, py::arg("layer_scale_init") = 1.0,
           py::arg("gammas") = std::vector<double>(), py::arg("packed_weights") = false)
      .def_property_readonly("packed_weights",
                             [](const Block& l) { return l.config().packed_weights; })
      .def_property_readonly("dtype", [](const Block&) { return dtype_name<T>(); })
      .def(
          "load",
          [](Block& l, const Parameters& p, const std::string& prefix) { l.load(p.map, prefix); },
          py::arg("parameters"), py::arg("prefix") = "")
      .def(
          "forward",
          [layer_forward](const Block& l, const py::handle& x, const std::string& form, Index chunk,
                          int threads) {
            return layer_forward("VirBlock.forward", l, x, form, chunk, threads);
          },
          py::arg("x"), py::arg("form") = "parallel", py::arg("chunk") = 0, py::arg("threads") = 0,
          "x [T, C] -> [T, C].");

  py::class_<Encoder>(m, ("VirEncoder_" + suffix).c_str(),
                      "ViR encoder (docs/math.md §5): image [H, W, in_channels] -> feature [C].")
      .def(py::init([](Index image_size, Index patch_size, Index in_channels, Index embed_dim,
                       Index heads, Index depth, double mlp_ratio, double layer_norm_eps,
                       double layer_scale_init, const std::vector<double>& gammas,
                       std::uint64_t seed, bool packed_weights) {
             return Encoder(
                 vir_config(image_size, patch_size, in_channels, embed_dim, heads, depth, mlp_ratio,
                            layer_norm_eps, layer_scale_init, gammas, packed_weights),
                 seed);
           }),
           RETENTION_PY_VIR_ARGS, py::arg("seed") = 0, py::arg("packed_weights") = false)
      .def_property_readonly("packed_weights",
                             [](const Encoder& l) { return l.config().packed_weights; })
      .def_property_readonly("depth", &Encoder::depth)
      .def_property_readonly("parameter_count", &Encoder::parameter_count)
      .def_property_readonly("dtype", [](const Encoder&) { return dtype_name<T>(); })
      .def(
          "load",
          [](Encoder& l, const Parameters& p, const std::string& prefix) { l.load(p.map, prefix); },
          py::arg("parameters"), py::arg("prefix") = "")
      .def(
          "forward",
          [](const Encoder& l, const py::handle& image, const std::string& form, Index chunk,
             const std::string& order, int threads, bool tokens) {
            const char* fn = "VirEncoder.forward";
            const py::array a = as_array(fn, "image", image);
            check_scalar(fn, "image", a, scalar_of<T>());
            if (a.ndim() != 3 || !(a.flags() & py::array::c_style))
              value_error(std::string(fn) + ": image " + shape_of(a) +
                          " must be a C-contiguous [height, width, channels] array");
            retention::ImageView<T> im;
            im.data = static_cast<const T*>(a.data());
            im.height = a.shape(0), im.width = a.shape(1), im.channels = a.shape(2);
            const auto o = vir_options(form, chunk, order, threads);
            if (tokens) {
              Matrix<T> y;
              {
                py::gil_scoped_release release;
                y = l.forward_tokens(im, o);
              }
              return to_numpy(std::move(y));
            }
            retention::RowVector<T> y;
            {
              py::gil_scoped_release release;
              y = l.forward(im, o);
            }
            return to_numpy(std::move(y), {static_cast<py::ssize_t>(y.size())});
          },
          py::arg("image"), py::arg("form") = "parallel", py::arg("chunk") = 0,
          py::arg("order") = "layer_major", py::arg("threads") = 0, py::arg("tokens") = false,
          "image [H, W, in_channels] -> feature [C] (tokens=True: all tokens [N + 1, C]).");
}

}  // namespace

void bind_layers(py::module_& m) {
  py::class_<Parameters>(m, "ParameterMap",
                         "Named views of arrays (a state_dict), kept alive while this lives.")
      .def(py::init<>())
      .def("add", &Parameters::add, py::arg("name"), py::arg("array"), py::arg("dtype"),
           "Adds a view of a C-contiguous array; dtype float64/float32/float16/bfloat16 (a "
           "bfloat16 tensor travels as its int16 bits).")
      .def("__len__", [](const Parameters& p) { return p.map.size(); })
      .def("__contains__",
           [](const Parameters& p, const std::string& n) { return p.map.contains(n); })
      .def("names", [](const Parameters& p) { return p.map.names(); });
  bind_msr<double>(m, "float64");
  bind_msr<float>(m, "float32");
  bind_rmt<double>(m, "float64");
  bind_rmt<float>(m, "float32");
  bind_vir<double>(m, "float64");
  bind_vir<float>(m, "float32");
}

}  // namespace retention_py
