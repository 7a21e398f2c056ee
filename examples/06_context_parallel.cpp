// Context parallelism over MPI: one long sequence split across ranks, each rank holding one
// contiguous segment; an MSR layer prefills it together and the last rank goes on decoding.
// Only a per-head state summary crosses ranks (one scan of ceil(log2 P) rounds), however long the
// sequence is.
//
//   mpirun -np 4 ./build/examples/06_context_parallel [total_tokens]    (default 262144)
//   (as root add --allow-run-as-root; on a machine with fewer cores than ranks, --oversubscribe)
//
// Prints each rank's compute time, the scan's time and bytes, and the agreement with one process
// on a shorter sequence (outputs, the final state, decoded tokens).
#include <retention/layers/msr.hpp>
#include <retention/mpi/context_parallel.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using T = float;

/// Token t's input row, a function of (seed, t) only, so every rank can make its own rows of the
/// same sequence without anyone holding all of it.
Matrix<T> tokens(Index first, Index count, Index dim, std::uint64_t seed) {
  Matrix<T> x(count, dim);
  for (Index t = 0; t < count; ++t)
    for (Index j = 0; j < dim; ++j) {
      std::uint64_t z =
          seed + static_cast<std::uint64_t>((first + t) * dim + j) * 0x9E3779B97F4A7C15ull;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      x(t, j) = static_cast<T>(static_cast<double>(z >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
  return x;
}

/// This rank's share of `total` tokens: unequal on purpose (rank r gets a weight of 1 + r / 8).
void split(Index total, int P, int r, Index& first, Index& count) {
  double sum = 0.0, before = 0.0;
  for (int i = 0; i < P; ++i) sum += 1.0 + i / 8.0;
  for (int i = 0; i < r; ++i) before += 1.0 + i / 8.0;
  first = static_cast<Index>(static_cast<double>(total) * before / sum);
  const Index end =
      r == P - 1 ? total
                 : static_cast<Index>(static_cast<double>(total) * (before + 1.0 + r / 8.0) / sum);
  count = end - first;
}

double max_over_ranks(double v) {
  double out = 0.0;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

double relative(const Matrix<T>& a, const Matrix<T>& b) {
  const double den = b.template cast<double>().norm();
  return (a.template cast<double>() - b.template cast<double>()).norm() / (den > 0 ? den : 1.0);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    retention::mpi::ContextGroup group(MPI_COMM_WORLD);
    const int P = group.size(), rank = group.rank();
    const Index total = argc > 1 ? std::atoll(argv[1]) : Index(262144);
    const Index short_total = std::min<Index>(total, 16384);
    const Index decode = 8;

    retention::MsrConfig cfg;
    cfg.embed_dim = 64;
    cfg.value_dim = 64;
    cfg.heads = 4;  // dk = dv = 16, gammas 1 - 2^-5 .. 1 - 2^-8, decay_and_score
    cfg.threads = 1;
    retention::MultiScaleRetention<T> layer(cfg);
    layer.init_random(2024);  // every rank the same weights (the group checks them by hash)
    const Index d = cfg.embed_dim;

    // 1. The long prefill across the ranks.
    Index first = 0, count = 0;
    split(total, P, rank, first, count);
    const Matrix<T> x = tokens(first, count, d, 1);
    auto state = layer.make_state();
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    const Matrix<T> y = retention::mpi::context_parallel_prefill(group, layer, x, state);
    const double wall = max_over_ranks(MPI_Wtime() - t0);
    const retention::mpi::CallStats st = group.last_call();

    // Per-rank report, gathered on rank 0.
    const double mine[8] = {static_cast<double>(st.position),
                            static_cast<double>(st.length),
                            st.local_seconds,
                            st.summary_seconds,
                            st.check_seconds,
                            st.scan_seconds,
                            static_cast<double>(st.scan_bytes_sent),
                            static_cast<double>(st.scan_bytes_received)};
    std::vector<double> all(static_cast<std::size_t>(8 * P));
    MPI_Gather(mine, 8, MPI_DOUBLE, all.data(), 8, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      std::printf(
          "MSR layer d=%lld, %lld heads (dk=dv=%lld), float, decay_and_score; %lld tokens "
          "over %d ranks; scan record %zu bytes, %d rounds\n",
          static_cast<long long>(d), static_cast<long long>(cfg.heads),
          static_cast<long long>(layer.key_dim()), static_cast<long long>(total), P,
          st.record_bytes, st.scan_rounds);
      std::printf("%4s %10s %9s %11s %11s %10s %10s %10s %10s\n", "rank", "first", "tokens",
                  "prefill s", "summary s", "check s", "scan s", "sent B", "recv B");
      for (int r = 0; r < P; ++r) {
        const double* a = all.data() + 8 * r;
        std::printf("%4d %10.0f %9.0f %11.4f %11.4f %10.6f %10.6f %10.0f %10.0f\n", r, a[0], a[1],
                    a[2], a[3], a[4], a[5], a[6], a[7]);
      }
      std::printf(
          "(prefill: the local layer prefill from the incoming state; summary: the k, v "
          "re-projection and the segment's state; check: agreement all-reduce and position "
          "scan; scan: the state scan, including the wait for earlier ranks)\n");
      std::printf("wall time of the parallel prefill: %.3f s (%.0f tokens/s)\n", wall,
                  static_cast<double>(total) / wall);
    }

    // 2. The last rank holds the whole sequence's state and decodes.
    if (rank == P - 1) {
      const Matrix<T> xd = tokens(total, decode, d, 2);
      double norm = 0.0;
      for (Index t = 0; t < decode; ++t) norm += layer.step(xd.row(t), state).norm();
      std::printf("rank %d decoded %lld tokens from position %lld (mean output norm %.4f)\n", rank,
                  static_cast<long long>(decode), static_cast<long long>(total),
                  norm / static_cast<double>(decode));
    }

    // 3. Agreement with one process, on a shorter sequence every rank can also run alone.
    split(short_total, P, rank, first, count);
    const Matrix<T> xs = tokens(0, short_total, d, 3), xd = tokens(short_total, decode, d, 4);
    auto one = layer.make_state();
    const Matrix<T> y_one = layer.prefill(xs, one);
    auto cp = layer.make_state();
    const Matrix<T> y_cp =
        retention::mpi::context_parallel_prefill(group, layer, xs.middleRows(first, count), cp);
    const double out_err = max_over_ranks(relative(y_cp, y_one.middleRows(first, count)));
    double state_err = 0.0, step_err = 0.0;
    if (rank == P - 1) {
      for (std::size_t h = 0; h < cp.heads.size(); ++h)
        state_err = std::max(state_err, relative(cp.heads[h].S, one.heads[h].S));
      Matrix<T> a(decode, d), b(decode, d);
      for (Index t = 0; t < decode; ++t) {
        a.row(t) = layer.step(xd.row(t), cp);
        b.row(t) = layer.step(xd.row(t), one);
      }
      step_err = relative(a, b);
    }
    state_err = max_over_ranks(state_err);
    step_err = max_over_ranks(step_err);
    if (rank == 0)
      std::printf(
          "agreement with one process on %lld tokens (relative, float): outputs %.2e, "
          "final state %.2e, %lld decoded tokens %.2e\n",
          static_cast<long long>(short_total), out_err, state_err, static_cast<long long>(decode),
          step_err);
    if (out_err > 1e-4 || state_err > 1e-4 || step_err > 1e-4) status = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
