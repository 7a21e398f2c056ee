// Compiled by the consumer tests against an installed, add_subdirectory'd and fetched retention.
#if defined(RETENTION_CONSUMER_UMBRELLA)
#include <retention/retention.hpp>
#else
#include <retention/decay.hpp>
#endif

int main() {
  retention::CausalDecay d(0.9);
  (void)d;
  return 0;
}
