// retention-test-links: compiled
// retention-test-requires: nlohmann_json
// Saved decoding states: decode N tokens through a stack of MSR layers, save the sequence's state
// (every layer) to safetensors, restore it into fresh states, decode more: outputs bitwise equal
// to never having saved. Names and dtypes in the file; every malformed state file is a file_error
// that leaves the states unchanged.
#include <retention/io/safetensors.hpp>
#include <retention/io/states.hpp>
#include <retention/layers/msr.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MsrState;
using retention::MultiScaleRetention;
using retention::io::file_error;
using retention::io::SafetensorsReader;
using retention::io::TensorMap;
using retention_test::random_matrix;

struct TempFile {
  std::string path;
  TempFile() {
    std::random_device rd;
    path =
        (fs::temp_directory_path() / ("retention_state_" + std::to_string(rd()) + ".safetensors"))
            .string();
  }
  ~TempFile() {
    std::error_code ignored;
    fs::remove(path, ignored);
  }
};

/// A small model: layers of different widths, so that shapes differ between layers.
template <class T>
std::vector<MultiScaleRetention<T>> make_model() {
  std::vector<MultiScaleRetention<T>> layers;
  for (int l = 0; l < 3; ++l) {
    MsrConfig c;
    c.embed_dim = 8;
    c.value_dim = 8 * (l + 1);
    c.heads = l == 1 ? 4 : 2;
    layers.emplace_back(c);
    layers.back().init_random(static_cast<std::uint64_t>(10 + l));
  }
  return layers;
}

/// Runs tokens x [n, d] through every layer in decoding mode; returns the last layer's outputs.
template <class T>
Matrix<T> decode(const std::vector<MultiScaleRetention<T>>& model, std::vector<MsrState<T>>& states,
                 const Matrix<T>& x) {
  Matrix<T> y(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    retention::RowVector<T> h = x.row(t);
    for (std::size_t l = 0; l < model.size(); ++l) h = model[l].step(h, states[l]);
    y.row(t) = h;
  }
  return y;
}

template <class T>
std::vector<MsrState<T>> fresh_states(const std::vector<MultiScaleRetention<T>>& model) {
  std::vector<MsrState<T>> s;
  for (const auto& l : model) s.push_back(l.make_state());
  return s;
}

template <class T>
class StateIo : public ::testing::Test {};
TYPED_TEST_SUITE(StateIo, retention_test::ScalarTypes, retention_test::ScalarName);

TYPED_TEST(StateIo, RestoredDecodingContinuesBitIdentically) {
  using T = TypeParam;
  const auto model = make_model<T>();
  const Matrix<T> prompt = random_matrix<T>(11, 8, 1), more = random_matrix<T>(7, 8, 2);
  auto states = fresh_states(model);
  // A prefill and some decoding before the save, as a conversation would have.
  model[0].prefill(random_matrix<T>(5, 8, 3), states[0]);
  decode(model, states, prompt);
  TempFile file;
  retention::io::save_states(file.path, states);
  auto never_saved = states;
  const Matrix<T> expect = decode(model, never_saved, more);

  auto restored = fresh_states(model);
  retention::io::load_states(file.path, restored);
  for (std::size_t l = 0; l < states.size(); ++l) {
    EXPECT_EQ(restored[l].position, states[l].position);
    for (std::size_t h = 0; h < states[l].heads.size(); ++h) {
      EXPECT_EQ(restored[l].heads[h].S, states[l].heads[h].S);
      EXPECT_EQ(restored[l].heads[h].z, states[l].heads[h].z);
      EXPECT_EQ(restored[l].heads[h].position, states[l].position);
    }
  }
  const Matrix<T> got = decode(model, restored, more);
  EXPECT_EQ(got, expect);  // bitwise
  EXPECT_EQ(restored[2].heads[0].S, never_saved[2].heads[0].S);
}

TEST(StateIoFile, NamesDtypesAndMetadata) {
  const auto model = make_model<float>();
  auto states = fresh_states(model);
  decode(model, states, random_matrix<float>(3, 8, 5));
  TempFile file;
  retention::io::save_states(file.path, states, {{"conversation", "42"}});
  const SafetensorsReader r(file.path);
  EXPECT_EQ(r.metadata().at("format"), "retention.decoding_state");
  EXPECT_EQ(r.metadata().at("layers"), "3");
  EXPECT_EQ(r.metadata().at("conversation"), "42");
  EXPECT_EQ(r.get("layers.1.heads.3.S").shape(), (std::vector<Index>{2, 4}));
  EXPECT_EQ(r.get("layers.2.heads.1.z").shape(), (std::vector<Index>{4}));
  EXPECT_EQ(r.get("layers.2.heads.1.S").dtype(), retention::io::DType::f32);
  EXPECT_EQ(r.get("layers.0.position").dtype(), retention::io::DType::i64);
  EXPECT_EQ(r.size(), 2u * (2 + 4 + 2) + 3u);
  EXPECT_EQ(r.get("layers.1.heads.2.S").to_matrix<float>(), states[1].heads[2].S);
}

/// Restoring `source` into the model's states throws a file_error containing `needle`, and the
/// states keep their values.
void expect_rejected(const retention::io::TensorSource& source, const std::string& needle) {
  const auto model = make_model<float>();
  auto states = fresh_states(model);
  decode(model, states, random_matrix<float>(2, 8, 6));
  const auto before = states;
  try {
    retention::io::load_states(source, states);
    ADD_FAILURE() << "expected file_error containing " << needle;
  } catch (const file_error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  for (std::size_t l = 0; l < states.size(); ++l) {
    EXPECT_EQ(states[l].position, before[l].position);
    EXPECT_EQ(states[l].heads[0].S, before[l].heads[0].S);
  }
}

TEST(StateIoErrors, MalformedStatesAreRejectedWithoutChanges) {
  const auto model = make_model<float>();
  auto states = fresh_states(model);
  decode(model, states, random_matrix<float>(4, 8, 7));
  const TensorMap good = retention::io::state_tensors(states);

  // A double state into float states: no silent conversion.
  const auto model_d = make_model<double>();
  auto states_d = fresh_states(model_d);
  expect_rejected(retention::io::state_tensors(states_d),
                  "tensor 'layers.0.heads.0.S': dtype is F64, expected F32");

  TensorMap missing = good;
  missing.erase("layers.2.heads.1.z");
  expect_rejected(missing, "tensor 'layers.2.heads.1.z': not found");

  TensorMap shape = good;
  shape.erase("layers.1.heads.0.S");
  shape.add("layers.1.heads.0.S", Matrix<float>::Zero(4, 2).eval());
  expect_rejected(shape, "tensor 'layers.1.heads.0.S': shape is [4, 2], expected [2, 4]");

  TensorMap negative = good;
  negative.erase("layers.0.position");
  const std::int64_t minus = -3;
  negative.add_bytes("layers.0.position", retention::io::DType::i64, {}, &minus, 8);
  expect_rejected(negative, "tensor 'layers.0.position': is -3, expected >= 0");

  TensorMap more_layers = good;
  more_layers.add_bytes("layers.3.position", retention::io::DType::i64, {}, &minus, 8);
  expect_rejected(more_layers, "more layers than the 3 states given");

  TensorMap more_heads = good;
  more_heads.add("layers.0.heads.2.S", Matrix<float>::Zero(2, 4).eval());
  expect_rejected(more_heads, "more heads in layer 0");

  TensorMap float_position = good;
  float_position.erase("layers.1.position");
  float_position.add("layers.1.position", Matrix<float>::Zero(1, 1).eval());
  expect_rejected(float_position, "expected an I64 scalar []");

  EXPECT_THROW(
      {
        auto s = fresh_states(model);
        retention::io::load_states(std::string("/nonexistent/dir/state.safetensors"), s);
      },
      file_error);
}

}  // namespace
