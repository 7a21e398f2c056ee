// retention-test-links: compiled
// retention-test-requires: nlohmann_json
// Model files from PyTorch: tests/python_helpers/msr_torch.py writes a random torchscale-named MSR
// layer to safetensors (scripts/safetensors_write.py, NumPy only) and the outputs of a float64
// PyTorch implementation of the layer written from the equations (docs/math.md §3). The layer
// loaded through io::SafetensorsReader + io::parameters reproduces them at 1e-12 relative in every
// form, through prefill + decoding, packed prefill and batched decoding; BF16 weights reproduce the
// outputs of the BF16-rounded weights. Skipped when /usr/bin/python3 (RETENTION_PYTHON) or torch is
// missing.
#include <retention/io/parameters.hpp>
#include <retention/io/safetensors.hpp>
#include <retention/layers/msr.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <sys/wait.h>

namespace {

namespace fs = std::filesystem;
using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MultiScaleRetention;
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

/// The directory of files the Python helper wrote, or "" when python or torch is missing (the tests
/// then skip). Importing torch takes seconds and ctest runs every test as its own process, so the
/// files are made once and kept next to the test binary, keyed by the helper's and the writer's
/// contents; a fresh directory is renamed into place, so concurrent test processes never see a
/// partial one.
const std::string& model_dir() {
  static const std::string dir = []() -> std::string {
    const fs::path helper = source_dir() / "tests/python_helpers/msr_torch.py";
    const fs::path writer = source_dir() / "scripts/safetensors_write.py";
    if (!fs::exists(python()) || !fs::exists(helper)) return std::string();
    std::error_code ec;
    fs::path base = fs::read_symlink("/proc/self/exe", ec).parent_path();
    if (ec || base.empty()) base = fs::temp_directory_path();
    const fs::path cache =
        base / ("model_files_" + std::to_string(file_hash(writer, file_hash(helper))));
    if (fs::exists(cache / "msr_expected.safetensors")) return cache.string();
    std::random_device rd;
    const fs::path fresh = base / ("model_files_tmp_" + std::to_string(rd()));
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
  }();
  return dir;
}

MsrConfig config_of(const SafetensorsReader& file) {
  MsrConfig c;
  c.embed_dim = std::stol(file.metadata().at("embed_dim"));
  c.value_dim = std::stol(file.metadata().at("value_dim"));
  c.heads = std::stol(file.metadata().at("heads"));
  return c;  // torchscale defaults otherwise: retnet gammas, decay_and_score, RMSNorm eps 1e-6
}

#define REQUIRE_MODEL_FILES() \
  if (model_dir().empty())    \
    GTEST_SKIP() << python() << " with torch is not available (set RETENTION_PYTHON)";

constexpr double kTol = 1e-12;

std::string sci(double x) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << x;
  return s.str();
}

TEST(ModelFiles, MsrMatchesTorchInEveryForm) {
  REQUIRE_MODEL_FILES();
  const SafetensorsReader model(model_dir() + "/msr_model.safetensors");
  const SafetensorsReader expected(model_dir() + "/msr_expected.safetensors");
  const std::string prefix = model.metadata().at("prefix");
  MultiScaleRetention<double> layer(config_of(model));
  layer.load(retention::io::parameters(model), prefix);
  const Matrix<double> x = expected.to_matrix<double>("x_a");
  const Matrix<double> y = expected.to_matrix<double>("y_a");
  for (Form form : {Form::parallel, Form::recurrent, Form::chunkwise}) {
    const double err = relative_error(layer.forward(x, form, 5), y);
    EXPECT_LE(err, kTol) << retention::to_string(form);
    RecordProperty(std::string("rel_err_") + retention::to_string(form), sci(err));
  }
}

TEST(ModelFiles, MsrPrefillAndDecodeMatchTorch) {
  REQUIRE_MODEL_FILES();
  const SafetensorsReader model(model_dir() + "/msr_model.safetensors");
  const SafetensorsReader expected(model_dir() + "/msr_expected.safetensors");
  MultiScaleRetention<double> layer(config_of(model));
  layer.load(retention::io::parameters(model), model.metadata().at("prefix"));
  const Matrix<double> x = expected.to_matrix<double>("x_a");
  const Matrix<double> y = expected.to_matrix<double>("y_a");
  const Index prompt = 10;
  auto state = layer.make_state();
  Matrix<double> got(x.rows(), x.cols());
  got.topRows(prompt) = layer.prefill(x.topRows(prompt), state);
  for (Index t = prompt; t < x.rows(); ++t) got.row(t) = layer.step(x.row(t), state);
  const double err = relative_error(got, y);
  EXPECT_LE(err, kTol);
  RecordProperty("rel_err", sci(err));
}

TEST(ModelFiles, MsrPackedPrefillAndBatchedDecodeMatchTorch) {
  REQUIRE_MODEL_FILES();
  const SafetensorsReader model(model_dir() + "/msr_model.safetensors");
  const SafetensorsReader expected(model_dir() + "/msr_expected.safetensors");
  MultiScaleRetention<double> layer(config_of(model));
  layer.load(retention::io::parameters(model), model.metadata().at("prefix"));
  const Matrix<double> xa = expected.to_matrix<double>("x_a"),
                       ya = expected.to_matrix<double>("y_a");
  const Matrix<double> xb = expected.to_matrix<double>("x_b"),
                       yb = expected.to_matrix<double>("y_b");
  // Prompts of 6 and 2 tokens packed together, then the rest decoded in one batch (b finishes
  // first and leaves the batch).
  const Index pa = 6, pb = 2;
  Matrix<double> packed(pa + pb, xa.cols());
  packed << xa.topRows(pa), xb.topRows(pb);
  auto sa = layer.make_state(), sb = layer.make_state();
  const Matrix<double> yp = layer.prefill_packed(packed, {0, pa, pa + pb}, {&sa, &sb});
  Matrix<double> got_a(xa.rows(), xa.cols()), got_b(xb.rows(), xb.cols());
  got_a.topRows(pa) = yp.topRows(pa);
  got_b.topRows(pb) = yp.bottomRows(pb);
  MultiScaleRetention<double>::BatchWorkspace work;
  Index ta = pa, tb = pb;
  while (ta < xa.rows()) {
    std::vector<retention::MsrState<double>*> states{&sa};
    Matrix<double> x(1, xa.cols());
    x.row(0) = xa.row(ta);
    if (tb < xb.rows()) {
      states.push_back(&sb);
      x.conservativeResize(2, Eigen::NoChange);
      x.row(1) = xb.row(tb);
    }
    Matrix<double> yt(x.rows(), x.cols());
    layer.step_batch(x, states, yt, work);
    got_a.row(ta++) = yt.row(0);
    if (yt.rows() == 2) got_b.row(tb++) = yt.row(1);
  }
  EXPECT_EQ(tb, xb.rows());
  const double err_a = relative_error(got_a, ya), err_b = relative_error(got_b, yb);
  EXPECT_LE(err_a, kTol);
  EXPECT_LE(err_b, kTol);
  RecordProperty("rel_err_a", sci(err_a));
  RecordProperty("rel_err_b", sci(err_b));
}

TEST(ModelFiles, MsrBf16WeightsMatchTorchOfRoundedWeights) {
  REQUIRE_MODEL_FILES();
  const SafetensorsReader model(model_dir() + "/msr_model_bf16.safetensors");
  const SafetensorsReader expected(model_dir() + "/msr_expected.safetensors");
  ASSERT_EQ(model.get(model.metadata().at("prefix") + "q_proj.weight").dtype(),
            retention::io::DType::bf16);
  const Matrix<double> x = expected.to_matrix<double>("x_a");
  const Matrix<double> y = expected.to_matrix<double>("y_a_bf16");
  MultiScaleRetention<double> layer(config_of(model));
  layer.load(retention::io::parameters(model), model.metadata().at("prefix"));
  const double err = relative_error(layer.forward(x), y);
  EXPECT_LE(err, kTol);
  RecordProperty("rel_err_double", sci(err));
  // float layer from the same BF16 file: float rounding only (SPEC 6).
  MultiScaleRetention<float> layer_f(config_of(model));
  layer_f.load(retention::io::parameters(model), model.metadata().at("prefix"));
  const double err_f = relative_error(layer_f.forward(x.cast<float>()), y);
  EXPECT_LE(err_f, 1e-5);
  RecordProperty("rel_err_float", sci(err_f));
}

TEST(ModelFiles, WrongPrefixNamesTheMissingParameter) {
  REQUIRE_MODEL_FILES();
  const SafetensorsReader model(model_dir() + "/msr_model.safetensors");
  MultiScaleRetention<double> layer(config_of(model));
  retention_test::expect_shape_error(
      [&] { layer.load(retention::io::parameters(model), "layers.0.retention."); },
      "missing parameter 'layers.0.retention.q_proj.weight'");
}

}  // namespace
