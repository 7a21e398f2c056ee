// retention: umbrella header. Includes every public header of the library.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/masa.hpp>
#include <retention/layers/msr.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/norms.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>
#include <retention/layers/rmt.hpp>
#include <retention/nn/rotation.hpp>
#include <retention/layers/vir.hpp>
