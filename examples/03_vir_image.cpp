// ViR on an image: decode a PNG/JPEG/PPM with stb_image (Debian libstb-dev), resize it (bilinear)
// to 224 x 224, run a deterministic random ViR-S/16 in every form and check that they give the same
// feature; then, at 224, 448, 896 and 1024 pixels, time one image and measure peak memory for the
// parallel form and chunk-major chunkwise side by side, each in a fresh child process.
//
//   03_vir_image [image]            default: examples/data/test_image.png next to this source
//   03_vir_image --measure FORM SIZE [image]   (internal: one measurement, run in a child process)
//
// Peak memory is the child's VmHWM (/proc/self/status). The child builds the model, decodes and
// resizes the image, then resets the high-water mark (/proc/self/clear_refs, "5") so that the
// forward's own peak above the resident model is reported separately from the total.
// Threads: one by default (Eigen's GEMMs and the heads loop), so that the numbers are per core and
// do not collapse when the machine is shared (OpenMP threads spin-wait badly on busy cores); set
// OMP_NUM_THREADS to use more.
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>

#include <retention/layers/vir.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

using retention::Index;

struct Image {
  std::vector<float> rgb;  // [height, width, 3] row-major
  Index height = 0, width = 0;
};

std::string default_image_path() {
  std::string here = __FILE__;
  const std::size_t slash = here.find_last_of('/');
  here = slash == std::string::npos ? std::string(".") : here.substr(0, slash);
  return here + "/data/test_image.png";
}

/// Decodes any format stb_image reads into floats in [0, 1], 3 channels.
bool load_image(const std::string& path, Image& out) {
  int w = 0, h = 0, n = 0;
  unsigned char* px = stbi_load(path.c_str(), &w, &h, &n, 3);
  if (!px) {
    std::fprintf(stderr, "cannot read image %s: %s\n", path.c_str(), stbi_failure_reason());
    return false;
  }
  out.height = h;
  out.width = w;
  out.rgb.resize(static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * 3);
  for (std::size_t i = 0; i < out.rgb.size(); ++i) out.rgb[i] = static_cast<float>(px[i]) / 255.0f;
  stbi_image_free(px);
  return true;
}

/// Bilinear resize to size x size (pixel centres aligned, align_corners = false), then the usual
/// ImageNet normalisation per channel.
Image resize_normalize(const Image& in, Index size) {
  const float mean[3] = {0.485f, 0.456f, 0.406f}, stdev[3] = {0.229f, 0.224f, 0.225f};
  Image out;
  out.height = out.width = size;
  out.rgb.resize(static_cast<std::size_t>(size * size * 3));
  auto src = [](Index dst, Index n_out, Index n_in, Index& i0, Index& i1, float& f) {
    float s =
        (static_cast<float>(dst) + 0.5f) * static_cast<float>(n_in) / static_cast<float>(n_out) -
        0.5f;
    s = std::max(s, 0.0f);
    i0 = std::min(static_cast<Index>(s), n_in - 1);
    i1 = std::min(i0 + 1, n_in - 1);
    f = s - static_cast<float>(i0);
  };
  for (Index y = 0; y < size; ++y) {
    Index y0, y1;
    float fy;
    src(y, size, in.height, y0, y1, fy);
    for (Index x = 0; x < size; ++x) {
      Index x0, x1;
      float fx;
      src(x, size, in.width, x0, x1, fx);
      for (Index c = 0; c < 3; ++c) {
        auto at = [&](Index yy, Index xx) {
          return in.rgb[static_cast<std::size_t>((yy * in.width + xx) * 3 + c)];
        };
        const float v = (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) +
                        fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1));
        out.rgb[static_cast<std::size_t>((y * size + x) * 3 + c)] = (v - mean[c]) / stdev[c];
      }
    }
  }
  return out;
}

retention::ImageView<float> view_of(const Image& im) {
  return {im.rgb.data(), im.height, im.width, 3};
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// kB from a "Key:   123 kB" line of /proc/self/status; -1 if unavailable.
long status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::atol(line.c_str() + n + 1);
  return -1;
}

int thread_count() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  return env && std::atoi(env) > 0 ? std::atoi(env) : 1;
}

retention::VirOptions options_for(const std::string& form) {
  retention::VirOptions o;
  o.threads = thread_count();
  if (form == "parallel") {
    o.form = retention::Form::parallel;
  } else if (form == "recurrent") {
    o.form = retention::Form::recurrent;
  } else if (form.rfind("chunkwise", 0) == 0) {  // chunkwise<C>: layer-major
    o.form = retention::Form::chunkwise;
    o.chunk = std::atol(form.c_str() + 9);
  } else if (form.rfind("chunk-major", 0) == 0) {  // chunk-major<C>
    o.form = retention::Form::chunkwise;
    o.order = retention::VirOrder::chunk_major;
    o.chunk = std::atol(form.c_str() + 11);
  }
  return o;
}

/// Child mode: one forward at `size` px in `form`; prints "seconds total_peak_kb forward_peak_kb".
int measure(const std::string& form, Index size, const std::string& path) {
  Image raw;
  if (!load_image(path, raw)) return 1;
  const retention::VirEncoder<float> model(retention::vir_s16(), 0);
  const Image img = resize_normalize(raw, size);
  const long before = status_kb("VmRSS:");
  long forward_peak = -1;
  bool reset = false;
  {
    std::ofstream clear("/proc/self/clear_refs");
    reset = static_cast<bool>(clear << "5");
  }
  const auto t0 = std::chrono::steady_clock::now();
  const retention::RowVector<float> f = model.forward(view_of(img), options_for(form));
  const double s = seconds_since(t0);
  const long peak = status_kb("VmHWM:");
  if (reset && peak >= 0 && before >= 0) forward_peak = peak - before;
  std::printf("%.6f %ld %ld %.6g\n", s, peak, forward_peak, static_cast<double>(f(0)));
  return 0;
}

struct Measured {
  double seconds = -1;
  long peak_kb = -1, forward_kb = -1;
};

Measured run_child(const std::string& exe, const std::string& form, Index size,
                   const std::string& path) {
  Measured m;
  const std::string cmd =
      "'" + exe + "' --measure " + form + " " + std::to_string(size) + " '" + path + "'";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return m;
  double feature0 = 0;
  if (std::fscanf(p, "%lf %ld %ld %lf", &m.seconds, &m.peak_kb, &m.forward_kb, &feature0) != 4)
    m.seconds = -1;
  pclose(p);
  return m;
}

std::string self_path(const char* argv0) {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return argv0;
  buf[n] = '\0';
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(thread_count());
  if (argc >= 4 && std::string(argv[1]) == "--measure")
    return measure(argv[2], std::atol(argv[3]), argc >= 5 ? argv[4] : default_image_path());
  const std::string path = argc >= 2 ? argv[1] : default_image_path();

  Image raw;
  if (!load_image(path, raw)) return 1;
  std::printf("image %s: %ld x %ld, resized to 224 x 224; %d thread(s) (OMP_NUM_THREADS)\n",
              path.c_str(), static_cast<long>(raw.width), static_cast<long>(raw.height),
              thread_count());
  const retention::VirConfig cfg = retention::vir_s16();
  const auto tb = std::chrono::steady_clock::now();
  const retention::VirEncoder<float> model(cfg, 0);
  const double weights_mb = static_cast<double>(model.parameter_count()) * sizeof(float) / 1e6;
  std::printf(
      "ViR-S/16 (C %ld, %ld heads, %ld blocks): %.1f M parameters (%.0f MB float), deterministic "
      "random weights built in %.2f s\n",
      static_cast<long>(cfg.embed_dim), static_cast<long>(cfg.heads), static_cast<long>(cfg.depth),
      static_cast<double>(model.parameter_count()) / 1e6, weights_mb, seconds_since(tb));

  const Image img = resize_normalize(raw, 224);
  const std::vector<std::string> forms = {"parallel",      "recurrent",      "chunkwise64",
                                          "chunk-major64", "chunk-major128", "chunk-major7"};
  retention::RowVector<float> reference;
  std::printf("\n%-16s %10s %12s   %s\n", "form (224 px)", "images/s", "ms/image",
              "feature vs parallel (rel.)");
  for (const std::string& form : forms) {
    const retention::VirOptions o = options_for(form);
    retention::RowVector<float> f = model.forward(view_of(img), o);  // warm-up, and the feature
    const int runs = 3;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < runs; ++r) f = model.forward(view_of(img), o);
    const double s = seconds_since(t0) / runs;
    if (reference.size() == 0) reference = f;
    const double rel =
        (f.cast<double>() - reference.cast<double>()).norm() / reference.cast<double>().norm();
    std::printf("%-16s %10.2f %12.1f   %.2e\n", form.c_str(), 1.0 / s, 1e3 * s, rel);
  }
  std::printf("feature[0..3] = %.5f %.5f %.5f %.5f\n", static_cast<double>(reference(0)),
              static_cast<double>(reference(1)), static_cast<double>(reference(2)),
              static_cast<double>(reference(3)));

  const std::string exe = self_path(argv[0]);
  std::printf(
      "\nOne image per run, each run in a fresh process. peak = whole-process VmHWM (incl. the "
      "%.0f MB of\n"
      "weights); forward = peak growth during the forward (activations, retention states, GEMM "
      "buffers).\n",
      weights_mb);
  std::printf("%6s %7s | %-33s | %-33s\n", "pixels", "tokens", "parallel (layer-major)",
              "chunk-major chunkwise, chunk 64");
  std::printf("%6s %7s | %8s %8s %7s %8s | %8s %8s %7s %8s\n", "", "", "s", "img/s", "peak MB",
              "fwd MB", "s", "img/s", "peak MB", "fwd MB");
  for (const Index size : {Index(224), Index(448), Index(896), Index(1024)}) {
    const Measured a = run_child(exe, "parallel", size, path);
    const Measured b = run_child(exe, "chunk-major64", size, path);
    const Index tokens = (size / 16) * (size / 16) + 1;
    auto cell = [](const Measured& m) {
      std::printf(" %8.2f %8.2f %7.1f %8.1f |", m.seconds, m.seconds > 0 ? 1.0 / m.seconds : 0.0,
                  static_cast<double>(m.peak_kb) / 1024.0,
                  static_cast<double>(m.forward_kb) / 1024.0);
    };
    std::printf("%6ld %7ld |", static_cast<long>(size), static_cast<long>(tokens));
    cell(a);
    cell(b);
    std::printf("\n");
    std::fflush(stdout);
  }
  return 0;
}
