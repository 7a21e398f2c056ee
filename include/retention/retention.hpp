// retention: umbrella header. Includes every public header of the library except the optional
// parts with dependencies of their own (io/safetensors.hpp: nlohmann-json; mpi/: MPI) and io/.
#pragma once

// Core: types, masks, states, the head view and loop.
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/heads.hpp>
#include <retention/isa.hpp>
#include <retention/state.hpp>

// Operators, forward and backward.
#include <retention/backward.hpp>
#include <retention/chunkwise.hpp>
#include <retention/masa.hpp>
#include <retention/masa_backward.hpp>
#include <retention/multihead.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

// Building blocks of layers.
#include <retention/nn/activations.hpp>
#include <retention/nn/linear.hpp>
#include <retention/nn/norms.hpp>
#include <retention/nn/parameters.hpp>
#include <retention/nn/rotation.hpp>

// Layers.
#include <retention/layers/msr.hpp>
#include <retention/layers/rmt.hpp>
#include <retention/layers/vir.hpp>
