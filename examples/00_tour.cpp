// The tour that `make demo` runs: one line per operator of the library, each form's time and the
// forms' worst relative disagreement. Each section lives in examples/tour/ next to this file.
#include <retention/retention.hpp>

#include "tour/tour_common.hpp"
#if __has_include("tour/tour_retention.hpp")
#include "tour/tour_retention.hpp"
#define TOUR_HAS_RETENTION 1
#endif
#if __has_include("tour/tour_msr.hpp")
#include "tour/tour_msr.hpp"
#define TOUR_HAS_MSR 1
#endif
#if __has_include("tour/tour_rmt.hpp")
#include "tour/tour_rmt.hpp"
#define TOUR_HAS_RMT 1
#endif
#if __has_include("tour/tour_vir.hpp")
#include "tour/tour_vir.hpp"
#define TOUR_HAS_VIR 1
#endif

#include <cstdio>

int main() {
  std::printf("retention tour (float32; times are medians of 3 runs on this machine)\n");
  tour::print_header();
#ifdef TOUR_HAS_RETENTION
  tour::tour_retention();
#endif
#ifdef TOUR_HAS_MSR
  tour::tour_msr();
#endif
#ifdef TOUR_HAS_RMT
  tour::tour_rmt();
#endif
#ifdef TOUR_HAS_VIR
  tour::tour_vir();
#endif
  return 0;
}
