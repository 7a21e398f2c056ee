// Serving a small RetNet: write a random model (token embedding + MSR layers) to safetensors, load
// it back by name, prefill 16 prompts of different lengths in one packed call, decode them greedily
// in one batch while sequences finish at different times (continuous batching), save one
// sequence's state and resume from the file, and compare tokens/s of the batch against decoding
// the sequences one by one. Needs nlohmann-json (the safetensors header parser).
#if __has_include(<nlohmann/json.hpp>)

#include <retention/io/parameters.hpp>
#include <retention/io/safetensors.hpp>
#include <retention/io/states.hpp>
#include <retention/layers/msr.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

using retention::Index;
using retention::Matrix;
using retention::MsrState;
using retention::MultiScaleRetention;

namespace {

constexpr Index kVocab = 256, kDim = 256, kHeads = 4, kLayers = 4, kBatch = 16;

/// A toy RetNet: h = E[token]; h += MSR_l(h) per layer; logits = h E^T (tied embedding).
struct Model {
  Matrix<float> embed;
  std::vector<MultiScaleRetention<float>> layers;

  retention::MsrConfig config() const {
    retention::MsrConfig c;
    c.embed_dim = kDim;
    c.value_dim = 2 * kDim;
    c.heads = kHeads;
    return c;
  }
  Index greedy(const Eigen::Ref<const retention::RowVector<float>>& h) const {
    Index best = 0;
    (h * embed.transpose()).maxCoeff(&best);
    return best;
  }
  /// One sequence's states, one per layer.
  std::vector<MsrState<float>> new_states() const {
    std::vector<MsrState<float>> s;
    for (const auto& l : layers) s.push_back(l.make_state());
    return s;
  }
};

/// Writes a random model in torchscale-style names to `path`.
void write_random_model(const std::string& path) {
  Model m;
  retention::io::TensorMap tensors;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> embed(kVocab, kDim);
  for (Index i = 0; i < embed.size(); ++i) embed.data()[i] = normal(rng);
  tensors.add("embed_tokens.weight", embed);
  for (Index l = 0; l < kLayers; ++l) {
    MultiScaleRetention<float> layer(m.config());
    layer.init_random(static_cast<std::uint64_t>(100 + l));
    const std::string prefix = "layers." + std::to_string(l) + ".retention.";
    tensors.add(prefix + "q_proj.weight", layer.q_proj().weight());
    tensors.add(prefix + "k_proj.weight", layer.k_proj().weight());
    tensors.add(prefix + "v_proj.weight", layer.v_proj().weight());
    tensors.add(prefix + "g_proj.weight", layer.g_proj().weight());
    tensors.add(prefix + "out_proj.weight", layer.out_proj().weight());
  }
  retention::io::write_safetensors(path, tensors, {{"format", "pt"}});
}

Model load_model(const std::string& path) {
  const retention::io::SafetensorsReader file(path);
  const retention::ParameterMap params = retention::io::parameters(file);
  Model m;
  m.embed = file.to_matrix<float>("embed_tokens.weight", {kVocab, kDim});
  for (Index l = 0; l < kLayers; ++l) {
    m.layers.emplace_back(m.config());
    m.layers.back().load(params, "layers." + std::to_string(l) + ".retention.");
  }
  return m;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string model_path = (dir / "retention_05_serve_model.safetensors").string();
  const std::string state_path = (dir / "retention_05_serve_state.safetensors").string();
  write_random_model(model_path);
  const Model model = load_model(model_path);
  std::printf("model: %ld layers, d = %ld, %ld heads, vocab %ld, loaded from %s\n",
              static_cast<long>(kLayers), static_cast<long>(kDim), static_cast<long>(kHeads),
              static_cast<long>(kVocab), model_path.c_str());

  // 16 prompts of different lengths, and how many tokens each will generate.
  std::mt19937_64 rng(11);
  std::vector<std::vector<Index>> prompts(kBatch);
  std::vector<Index> cu{0}, budget(kBatch);
  for (Index b = 0; b < kBatch; ++b) {
    const Index n = 1 + static_cast<Index>(rng() % 60);
    for (Index t = 0; t < n; ++t) prompts[b].push_back(static_cast<Index>(rng() % kVocab));
    cu.push_back(cu.back() + n);
    budget[b] = 8 + static_cast<Index>(rng() % 56);
  }

  // Packed prefill: all prompts in one call per layer, one state per (sequence, layer).
  std::vector<std::vector<MsrState<float>>> states(kBatch);  // states[b][layer]
  for (auto& s : states) s = model.new_states();
  Matrix<float> h(cu.back(), kDim);
  for (Index b = 0; b < kBatch; ++b)
    for (std::size_t t = 0; t < prompts[b].size(); ++t)
      h.row(cu[b] + static_cast<Index>(t)) = model.embed.row(prompts[b][t]);
  auto t0 = std::chrono::steady_clock::now();
  for (Index l = 0; l < kLayers; ++l) {
    std::vector<MsrState<float>*> layer_states;
    for (auto& s : states) layer_states.push_back(&s[l]);
    h += model.layers[l].prefill_packed(h, cu, layer_states);
  }
  std::printf("packed prefill of %ld prompts (%ld tokens, lengths 1..60): %.1f ms\n",
              static_cast<long>(kBatch), static_cast<long>(cu.back()), 1e3 * seconds_since(t0));
  std::vector<Index> next(kBatch);
  for (Index b = 0; b < kBatch; ++b) next[b] = model.greedy(h.row(cu[b + 1] - 1));
  const auto after_prefill = states;
  const auto first_tokens = next;

  // Batched greedy decoding; a sequence leaves the batch when its budget is spent.
  std::vector<std::vector<Index>> batch_out(kBatch);
  std::vector<MultiScaleRetention<float>::BatchWorkspace> work(kLayers);
  Index decoded = 0;
  t0 = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<Index> active;
    for (Index b = 0; b < kBatch; ++b)
      if (static_cast<Index>(batch_out[b].size()) < budget[b]) active.push_back(b);
    if (active.empty()) break;
    const Index n = static_cast<Index>(active.size());
    Matrix<float> x(n, kDim), y(n, kDim);
    for (Index i = 0; i < n; ++i) {
      batch_out[active[i]].push_back(next[active[i]]);
      x.row(i) = model.embed.row(next[active[i]]);
    }
    for (Index l = 0; l < kLayers; ++l) {
      std::vector<MsrState<float>*> ptrs;
      for (Index b : active) ptrs.push_back(&states[b][l]);
      model.layers[l].step_batch(x, ptrs, y, work[l]);
      x += y;
    }
    for (Index i = 0; i < n; ++i) next[active[i]] = model.greedy(x.row(i));
    decoded += n;
  }
  const double batch_s = seconds_since(t0);

  // The same decoding one sequence at a time.
  auto single_states = after_prefill;
  std::vector<std::vector<Index>> single_out(kBatch);
  t0 = std::chrono::steady_clock::now();
  for (Index b = 0; b < kBatch; ++b) {
    Index token = first_tokens[b];
    for (Index t = 0; t < budget[b]; ++t) {
      single_out[b].push_back(token);
      retention::RowVector<float> x = model.embed.row(token);
      for (Index l = 0; l < kLayers; ++l) x += model.layers[l].step(x, single_states[b][l]);
      token = model.greedy(x);
    }
  }
  const double single_s = seconds_since(t0);
  Index same = 0;
  for (Index b = 0; b < kBatch; ++b) same += batch_out[b] == single_out[b];
  std::printf(
      "decoded %ld tokens (budgets 8..63): batch %.0f tokens/s, one by one %.0f tokens/s "
      "(%.2fx); %ld of %ld sequences generated identical tokens both ways\n",
      static_cast<long>(decoded), static_cast<double>(decoded) / batch_s,
      static_cast<double>(decoded) / single_s, single_s / batch_s, static_cast<long>(same),
      static_cast<long>(kBatch));

  // Save sequence 3 after its prefill, restore it into fresh states and continue: bit-identical.
  retention::io::save_states(state_path, after_prefill[3]);
  auto restored = model.new_states();
  retention::io::load_states(state_path, restored);
  auto original = after_prefill[3];
  bool identical = true;
  Index token = first_tokens[3];
  for (Index t = 0; t < budget[3]; ++t) {
    retention::RowVector<float> a = model.embed.row(token), c = a;
    for (Index l = 0; l < kLayers; ++l) {
      a += model.layers[l].step(a, original[l]);
      c += model.layers[l].step(c, restored[l]);
    }
    identical = identical && a == c;
    token = model.greedy(a);
  }
  std::printf(
      "state of sequence 3 saved to %s (%zu bytes of S and z over %ld layers), restored: "
      "continued decoding is %s\n",
      state_path.c_str(), original[0].bytes() * static_cast<std::size_t>(kLayers),
      static_cast<long>(kLayers), identical ? "bit-identical" : "DIFFERENT");
  std::filesystem::remove(model_path);
  std::filesystem::remove(state_path);
  return identical ? 0 : 1;
}

#else
#include <cstdio>
int main() {
  std::puts("05_serve needs nlohmann-json (Debian: nlohmann-json3-dev) for safetensors files");
  return 0;
}
#endif
