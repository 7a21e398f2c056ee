// The tour that `make demo` runs: one line per operator of the library, each form's time and the
// forms' worst relative disagreement. Each section lives in examples/tour/ next to this file.
#include <retention/retention.hpp>

#include "tour/tour_backward.hpp"
#include "tour/tour_common.hpp"
#include "tour/tour_msr.hpp"
#include "tour/tour_retention.hpp"
#include "tour/tour_rmt.hpp"
#include "tour/tour_vir.hpp"

#include <cstdio>

int main() {
  std::printf("retention tour (float32; times are medians of 3 runs on this machine)\n");
  tour::print_header();
  tour::tour_retention();
  tour::tour_msr();
  tour::tour_rmt();
  tour::tour_vir();
  tour::tour_backward();
  return 0;
}
