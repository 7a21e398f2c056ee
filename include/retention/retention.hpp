// retention: umbrella header. Includes every public header of the library.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/common.hpp>
#include <retention/decay.hpp>
#include <retention/masa.hpp>
#include <retention/msr.hpp>
#include <retention/multihead.hpp>
#include <retention/norms.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/retention_state.hpp>
#include <retention/rmt.hpp>
#include <retention/rotation.hpp>
#include <retention/vir.hpp>
