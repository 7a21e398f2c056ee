// retention::detail: the in-register transpose of key rows that the score kernels read (K^T).
#pragma once

#include <retention/core.hpp>

#include <algorithm>

namespace retention {
namespace detail {

/// kt [dk, ld] = K^T of `rows` key rows of x (row stride ldx), zero beyond column `rows`: the keys
/// of MaSA/MaSAD tiles and of retention chunks. Whole packet x packet blocks go through registers
/// (Eigen's in-register ptranspose, as its GEMM packing does); a scalar strided copy of K would
/// cost about as much as the logit product it feeds. When ld >= rows rounded up to packets, a
/// ragged last block of rows is transposed whole as well.
template <class T>
void transpose_rows(const T* x, Index ldx, Index rows, Index dk, T* kt, Index ld) {
  for (Index c = 0; c < dk; ++c) std::fill(kt + c * ld + rows, kt + (c + 1) * ld, T(0));
  Index j0 = 0;
#if defined(EIGEN_VECTORIZE)
// PacketBlock<__m512, ..>: GCC notes that the vector type's alignment attribute is not part of the
// template argument, which is harmless here (Eigen's own GEMM does the same inside a system
// header).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr Index P = Eigen::internal::packet_traits<T>::size;
  const Index c_full = dk / P * P;
  for (; j0 + P <= rows; j0 += P) {
    for (Index c0 = 0; c0 < c_full; c0 += P) {
      Eigen::internal::PacketBlock<Packet, static_cast<int>(P)> block;
      for (Index r = 0; r < P; ++r)
        block.packet[r] = Eigen::internal::ploadu<Packet>(x + (j0 + r) * ldx + c0);
      Eigen::internal::ptranspose(block);
      for (Index r = 0; r < P; ++r)
        Eigen::internal::pstoreu(kt + (c0 + r) * ld + j0, block.packet[r]);
    }
    for (Index j = j0; j < j0 + P; ++j)
      for (Index c = c_full; c < dk; ++c) kt[c * ld + j] = x[j * ldx + c];
  }
  // A ragged last block of rows (a 56-token line is 3.5 packets) goes through the same transpose
  // with zero rows standing in for the missing ones: whole packets land in kt's zero padding.
  if (j0 < rows && ld >= j0 + P) {
    const Index tail = rows - j0;
    for (Index c0 = 0; c0 < c_full; c0 += P) {
      Eigen::internal::PacketBlock<Packet, static_cast<int>(P)> block;
      for (Index r = 0; r < P; ++r)
        block.packet[r] = r < tail ? Eigen::internal::ploadu<Packet>(x + (j0 + r) * ldx + c0)
                                   : Eigen::internal::pset1<Packet>(T(0));
      Eigen::internal::ptranspose(block);
      for (Index r = 0; r < P; ++r)
        Eigen::internal::pstoreu(kt + (c0 + r) * ld + j0, block.packet[r]);
    }
    for (Index j = j0; j < rows; ++j)
      for (Index c = c_full; c < dk; ++c) kt[c * ld + j] = x[j * ldx + c];
    j0 = rows;
  }
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#endif
  for (Index j = j0; j < rows; ++j)
    for (Index c = 0; c < dk; ++c) kt[c * ld + j] = x[j * ldx + c];
}

}  // namespace detail
}  // namespace retention
