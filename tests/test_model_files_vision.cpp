// retention-test-links: compiled
// retention-test-requires: nlohmann_json
// Vision model files from PyTorch: tests/python_helpers/rmt_torch.py and vir_torch.py write random
// RMT and ViR layers by their authors' parameter names to safetensors
// (scripts/safetensors_write.py, NumPy only) and the outputs of float64 PyTorch implementations
// written from the equations (docs/math.md §4, §5). The layers loaded through io::SafetensorsReader
// + io::parameters with a prefix reproduce them at 1e-12 relative (double; float layers at the SPEC
// 6 float bound): ManhattanAttention in MaSA and MaSAD on odd grids and a batch of two, with LCE,
// by the config's gammas or the stage's decay buffer; VirRetention, VirBlock and VirEncoder in
// every form and order of VirOptions, token-by-token step() and batched step_batch() decoding.
// Skipped when /usr/bin/python3 (RETENTION_PYTHON) or torch is missing.
#include <retention/io/parameters.hpp>
#include <retention/io/safetensors.hpp>
#include <retention/layers/rmt.hpp>
#include <retention/layers/vir.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <sys/wait.h>

namespace {

namespace fs = std::filesystem;
using retention::Form;
using retention::Index;
using retention::ManhattanAttention;
using retention::ManhattanAttentionConfig;
using retention::Matrix;
using retention::RmtMode;
using retention::VirBlock;
using retention::VirConfig;
using retention::VirEncoder;
using retention::VirOptions;
using retention::VirOrder;
using retention::VirRetention;
using retention::io::SafetensorsReader;
using retention_test::relative_error;

std::string python() {
  const char* p = std::getenv("RETENTION_PYTHON");
  return p && *p ? p : "/usr/bin/python3";
}

fs::path source_dir() {
  const char* src = std::getenv("RETENTION_SOURCE_DIR");
  return src && *src ? fs::path(src) : fs::path(__FILE__).parent_path().parent_path();
}

/// FNV-1a of a file's bytes (the cache key: a changed helper or writer makes new files).
std::uint64_t file_hash(const fs::path& path, std::uint64_t h = 1469598103934665603ull) {
  std::ifstream in(path, std::ios::binary);
  for (char c; in.get(c);) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

/// The directory of files tests/python_helpers/<stem>_torch.py wrote (its last file `sentinel`),
/// or "" when python or torch is missing (the tests then skip). Importing torch takes seconds and
/// ctest runs every test as its own process, so the files are made once per helper and kept next
/// to the test binary, keyed by the helper's and the writer's contents; a fresh directory is
/// renamed into place, so concurrent test processes never see a partial one.
std::string make_model_dir(const std::string& stem, const std::string& sentinel) {
  const fs::path helper = source_dir() / ("tests/python_helpers/" + stem + "_torch.py");
  const fs::path writer = source_dir() / "scripts/safetensors_write.py";
  if (!fs::exists(python()) || !fs::exists(helper)) return std::string();
  std::error_code ec;
  fs::path base = fs::read_symlink("/proc/self/exe", ec).parent_path();
  if (ec || base.empty()) base = fs::temp_directory_path();
  const fs::path cache =
      base / ("model_files_" + stem + "_" + std::to_string(file_hash(writer, file_hash(helper))));
  if (fs::exists(cache / sentinel)) return cache.string();
  std::random_device rd;
  const fs::path fresh = base / ("model_files_" + stem + "_tmp_" + std::to_string(rd()));
  fs::create_directories(fresh);
  const std::string cmd = "'" + python() + "' '" + helper.string() + "' '" +
                          (source_dir() / "scripts").string() + "' '" + fresh.string() + "'";
  const int status = std::system(cmd.c_str());
  const int code = status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code != 0) {
    fs::remove_all(fresh, ec);
    if (code == 77) return std::string();  // no torch
    ADD_FAILURE() << cmd << " exited with " << code;
    return std::string();
  }
  fs::rename(fresh, cache, ec);  // fails harmlessly if another process was first
  if (ec) fs::remove_all(fresh, ec);
  return cache.string();
}

const std::string& rmt_dir() {
  static const std::string dir = make_model_dir("rmt", "rmt_expected.safetensors");
  return dir;
}
const std::string& vir_dir() {
  static const std::string dir = make_model_dir("vir", "vir_expected.safetensors");
  return dir;
}

#define REQUIRE_FILES(dir) \
  if (dir().empty())       \
    GTEST_SKIP() << python() << " with torch is not available (set RETENTION_PYTHON)";

constexpr double kTol = 1e-12;  // double layers (SPEC 6)
constexpr double kTolF = 1e-5;  // float layers (SPEC 6)

std::string sci(double x) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << x;
  return s.str();
}

/// Largest error seen by a test, recorded as a property (visible in the XML report) at the end.
struct Worst {
  double value = 0.0;
  std::string where;
  void add(double e, const std::string& what) {
    if (e > value || where.empty()) value = e, where = what;
  }
  ~Worst() {
    if (!where.empty())
      ::testing::Test::RecordProperty("worst_rel_err", sci(value) + " (" + where + ")");
  }
};

// -------------------------------------------------------------------------------------------------
// RMT
// -------------------------------------------------------------------------------------------------

ManhattanAttentionConfig rmt_config(const SafetensorsReader& file) {
  ManhattanAttentionConfig c;
  c.embed_dim = std::stol(file.metadata().at("embed_dim"));
  c.heads = std::stol(file.metadata().at("heads"));
  c.value_factor = std::stol(file.metadata().at("value_factor"));
  c.initial_value = std::stod(file.metadata().at("initial_value"));
  c.heads_range = std::stod(file.metadata().at("heads_range"));
  return c;
}

struct RmtCase {
  std::string name;  // "a", "b"
  Index batch, height, width;
};

std::vector<RmtCase> rmt_cases(const SafetensorsReader& expected) {
  std::vector<RmtCase> out;
  for (const std::string n : {"a", "b"}) {
    std::istringstream s(expected.metadata().at("shape_" + n));
    RmtCase c{n, 0, 0, 0};
    s >> c.batch >> c.height >> c.width;
    out.push_back(c);
  }
  return out;
}

/// Every case and mode of `layer` against the expected outputs of one gamma source ("schedule" or
/// "buffer"); returns the worst relative error.
template <class T>
double check_rmt(const ManhattanAttention<T>& layer, const SafetensorsReader& expected,
                 const std::string& gammas, double tol, Worst& worst) {
  double w = 0.0;
  for (const RmtCase& c : rmt_cases(expected)) {
    const Matrix<T> x = expected.to_matrix<double>("x_" + c.name).template cast<T>();
    for (RmtMode mode : {RmtMode::full, RmtMode::decomposed}) {
      const std::string key = "y_" + c.name + "_" + retention::to_string(mode) + "_" + gammas;
      const Matrix<double> y = expected.to_matrix<double>(key);
      const double err = relative_error(layer.forward(x, c.batch, c.height, c.width, mode), y);
      EXPECT_LE(err, tol) << key;
      worst.add(err, key);
      w = std::max(w, err);
    }
  }
  return w;
}

TEST(ModelFilesVision, RmtMatchesTorchInBothModes) {
  REQUIRE_FILES(rmt_dir);
  const SafetensorsReader model(rmt_dir() + "/rmt_model.safetensors");
  const SafetensorsReader expected(rmt_dir() + "/rmt_expected.safetensors");
  Worst worst;
  ManhattanAttention<double> layer(rmt_config(model));
  layer.load(retention::io::parameters(model), model.metadata().at("prefix"));
  check_rmt(layer, expected, "schedule", kTol, worst);
  // The one-image overload on the single-image case, in the config's mode (full) and MaSAD.
  const Matrix<double> xb = expected.to_matrix<double>("x_b");
  EXPECT_LE(
      relative_error(layer.forward(xb, 1, 6), expected.to_matrix<double>("y_b_full_schedule")),
      kTol);
  EXPECT_LE(relative_error(layer.forward(xb, 1, 6, RmtMode::decomposed),
                           expected.to_matrix<double>("y_b_decomposed_schedule")),
            kTol);
}

TEST(ModelFilesVision, RmtFloatLayerFromTheSameFile) {
  REQUIRE_FILES(rmt_dir);
  const SafetensorsReader model(rmt_dir() + "/rmt_model.safetensors");
  const SafetensorsReader expected(rmt_dir() + "/rmt_expected.safetensors");
  Worst worst;
  ManhattanAttention<float> layer(rmt_config(model));
  layer.load(retention::io::parameters(model), model.metadata().at("prefix"));
  check_rmt(layer, expected, "schedule", kTolF, worst);
}

// load(source, prefix, decay_name): the stage's F32 buffer of ln gamma_h (another schedule than the
// config's) sets the gammas, and the outputs follow them; without it the config's are kept.
TEST(ModelFilesVision, RmtDecayBufferSetsTheGammas) {
  REQUIRE_FILES(rmt_dir);
  const SafetensorsReader model(rmt_dir() + "/rmt_model.safetensors");
  const SafetensorsReader expected(rmt_dir() + "/rmt_expected.safetensors");
  Worst worst;
  const std::string prefix = model.metadata().at("prefix"),
                    decay = model.metadata().at("decay_name");
  ASSERT_EQ(model.get(decay).dtype(), retention::io::DType::f32);
  ManhattanAttention<double> layer(rmt_config(model));
  const std::vector<double> schedule = layer.gammas();
  layer.load(retention::io::parameters(model), prefix, decay);
  const Matrix<double> g = expected.to_matrix<double>("gammas_buffer");
  ASSERT_EQ(static_cast<Index>(layer.gammas().size()), g.cols());
  for (Index h = 0; h < g.cols(); ++h) {
    EXPECT_NEAR(layer.gammas()[static_cast<std::size_t>(h)], g(0, h), 1e-15 * g(0, h)) << h;
    // The buffer is another schedule: a layer that ignored it would fail below.
    EXPECT_GT(std::abs(schedule[static_cast<std::size_t>(h)] - g(0, h)), 1e-3) << h;
  }
  check_rmt(layer, expected, "buffer", kTol, worst);
  for (const std::string mode : {"full", "decomposed"})
    EXPECT_GT(relative_error(expected.to_matrix<double>("y_a_" + mode + "_buffer"),
                             expected.to_matrix<double>("y_a_" + mode + "_schedule")),
              1e-3)
        << "the two gamma sources must give clearly different outputs";
  // A second load without the decay name keeps the gammas the layer has.
  layer.load(retention::io::parameters(model), prefix);
  check_rmt(layer, expected, "buffer", kTol, worst);
}

// A missing parameter, a missing decay buffer and a buffer that is not ln gamma of a gamma in
// (0, 1] are shape_errors naming the parameter; the layer is unchanged after each.
TEST(ModelFilesVision, RmtBadNamesAndBuffersLeaveTheLayerUnchanged) {
  REQUIRE_FILES(rmt_dir);
  const SafetensorsReader model(rmt_dir() + "/rmt_model.safetensors");
  const SafetensorsReader expected(rmt_dir() + "/rmt_expected.safetensors");
  Worst worst;
  const std::string prefix = model.metadata().at("prefix");
  ManhattanAttention<double> layer(rmt_config(model));
  const auto params = retention::io::parameters(model);
  layer.load(params, prefix);
  retention_test::expect_shape_error(
      [&] { layer.load(params, "layers.1.blocks.1.retention."); },
      "missing parameter 'layers.1.blocks.1.retention.q_proj.weight'");
  retention_test::expect_shape_error([&] { layer.load(params, prefix, "layers.2.Relpos.decay"); },
                                     "layers.2.Relpos.decay");
  retention_test::expect_shape_error([&] { layer.load(params, prefix, "bad.Relpos.decay"); },
                                     "'bad.Relpos.decay'[1]");
  // Only the outputs show that the layer kept its weights and gammas through the failed loads.
  check_rmt(layer, expected, "schedule", kTol, worst);
}

// -------------------------------------------------------------------------------------------------
// ViR
// -------------------------------------------------------------------------------------------------

VirConfig vir_config(const SafetensorsReader& file) {
  const auto& m = file.metadata();
  VirConfig c;
  c.image_size = std::stol(m.at("image_size"));
  c.patch_size = std::stol(m.at("patch_size"));
  c.in_channels = std::stol(m.at("in_channels"));
  c.embed_dim = std::stol(m.at("embed_dim"));
  c.heads = std::stol(m.at("heads"));
  c.depth = std::stol(m.at("depth"));
  c.mlp_ratio = std::stod(m.at("mlp_ratio"));
  c.layer_norm_eps = std::stod(m.at("layer_norm_eps"));
  return c;  // gammas: linspace (the ViR authors' DecayMask)
}

VirOptions opts(Form form, Index chunk = 0, VirOrder order = VirOrder::layer_major,
                int threads = 0) {
  VirOptions o;
  o.form = form;
  o.chunk = chunk;
  o.order = order;
  o.threads = threads;
  return o;
}

/// Every VirOptions form (chunks: automatic, 1, dividing T, not dividing T, T, over T; one and two
/// threads) for a layer or block over T rows.
std::vector<std::pair<std::string, VirOptions>> layer_runs(Index T) {
  std::vector<std::pair<std::string, VirOptions>> r = {
      {"parallel", opts(Form::parallel)},
      {"parallel threads=2", opts(Form::parallel, 0, VirOrder::layer_major, 2)},
      {"recurrent", opts(Form::recurrent)},
      {"chunkwise auto", opts(Form::chunkwise)},
      {"chunkwise c=1", opts(Form::chunkwise, 1)},
      {"chunkwise c=4", opts(Form::chunkwise, 4)},
      {"chunkwise c=T", opts(Form::chunkwise, T)},
      {"chunkwise c>T", opts(Form::chunkwise, T + 5)},
      {"chunkwise c=3 threads=2", opts(Form::chunkwise, 3, VirOrder::layer_major, 2)}};
  for (Index d = 2; d < T; ++d)
    if (T % d == 0) {
      r.push_back({"chunkwise c=" + std::to_string(d) + " (divides T)", opts(Form::chunkwise, d)});
      break;
    }
  return r;
}

/// The encoder's runs: layer_runs plus chunk-major order in every form.
std::vector<std::pair<std::string, VirOptions>> encoder_runs(Index T) {
  std::vector<std::pair<std::string, VirOptions>> r = layer_runs(T);
  for (Form f : {Form::parallel, Form::recurrent, Form::chunkwise})
    for (Index c : {Index(0), Index(1), Index(4), T, T + 3})
      r.push_back(
          {std::string("chunk-major ") + retention::to_string(f) + " c=" + std::to_string(c),
           opts(f, c, VirOrder::chunk_major)});
  r.push_back(
      {"chunk-major chunkwise c=5 threads=2", opts(Form::chunkwise, 5, VirOrder::chunk_major, 2)});
  return r;
}

TEST(ModelFilesVision, VirRetentionMatchesTorchInEveryForm) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  Worst worst;
  const std::string prefix = model.metadata().at("prefix") + "blocks.1.retention.";
  VirRetention<double> layer(vir_config(model));
  layer.load(retention::io::parameters(model), prefix);
  const Matrix<double> g = expected.to_matrix<double>("gammas");
  for (Index h = 0; h < g.cols(); ++h)
    EXPECT_NEAR(layer.gammas()[static_cast<std::size_t>(h)], g(0, h), 1e-15);
  const Matrix<double> x = expected.to_matrix<double>("x_ret"),
                       y = expected.to_matrix<double>("y_ret");
  for (const auto& [name, o] : layer_runs(x.rows())) {
    const double err = relative_error(layer.forward(x, o), y);
    EXPECT_LE(err, kTol) << name;
    worst.add(err, name);
  }
  // Two calls carrying the states (5 rows chunkwise, the rest parallel) equal one pass.
  std::vector<VirRetention<double>::State> states;
  Matrix<double> split(x.rows(), x.cols());
  split.topRows(5) = layer.forward(x.topRows(5), opts(Form::chunkwise, 2), &states);
  split.bottomRows(x.rows() - 5) =
      layer.forward(x.bottomRows(x.rows() - 5), opts(Form::parallel), &states);
  const double err = relative_error(split, y);
  EXPECT_LE(err, kTol) << "split";
  worst.add(err, "two calls with states");
  // Float layer from the same F64 file.
  VirRetention<float> layer_f(vir_config(model));
  layer_f.load(retention::io::parameters(model), prefix);
  const double err_f = relative_error(layer_f.forward(x.cast<float>()), y);
  EXPECT_LE(err_f, kTolF);
  RecordProperty("rel_err_float", sci(err_f));
}

// step() token by token reproduces the parallel outputs of torch.
TEST(ModelFilesVision, VirRetentionStepByStepMatchesTorch) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  Worst worst;
  VirRetention<double> layer(vir_config(model));
  layer.load(retention::io::parameters(model),
             model.metadata().at("prefix") + "blocks.1.retention.");
  const Matrix<double> x = expected.to_matrix<double>("x_ret"),
                       y = expected.to_matrix<double>("y_ret");
  std::vector<VirRetention<double>::State> states;  // empty = zero states
  Matrix<double> got(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) got.row(t) = layer.step(x.row(t), states);
  const double err = relative_error(got, y);
  EXPECT_LE(err, kTol);
  worst.add(err, "step");
  // A prefill of 4 rows (recurrent form with states), then steps.
  states.clear();
  got.topRows(4) = layer.forward(x.topRows(4), opts(Form::recurrent), &states);
  for (Index t = 4; t < x.rows(); ++t) got.row(t) = layer.step(x.row(t), states);
  const double err2 = relative_error(got, y);
  EXPECT_LE(err2, kTol);
  worst.add(err2, "prefill + step");
  EXPECT_EQ(states[0].position, x.rows());
}

// step_batch(): two sequences (13 and 6 tokens) decoded in one batch until the short one leaves,
// then the long one alone; both reproduce torch.
TEST(ModelFilesVision, VirRetentionBatchedDecodeMatchesTorch) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  Worst worst;
  VirRetention<double> layer(vir_config(model));
  layer.load(retention::io::parameters(model),
             model.metadata().at("prefix") + "blocks.1.retention.");
  const Matrix<double> xa = expected.to_matrix<double>("x_ret"),
                       ya = expected.to_matrix<double>("y_ret");
  const Matrix<double> xb = expected.to_matrix<double>("x_ret_b"),
                       yb = expected.to_matrix<double>("y_ret_b");
  std::vector<VirRetention<double>::State> sa, sb;
  VirRetention<double>::BatchWorkspace work;
  Matrix<double> got_a(xa.rows(), xa.cols()), got_b(xb.rows(), xb.cols());
  // b joins at a's third token.
  got_a.topRows(2) = layer.forward(xa.topRows(2), opts(Form::parallel), &sa);
  Index ta = 2, tb = 0;
  while (ta < xa.rows()) {
    std::vector<std::vector<VirRetention<double>::State>*> states{&sa};
    Matrix<double> x(1, xa.cols());
    x.row(0) = xa.row(ta);
    if (tb < xb.rows()) {
      states.push_back(&sb);
      x.conservativeResize(2, Eigen::NoChange);
      x.row(1) = xb.row(tb);
    }
    Matrix<double> y(x.rows(), x.cols());
    layer.step_batch(x, states, y, work);
    got_a.row(ta++) = y.row(0);
    if (y.rows() == 2) got_b.row(tb++) = y.row(1);
  }
  EXPECT_EQ(tb, xb.rows());
  const double err_a = relative_error(got_a, ya), err_b = relative_error(got_b, yb);
  EXPECT_LE(err_a, kTol);
  EXPECT_LE(err_b, kTol);
  worst.add(err_a, "sequence a");
  worst.add(err_b, "sequence b");
}

TEST(ModelFilesVision, VirBlockMatchesTorchInEveryForm) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  Worst worst;
  VirBlock<double> block(vir_config(model));
  block.load(retention::io::parameters(model), model.metadata().at("prefix") + "blocks.1.");
  const Matrix<double> x = expected.to_matrix<double>("x_blk"),
                       y = expected.to_matrix<double>("y_blk");
  for (const auto& [name, o] : layer_runs(x.rows())) {
    const double err = relative_error(block.forward(x, o), y);
    EXPECT_LE(err, kTol) << name;
    worst.add(err, name);
    Matrix<double> inplace = x;
    block.forward_inplace(inplace, o);
    EXPECT_LE(relative_error(inplace, y), kTol) << name << " in place";
  }
  // Row by row, carrying the states: the block is causal and acts per token outside retention.
  std::vector<VirBlock<double>::State> states;
  Matrix<double> rows(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t)
    rows.row(t) = block.forward(x.row(t), opts(Form::recurrent), &states);
  const double err = relative_error(rows, y);
  EXPECT_LE(err, kTol);
  worst.add(err, "row by row with states");
}

TEST(ModelFilesVision, VirEncoderMatchesTorchInEveryFormAndOrder) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  Worst worst;
  const VirConfig config = vir_config(model);
  VirEncoder<double> enc(config, 7);
  enc.load(retention::io::parameters(model), model.metadata().at("prefix"));
  VirEncoder<float> enc_f(config, 7);
  enc_f.load(retention::io::parameters(model), model.metadata().at("prefix"));
  // The training resolution (8 x 8: the learned position embedding as is) and 6 x 10 (a 3 x 5
  // patch grid, odd sides: the embedding resampled bilinearly).
  for (const std::string which : {"train", "other"}) {
    const auto image_view = expected.get("image_" + which);
    const std::vector<Index> shape = image_view.shape();
    ASSERT_EQ(shape.size(), 3u);
    const retention::Vector<double> pixels = image_view.to_vector<double>();
    const retention::ImageView<double> image{pixels.data(), shape[0], shape[1], shape[2]};
    const Matrix<double> tokens = expected.to_matrix<double>("tokens_" + which);
    const Matrix<double> feature = expected.to_matrix<double>("feature_" + which);
    ASSERT_EQ(tokens.rows(), (shape[0] / config.patch_size) * (shape[1] / config.patch_size) + 1);
    for (const auto& [name, o] : encoder_runs(tokens.rows())) {
      const double err_t = relative_error(enc.forward_tokens(image, o), tokens);
      const double err_f = relative_error(enc.forward(image, o), feature);
      EXPECT_LE(err_t, kTol) << which << " " << name;
      EXPECT_LE(err_f, kTol) << which << " " << name;
      worst.add(std::max(err_t, err_f), which + " " + name);
    }
    const std::vector<float> pixels_f(pixels.data(), pixels.data() + pixels.size());
    const retention::ImageView<float> image_f{pixels_f.data(), shape[0], shape[1], shape[2]};
    const double err_float = relative_error(enc_f.forward_tokens(image_f), tokens);
    EXPECT_LE(err_float, kTolF) << which << " float";
    RecordProperty("rel_err_float_" + which, sci(err_float));
  }
}

// Wrong prefixes name the first missing parameter; a failed load leaves the encoder as it was.
TEST(ModelFilesVision, VirWrongPrefixNamesTheMissingParameter) {
  REQUIRE_FILES(vir_dir);
  const SafetensorsReader model(vir_dir() + "/vir_model.safetensors");
  const SafetensorsReader expected(vir_dir() + "/vir_expected.safetensors");
  const VirConfig config = vir_config(model);
  const auto params = retention::io::parameters(model);
  VirRetention<double> layer(config);
  retention_test::expect_shape_error([&] { layer.load(params, "blocks.1.retention."); },
                                     "VirRetention::load: missing parameter 'blocks.1.retention.");
  VirBlock<double> block(config);
  retention_test::expect_shape_error([&] { block.load(params, "backbone.blocks.2."); },
                                     "'backbone.blocks.2.");
  VirEncoder<double> enc(config, 7);
  enc.load(params, "backbone.");
  retention_test::expect_shape_error([&] { enc.load(params, ""); },
                                     "VirEncoder::load: missing parameter '");
  VirConfig deeper = config;
  deeper.depth = 3;  // blocks.2 is not in the file
  VirEncoder<double> enc3(deeper, 7);
  retention_test::expect_shape_error([&] { enc3.load(params, "backbone."); },
                                     "'backbone.blocks.2.");
  const Matrix<double> tokens = expected.to_matrix<double>("tokens_train");
  const auto image_view = expected.get("image_train");
  const retention::Vector<double> pixels = image_view.to_vector<double>();
  const retention::ImageView<double> image{pixels.data(), image_view.shape()[0],
                                           image_view.shape()[1], image_view.shape()[2]};
  EXPECT_LE(relative_error(enc.forward_tokens(image), tokens), kTol);
}

}  // namespace
