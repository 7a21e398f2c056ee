// retention::io: the bridge from any tensor source (a safetensors file, a TensorMap) to the
// ParameterMap every layer's load() reads: zero-copy views of its floating-point tensors.
#pragma once

#include <retention/io/tensor.hpp>
#include <retention/nn/parameters.hpp>

#include <string>

namespace retention {
namespace io {

/// Views of every f64/f32/f16/bf16 tensor of `source` under the same names (tensors of other
/// dtypes are left out: no layer parameter has them). The views point into the source's storage
/// (for a SafetensorsReader, the mapped file), which must outlive the map.
inline ParameterMap parameters(const TensorSource& source) {
  ParameterMap map;
  for (const std::string& name : source.names()) {
    const TensorView v = source.get(name);
    TensorRef t;
    switch (v.dtype()) {
      case DType::f64:
        t.dtype = retention::DType::float64;
        break;
      case DType::f32:
        t.dtype = retention::DType::float32;
        break;
      case DType::f16:
        t.dtype = retention::DType::float16;
        break;
      case DType::bf16:
        t.dtype = retention::DType::bfloat16;
        break;
      default:
        continue;
    }
    if (!detail::host_little_endian())
      continue;  // raw little-endian bytes cannot be viewed in place
    t.shape = v.shape();
    static const unsigned char empty = 0;  // a non-null address for tensors of no elements
    t.data = v.numel() == 0 ? &empty : v.data();
    map.add(name, std::move(t));
  }
  return map;
}

}  // namespace io
}  // namespace retention
