// retention::detail: the ln D tiles of MaSA's line kernels, read from the two 1-D
// axis log-tables of a separable 2-D mask (docs/math.md §1.2: D = row_axis (x) column_axis in
// raster order), never from a distance formula of their own.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <limits>

namespace retention {
namespace detail {

/// ln D of a 2-D separable mask over an H x W grid in raster order n = y W + x:
/// ln D[n, m] = ly[y_n, y_m] + lx[x_n, x_m], with ly [H, H] from the mask's row_axis() (along y)
/// and lx [W, W] from its column_axis() (along x). O(H^2 + W^2) values.
template <class T>
class GridLogTile {
 public:
  template <class Mask>
  explicit GridLogTile(const Mask& mask)
      : width_(mask.width()),
        ly_(mask.row_axis().template log_weights<T>(0, mask.height(), 0, mask.height())),
        lx_(mask.column_axis().template log_weights<T>(0, mask.width(), 0, mask.width())) {}

  /// Writes ln D over [n0, n0 + tile.rows()) x [m0, m0 + tile.cols()) into a dense tile (a
  /// matrix, Map or Block); false when all are -inf.
  template <class Tile>
  bool operator()(Index n0, Index m0, Tile&& tile) const {
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();
    bool any = false;
    for (Index i = 0; i < tile.rows(); ++i) {
      const Index yn = (n0 + i) / width_, xn = (n0 + i) % width_;
      // Keys of one grid row are consecutive: one ly term plus a contiguous piece of lx's row.
      for (Index j = 0; j < tile.cols();) {
        const Index ym = (m0 + j) / width_, xm = (m0 + j) % width_;
        const Index len = std::min(width_ - xm, tile.cols() - j);
        const T a = ly_(yn, ym);
        if (a == neg_inf) {
          tile.row(i).segment(j, len).setConstant(neg_inf);
        } else {
          tile.row(i).segment(j, len) = lx_.row(xn).segment(xm, len).array() + a;
          any = any || lx_.row(xn).segment(xm, len).maxCoeff() > neg_inf;
        }
        j += len;
      }
    }
    return any;
  }

 private:
  Index width_;
  Matrix<T> ly_, lx_;
};

}  // namespace detail
}  // namespace retention
