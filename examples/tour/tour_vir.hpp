// Tour section: ViR (docs/math.md §5). One line for multi-head retention on ViR-S/16's token count,
// one for the whole ViR-S/16 encoder at 224 px (each form's time and the worst disagreement between
// forms) and one for the encoder with packed weights (against the unpacked features).
#pragma once

#include <retention/layers/vir.hpp>

#include "tour_common.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tour {

inline void tour_vir() {
  using retention::Form;
  using retention::Index;
  using retention::VirOptions;
  using retention::VirOrder;
  const retention::VirEncoder<float> model(retention::vir_s16(),
                                           0);  // deterministic random weights
  const Index size = 224, tokens = (size / 16) * (size / 16) + 1;

  auto make = [](Form f, Index chunk, VirOrder order) {
    VirOptions o;
    o.form = f;
    o.chunk = chunk;
    o.order = order;
    return o;
  };
  const std::vector<std::pair<const char*, VirOptions>> mhr_forms = {
      {"parallel", make(Form::parallel, 64, VirOrder::layer_major)},
      {"recurrent", make(Form::recurrent, 64, VirOrder::layer_major)},
      {"chunkwise", make(Form::chunkwise, 64, VirOrder::layer_major)}};

  // MHR of the first block on [197, 384] tokens (6 heads of 64).
  {
    const retention::VirRetention<float>& mhr = model.blocks().front().retention();
    retention::Matrix<float> x(tokens, 384);
    for (Index i = 0; i < x.size(); ++i)
      x.data()[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)));
    std::vector<FormTime> times;
    std::vector<retention::Matrix<float>> outs;
    for (const auto& form : mhr_forms) {
      const VirOptions o = form.second;  // (clang 14 cannot capture structured bindings)
      times.push_back({form.first, median_ms([&] { outs.push_back(mhr.forward(x, o)); })});
    }
    double worst = 0.0;
    for (const auto& y : outs) worst = std::max(worst, rel_diff(y, outs.front()));
    print_line("ViR MHR (C 384, 6 heads)", "T 197, chunk 64", times, worst);
  }

  // The encoder: an image with a smooth pattern, every form, the class-token feature compared.
  {
    std::vector<float> img(static_cast<std::size_t>(size * size * 3));
    for (Index y = 0; y < size; ++y)
      for (Index x = 0; x < size; ++x)
        for (Index c = 0; c < 3; ++c)
          img[static_cast<std::size_t>((y * size + x) * 3 + c)] = static_cast<float>(
              std::sin(0.05 * static_cast<double>(x * (c + 1)) + 0.03 * static_cast<double>(y)));
    const retention::ImageView<float> view{img.data(), size, size, 3};
    const std::vector<std::pair<const char*, VirOptions>> forms = {
        mhr_forms[0],
        mhr_forms[1],
        mhr_forms[2],
        {"chunk-major", make(Form::chunkwise, 64, VirOrder::chunk_major)}};
    std::vector<FormTime> times;
    std::vector<retention::RowVector<float>> feats;
    for (const auto& form : forms) {
      const VirOptions o = form.second;
      retention::RowVector<float> f;
      times.push_back({form.first, median_ms([&] { f = model.forward(view, o); })});
      feats.push_back(f);
    }
    double worst = 0.0;
    for (const auto& f : feats) worst = std::max(worst, rel_diff(f, feats.front()));
    print_line("ViR-S/16 encoder feature", "224 px, 197 tokens, chunk 64", times, worst);

    // The same model with its Linears packed once (VirConfig::packed_weights; twice the weights'
    // memory): the two orders, each compared with the unpacked model's feature.
    retention::VirConfig packed_config = retention::vir_s16();
    packed_config.packed_weights = true;
    const retention::VirEncoder<float> packed(packed_config, 0);
    std::vector<FormTime> packed_times;
    double packed_worst = 0.0;
    for (std::size_t i : {std::size_t(0), std::size_t(3)}) {
      const VirOptions o = forms[i].second;
      retention::RowVector<float> f;
      packed_times.push_back({forms[i].first, median_ms([&] { f = packed.forward(view, o); })});
      packed_worst = std::max(packed_worst, rel_diff(f, feats[i]));
    }
    print_line("ViR-S/16 encoder, packed", "224 px, 197 tokens, chunk 64", packed_times,
               packed_worst);
  }
}

}  // namespace tour
