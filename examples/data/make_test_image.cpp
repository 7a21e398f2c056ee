// Writes the example's small test image (64 x 48, RGB) as test_image.png and test_image.ppm from a
// procedural pattern: a colour gradient, a disc, a ring and a checkered band, so that patches
// differ. Build and run from this directory (stb from Debian's libstb-dev):
//   g++ -O2 -std=c++17 -I/usr/include/stb make_test_image.cpp -o /tmp/make_test_image &&
//   /tmp/make_test_image
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int W = 64, H = 48;
  std::vector<unsigned char> rgb(static_cast<std::size_t>(W * H * 3));
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      double r = 255.0 * x / (W - 1), g = 255.0 * y / (H - 1), b = 128.0;
      const double dx = x - 40.0, dy = y - 20.0, d = std::sqrt(dx * dx + dy * dy);
      if (d < 10.0) {
        r = 250;
        g = 220;
        b = 40;
      }  // disc
      if (std::abs(std::hypot(x - 16.0, y - 32.0) - 9.0) < 2.0) {
        r = 20;
        g = 40;
        b = 220;
      }  // ring
      if (y >= 40 && ((x / 4 + y / 4) % 2 == 0)) {
        r = g = b = 15;
      }  // checkered band
      unsigned char* p = &rgb[static_cast<std::size_t>((y * W + x) * 3)];
      p[0] = static_cast<unsigned char>(r);
      p[1] = static_cast<unsigned char>(g);
      p[2] = static_cast<unsigned char>(b);
    }
  if (!stbi_write_png("test_image.png", W, H, 3, rgb.data(), W * 3)) return 1;
  std::FILE* f = std::fopen("test_image.ppm", "wb");
  if (!f) return 1;
  std::fprintf(f, "P6\n%d %d\n255\n", W, H);
  std::fwrite(rgb.data(), 1, rgb.size(), f);
  std::fclose(f);
  std::printf("wrote test_image.png and test_image.ppm (%d x %d)\n", W, H);
  return 0;
}
