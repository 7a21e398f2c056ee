// Running a test on every instruction set this processor runs (retention/isa.hpp).
#pragma once

#include <retention/isa.hpp>

#include <vector>

namespace retention_test {

/// The instruction sets this processor runs, baseline first.
inline std::vector<retention::Isa> isa_variants() {
  std::vector<retention::Isa> out;
  for (retention::Isa isa :
       {retention::Isa::baseline, retention::Isa::avx2, retention::Isa::avx512})
    if (isa <= retention::cpu_isa()) out.push_back(isa);
  return out;
}

/// Restores the instruction set that was active when it was made, when its scope ends (also after
/// a failed assertion); made with an instruction set, selects that one meanwhile.
class IsaScope {
 public:
  IsaScope() : saved_(retention::active_isa()) {}
  explicit IsaScope(retention::Isa isa) : IsaScope() { retention::set_active_isa(isa); }
  ~IsaScope() { retention::set_active_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  retention::Isa saved_;
};

}  // namespace retention_test
