// retention/io: a sequence's decoding state (one MsrState per layer) as named tensors, saved to and
// restored from safetensors, so a conversation resumes exactly where it stopped: the bytes of S and
// z are stored as they are (dtype of the state's scalar), so restored decoding is bit-identical.
//
// Names: "layers.{l}.heads.{h}.S" [dk, dv], "layers.{l}.heads.{h}.z" [dk], "layers.{l}.position"
// (I64, rank 0). state_tensors / load_states(TensorSource) need only io/tensor.hpp; the file
// functions need nlohmann-json (through io/safetensors.hpp) and exist when it is available.
#pragma once

#include <retention/io/tensor.hpp>
#include <retention/layers/msr.hpp>

#if __has_include(<nlohmann/json.hpp>)
#include <retention/io/safetensors.hpp>
#endif

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace retention {
namespace io {

namespace detail {

inline std::string state_name(std::size_t layer, std::size_t head, const char* part) {
  return "layers." + std::to_string(layer) + ".heads." + std::to_string(head) + "." + part;
}
inline std::string position_name(std::size_t layer) {
  return "layers." + std::to_string(layer) + ".position";
}

/// Copies a tensor of exactly dtype_of<T> and shape `shape` into `out` (bytes as stored: no
/// conversion, so a restored state is bit-identical); file_error otherwise.
template <class T>
void read_exact(const TensorSource& source, const std::string& name,
                const std::vector<Index>& shape, T* out) {
  const TensorView v = source.get(name);
  if (v.dtype() != dtype_of<T>::value)
    io_fail(source.description(), name,
            std::string("dtype is ") + to_string(v.dtype()) + ", expected " +
                to_string(dtype_of<T>::value) + " (states are restored without conversion)");
  v.expect_shape(shape);
  for (Index i = 0; i < v.numel(); ++i)
    out[i] = load_le<T>(v.data() + static_cast<std::size_t>(i) * sizeof(T));
}

}  // namespace detail

/// The tensors of one sequence's decoding state over all layers (layers[l] = its MsrState in layer
/// l): S and z of every head in T's dtype, and each layer's position (I64). Copies the values.
template <class T>
TensorMap state_tensors(const std::vector<MsrState<T>>& layers) {
  TensorMap map("<decoding state>");
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const MsrState<T>& s = layers[l];
    for (std::size_t h = 0; h < s.heads.size(); ++h) {
      const RetentionState<T>& hs = s.heads[h];
      map.add<T>(detail::state_name(l, h, "S"), {hs.S.rows(), hs.S.cols()}, hs.S.data());
      map.add<T>(detail::state_name(l, h, "z"), {hs.z.size()}, hs.z.data());
    }
    unsigned char bytes[8];
    detail::store_le(static_cast<std::int64_t>(s.position), bytes);
    map.add_bytes(detail::position_name(l), DType::i64, {}, bytes, sizeof(bytes));
  }
  return map;
}

/// Restores one sequence's decoding state from `source` (state_tensors' names) into `layers`,
/// which must already have the model's shapes (model.make_state() per layer): every tensor must
/// have T's dtype and the state's shape, the source must hold exactly layers.size() layers and
/// each layer exactly its heads. All or nothing: on a file_error `layers` is unchanged.
template <class T>
void load_states(const TensorSource& source, std::vector<MsrState<T>>& layers) {
  const std::string origin = source.description();
  std::vector<MsrState<T>> restored = layers;
  for (std::size_t l = 0; l < restored.size(); ++l) {
    MsrState<T>& s = restored[l];
    const std::string pname = detail::position_name(l);
    const TensorView pv = source.get(pname);
    if (pv.dtype() != DType::i64 || pv.rank() != 0)
      detail::io_fail(origin, pname,
                      std::string("is ") + to_string(pv.dtype()) + " " + pv.shape_string() +
                          ", expected an I64 scalar []");
    const std::int64_t position = detail::load_le<std::int64_t>(pv.data());
    if (position < 0)
      detail::io_fail(origin, pname, "is " + std::to_string(position) + ", expected >= 0");
    for (std::size_t h = 0; h < s.heads.size(); ++h) {
      RetentionState<T>& hs = s.heads[h];
      detail::read_exact(source, detail::state_name(l, h, "S"), {hs.S.rows(), hs.S.cols()},
                         hs.S.data());
      detail::read_exact(source, detail::state_name(l, h, "z"), {hs.z.size()}, hs.z.data());
      hs.position = static_cast<Index>(position);
    }
    if (source.has(detail::state_name(l, s.heads.size(), "S")))
      detail::io_fail(origin, detail::state_name(l, s.heads.size(), "S"),
                      "the source has more heads in layer " + std::to_string(l) + " than the " +
                          std::to_string(s.heads.size()) + " of the state");
    s.position = static_cast<Index>(position);
  }
  if (source.has(detail::position_name(restored.size())))
    detail::io_fail(origin, detail::position_name(restored.size()),
                    "the source holds more layers than the " + std::to_string(restored.size()) +
                        " states given");
  for (std::size_t l = 0; l < layers.size(); ++l) {  // commit: nothing below can throw
    layers[l].heads.swap(restored[l].heads);
    layers[l].position = restored[l].position;
  }
}

#if __has_include(<nlohmann/json.hpp>)

/// Writes state_tensors(layers) to a safetensors file at `path`, with `metadata` plus
/// "format" = "retention.decoding_state" and "layers" = the layer count in its __metadata__.
template <class T>
void save_states(const std::string& path, const std::vector<MsrState<T>>& layers,
                 Metadata metadata = Metadata()) {
  metadata["format"] = "retention.decoding_state";
  metadata["layers"] = std::to_string(layers.size());
  write_safetensors(path, state_tensors(layers), metadata);
}

/// Restores `layers` from a file written by save_states (see load_states(TensorSource, ...)).
template <class T>
void load_states(const std::string& path, std::vector<MsrState<T>>& layers) {
  const SafetensorsReader reader(path);
  load_states(static_cast<const TensorSource&>(reader), layers);
}

#endif

}  // namespace io
}  // namespace retention
