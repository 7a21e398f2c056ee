// retention::mpi: context-parallel retention over MPI (docs/math.md §2, §7). Each rank of a
// communicator holds one contiguous segment of the sequence, in rank order; only a summary per
// (batch, head) pair (the segment's decay gamma^L, its state S [dk, dv] and z [dk]) crosses ranks,
// in one O(log P) scan, however long the segments are (LASP, Sun et al. 2024). Forward, backward
// and the MSR layer's prefill give what one process gives on the whole sequence, to rounding.
//
// This is the only header of the library that includes <mpi.h>; kernels and layers stay MPI-free.
#pragma once

#include <mpi.h>

#include <retention/backward.hpp>
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>
#include <retention/layers/msr.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/linear.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace retention {
namespace mpi {

/// An MPI call failed (the group's communicator returns errors instead of aborting); code() is
/// the MPI error code.
class mpi_error : public std::runtime_error {
 public:
  mpi_error(const std::string& what, int code) : std::runtime_error(what), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

/// Time and traffic of this rank's part in the last context-parallel call of a group. Times are
/// wall seconds (MPI_Wtime) and include waiting for slower ranks inside the collectives.
struct CallStats {
  /// The agreement all-reduce (shapes, types, gammas, errors) and the position scan.
  double check_seconds = 0.0;
  /// Forward: the segment summaries (and, in the layer, the k, v projections they need).
  /// Backward: the state-gradient terms added after the scan.
  double summary_seconds = 0.0;
  /// The local retention pass (multi_head_retention, its backward, or the layer's prefill).
  double local_seconds = 0.0;
  /// The state scan.
  double scan_seconds = 0.0;
  /// Bytes this rank sent and received in the state scan (the agreement and position scan add
  /// check_bytes_sent, independent of the sequence and of the dims).
  std::size_t scan_bytes_sent = 0;
  std::size_t scan_bytes_received = 0;
  std::size_t check_bytes_sent = 0;
  /// One rank's record: 1 + pairs * (1 + dk * dv + dk) scalars.
  std::size_t record_bytes = 0;
  /// Rounds of the scan: ceil(log2(P)).
  int scan_rounds = 0;
  /// Global position of this rank's first token.
  Index position = 0;
  /// Tokens on this rank.
  Index length = 0;
};

class ContextGroup;

namespace detail {
struct GroupAccess;
}  // namespace detail

/// The ranks of a communicator that together hold one sequence, rank r the r-th segment. Holds a
/// duplicate of the communicator (so the library's messages never meet the caller's) with
/// MPI_ERRORS_RETURN, so that MPI failures become mpi_error exceptions. Constructing and
/// destroying it are collective; destroy it before MPI_Finalize (after it, the duplicate is left).
/// Calls on one group are collective and one at a time; the library calls MPI only from the
/// calling thread (MPI_THREAD_FUNNELED suffices).
class ContextGroup {
 public:
  /// Duplicates `comm` (collective over comm). MPI must be initialised.
  explicit ContextGroup(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialised = 0, finalised = 0;
    MPI_Initialized(&initialised);
    MPI_Finalized(&finalised);
    if (!initialised || finalised)
      throw std::logic_error(
          "retention::mpi::ContextGroup: MPI is not initialised (call MPI_Init "
          "first) or already finalised");
    int rc = MPI_Comm_dup(comm, &comm_);
    if (rc != MPI_SUCCESS) throw_mpi("ContextGroup", "MPI_Comm_dup", rc);
    rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm_, &rank_);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm_, &size_);
    if (rc != MPI_SUCCESS) {
      release();
      throw_mpi("ContextGroup", "MPI_Comm_set_errhandler/rank/size", rc);
    }
  }
  ~ContextGroup() { release(); }
  ContextGroup(const ContextGroup&) = delete;
  ContextGroup& operator=(const ContextGroup&) = delete;
  ContextGroup(ContextGroup&& other) noexcept { swap(other); }
  ContextGroup& operator=(ContextGroup&& other) noexcept {
    if (this != &other) {
      release();
      swap(other);
    }
    return *this;
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The group's own communicator (a duplicate of the one given, errors returned).
  MPI_Comm comm() const { return comm_; }
  /// This rank's stats of the last call made on the group.
  const CallStats& last_call() const { return stats_; }

  /// Throws mpi_error "fn: what failed: <MPI's message>".
  [[noreturn]] static void throw_mpi(const char* fn, const char* what, int code) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    throw mpi_error(std::string(fn) + ": " + what + " failed: " +
                        (length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                    : "MPI error " + std::to_string(code)),
                    code);
  }

 private:
  friend struct detail::GroupAccess;

  void release() noexcept {
    if (comm_ == MPI_COMM_NULL) return;
    int finalised = 1;
    MPI_Finalized(&finalised);
    if (!finalised) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }
  void swap(ContextGroup& o) noexcept {
    std::swap(comm_, o.comm_);
    std::swap(rank_, o.rank_);
    std::swap(size_, o.size_);
    std::swap(stats_, o.stats_);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  CallStats stats_;
};

/// Options of context_parallel_retention. States are indexed b * heads + h, as in
/// multi_head_retention.
template <class T>
struct ContextParallelOptions {
  /// Form of the local pass (ranks may differ: the forms compute one function).
  Form form = Form::chunkwise;
  /// Chunk length of the chunkwise form; 0 = recommended_chunk(key_dim, value_dim).
  Index chunk = 0;
  Normalization normalization = Normalization::none;
  /// Rank 0 only (must be null elsewhere): the states before the sequence's first token, all at
  /// one position p0; nullptr = zero states at position 0.
  const std::vector<RetentionState<T>>* initial_states = nullptr;
  /// Receives the states this rank's segment starts from (the whole sequence's states before its
  /// first token, at its global position). The backward needs them.
  std::vector<RetentionState<T>>* incoming_states = nullptr;
  /// Receives the states after this rank's last token; on the last rank, after the whole sequence.
  /// Not the same vector as incoming_states (either may be initial_states).
  std::vector<RetentionState<T>>* final_states = nullptr;
  /// Threads of the local work; 0 = OpenMP's default, capped by the work (detail/threading.hpp).
  int threads = 0;
};

/// Options of context_parallel_retention_backward.
template <class T>
struct ContextParallelBackwardOptions {
  Form form = Form::chunkwise;
  Index chunk = 0;
  Normalization normalization = Normalization::none;
  /// decay_and_score: treat max(|r_n|, 1) as a constant (as torchscale does in training).
  bool detach_score_normalizer = false;
  /// Required: the incoming_states the forward returned on this rank.
  const std::vector<RetentionState<T>>* incoming_states = nullptr;
  /// Last rank only (must be null elsewhere): dL/d(the whole sequence's final states), S and z;
  /// nullptr = zero.
  const std::vector<RetentionState<T>>* final_state_gradients = nullptr;
  /// Receives dL/d(this rank's incoming states); on rank 0, the gradient of the sequence's
  /// initial states.
  std::vector<RetentionState<T>>* incoming_state_gradients = nullptr;
  int threads = 0;
};

namespace detail {

using retention::detail::fail;

struct GroupAccess {
  static CallStats& stats(ContextGroup& g) { return g.stats_; }
};

template <class T>
MPI_Datatype mpi_type() {
  if (std::is_same<T, double>::value) return MPI_DOUBLE;
  if (std::is_same<T, float>::value) return MPI_FLOAT;
  return MPI_INT64_T;
}

/// Message tags of the group's point-to-point scans (the communicator is the group's own).
constexpr int kTagPositions = 0x5201;
constexpr int kTagForward = 0x5202;
constexpr int kTagBackward = 0x5203;

/// A failure found on this rank before the first collective: reported to every rank.
struct LocalError {
  int kind = 0;  // 0 none, 1 shape_error, 2 any other exception
  std::string message;
};

/// Runs f, turning an exception into a LocalError (a rank must not leave a collective call early:
/// the other ranks would wait for it forever).
template <class F>
LocalError capture(F&& f) {
  try {
    f();
  } catch (const shape_error& e) {
    return {1, e.what()};
  } catch (const std::exception& e) {
    return {2, e.what()};
  } catch (...) {
    return {2, "unknown exception"};
  }
  return {};
}

/// Hash of a byte range (FNV-style, over 64-bit words): lets the ranks compare gammas or weights in
/// the agreement all-reduce without sending them.
inline std::uint64_t hash_bytes(const void* data, std::size_t bytes,
                                std::uint64_t h = 1469598103934665603ull) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 1099511628211ull;
    h ^= h >> 29;
  }
  for (; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}
inline std::int64_t hash_field(std::uint64_t h) {
  return static_cast<std::int64_t>(h & ((std::uint64_t(1) << 62) - 1));
}

using Fields = std::vector<std::pair<const char*, std::int64_t>>;

/// Every call sends the same number of fields (its own, then zeros), so that ranks making different
/// calls still meet in one all-reduce of one size and learn it from field 0, the call's kind.
constexpr std::size_t kAgreementFields = 16;

/// The agreement step, collective: one all-reduce of every field's minimum and maximum and of the
/// lowest failing rank. If any rank failed locally, that rank's message reaches every rank (one
/// broadcast, on the error path only) and every rank throws it; if the ranks disagree on a field,
/// every rank throws the same shape_error naming it. Fields must lie in [-2^62, 2^62].

inline void agree(ContextGroup& g, const char* fn, const Fields& fields, const LocalError& local) {
  const std::size_t n = kAgreementFields;
  if (fields.size() > n) fail(fn, "internal: too many agreement fields");
  std::vector<std::int64_t> buf(2 * n + 1, 0), out(2 * n + 1, 0);
  for (std::size_t i = 0; i < fields.size(); ++i) {
    buf[i] = fields[i].second;
    buf[n + i] = -fields[i].second;
  }
  buf[2 * n] = local.kind ? g.rank() : std::numeric_limits<std::int64_t>::max();
  int rc = MPI_Allreduce(buf.data(), out.data(), static_cast<int>(buf.size()), MPI_INT64_T, MPI_MIN,
                         g.comm());
  if (rc != MPI_SUCCESS) ContextGroup::throw_mpi(fn, "MPI_Allreduce (agreement)", rc);
  GroupAccess::stats(g).check_bytes_sent += buf.size() * sizeof(std::int64_t);
  const std::int64_t failed = out[2 * n];
  if (failed < g.size()) {
    // kind and message of the lowest failing rank, the same text on every rank.
    const int root = static_cast<int>(failed);
    std::vector<char> text(1024, '\0');
    if (g.rank() == root) {
      text[0] = static_cast<char>('0' + local.kind);
      std::strncpy(text.data() + 1, local.message.c_str(), text.size() - 2);
    }
    rc = MPI_Bcast(text.data(), static_cast<int>(text.size()), MPI_CHAR, root, g.comm());
    if (rc != MPI_SUCCESS) ContextGroup::throw_mpi(fn, "MPI_Bcast (error message)", rc);
    const std::string message = std::string(text.data() + 1) + " (on rank " + std::to_string(root) +
                                " of " + std::to_string(g.size()) +
                                "; every rank of the group throws this)";
    if (text[0] == '1') throw shape_error(message);
    throw std::runtime_error(message);
  }
  // Named after the group, not `fn`: the ranks are in different functions, and every rank must
  // throw the same message.
  if (out[0] != -out[n])
    fail("retention::mpi::ContextGroup",
         "ranks disagree on the call: some call one of context_parallel_retention (1), "
         "context_parallel_retention_backward (2), context_parallel_prefill (3), others another "
         "(codes " +
             std::to_string(out[0]) + " to " + std::to_string(-out[n]) + ")");
  for (std::size_t i = 1; i < fields.size(); ++i) {
    const std::int64_t lo = out[i], hi = -out[n + i];
    if (lo != hi)
      fail(fn, std::string("ranks disagree on ") + fields[i].first + " (values from " +
                   std::to_string(lo) + " to " + std::to_string(hi) + " over " +
                   std::to_string(g.size()) +
                   " ranks); every rank must make the same call with the same batch, heads, "
                   "dims, scalar type, normalisation and gammas");
  }
}

/// Exclusive scan over the ranks of records of n Scalars in rank order (reverse: in reverse rank
/// order), with an associative, not necessarily commutative combine(earlier, later) that
/// overwrites `later` with earlier (+) later. Recursive doubling (Hillis-Steele): ceil(log2 P)
/// rounds; in round d each rank sends its running inclusive prefix to the rank d places later and
/// receives the one d places earlier. Every rank sends and receives at most one record per round.
/// On return `value` holds the combination of all earlier ranks' records; returns false (and
/// leaves `value` as it was) on the first rank of the order, which has none.
template <class Scalar, class Combine>
bool exclusive_scan(ContextGroup& g, const char* fn, int tag, bool reverse,
                    std::vector<Scalar>& value, Combine&& combine, std::size_t* bytes_sent,
                    std::size_t* bytes_received) {
  const int P = g.size();
  const int me = reverse ? P - 1 - g.rank() : g.rank();
  auto rank_of = [&](int pos) { return reverse ? P - 1 - pos : pos; };
  const std::size_t n = value.size();
  if (n > static_cast<std::size_t>(INT_MAX))
    fail(fn, "a scan record of " + std::to_string(n) + " numbers exceeds MPI's int count");
  std::vector<Scalar> partial(value), incoming(n), result;
  bool have = false;
  for (int d = 1; d < P; d *= 2) {
    const int to = me + d < P ? rank_of(me + d) : MPI_PROC_NULL;
    const int from = me - d >= 0 ? rank_of(me - d) : MPI_PROC_NULL;
    const int rc = MPI_Sendrecv(partial.data(), static_cast<int>(n), mpi_type<Scalar>(), to, tag,
                                incoming.data(), static_cast<int>(n), mpi_type<Scalar>(), from, tag,
                                g.comm(), MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) ContextGroup::throw_mpi(fn, "MPI_Sendrecv (scan)", rc);
    if (to != MPI_PROC_NULL && bytes_sent) *bytes_sent += n * sizeof(Scalar);
    if (from == MPI_PROC_NULL) continue;
    if (bytes_received) *bytes_received += n * sizeof(Scalar);
    // incoming covers the positions [me - 2d + 1, me - d], all before result's and partial's.
    if (have) {
      combine(incoming, result);
    } else {
      result = incoming;
      have = true;
    }
    combine(incoming, partial);
  }
  if (have) value.swap(result);
  return have;
}

/// ceil(log2(P)).
inline int scan_rounds(int P) {
  int r = 0;
  for (int d = 1; d < P; d *= 2) ++r;
  return r;
}

/// Global position of this rank's first token: p0 (rank 0's initial position) plus the earlier
/// ranks' lengths, by a scan of 8-byte numbers.
inline Index position_scan(ContextGroup& g, const char* fn, Index p0, Index length) {
  std::vector<std::int64_t> v{static_cast<std::int64_t>(g.rank() == 0 ? p0 + length : length)};
  std::size_t sent = 0;
  const bool have = exclusive_scan(
      g, fn, kTagPositions, false, v,
      [](const std::vector<std::int64_t>& a, std::vector<std::int64_t>& b) { b[0] += a[0]; }, &sent,
      nullptr);
  GroupAccess::stats(g).check_bytes_sent += sent;
  return have ? static_cast<Index>(v[0]) : p0;
}

/// Record layout of the state scans: [poison, then per pair (a, S row-major [dk, dv], z [dk])].
/// poison is 1 when a rank covered by the record failed after the agreement step.
struct RecordLayout {
  Index pairs = 0, dk = 0, dv = 0;
  Index per_pair() const { return 1 + dk * dv + dk; }
  Index size() const { return 1 + pairs * per_pair(); }
  Index offset(Index pair) const { return 1 + pair * per_pair(); }
};

/// (a1, x1) (+) (a2, x2) = (a1 a2, a2 x1 + x2) per pair, x = (S, z): the state after two segments
/// from the states each leaves from zero (docs/math.md §2.2, the chunkwise step with a segment as
/// the chunk). The same operator combines state gradients in reverse order (§7.2).
template <class T>
struct CombineRecords {
  RecordLayout layout;
  void operator()(const std::vector<T>& earlier, std::vector<T>& later) const {
    later[0] = std::max(later[0], earlier[0]);
    const Index m = layout.per_pair() - 1;
    for (Index p = 0; p < layout.pairs; ++p) {
      const std::size_t o = static_cast<std::size_t>(layout.offset(p));
      const T a2 = later[o];
      const T* x1 = earlier.data() + o + 1;
      T* x2 = later.data() + o + 1;
      for (Index i = 0; i < m; ++i) x2[i] += a2 * x1[i];
      later[o] = earlier[o] * a2;
    }
  }
};

/// Number of trailing rows of a segment of L tokens whose weight gamma^(L-1-m) in the segment's
/// state can be non-zero in double (gamma^k underflows to exactly 0 beyond k = 746 / -ln gamma):
/// the earlier rows contribute exactly 0 and are skipped.
inline Index live_rows(const CausalDecay& decay, Index L) {
  const double lg = decay.log_gamma();
  if (lg == 0.0) return L;
  const double k = 746.0 / -lg + 2.0;
  return k >= static_cast<double>(L) ? L : static_cast<Index>(k);
}

/// Rows per block of the summary and correction products (bounds their scratch).
constexpr Index kSummaryBlock = 2048;

/// S += K^T diag(gamma^(L-1-m)) V and z += K^T gamma^(L-1-m) over a segment's L rows: the state a
/// segment leaves from a zero state (docs/math.md §2.1), skipping rows whose weight is 0. K [L,
/// dk], V [L, dv]; S [dk, dv] and z [dk] map the record.
template <class T, class KM, class VM, class SM, class ZM>
void add_segment_state(const KM& K, const VM& V, const CausalDecay& decay, SM& S, ZM& z) {
  const Index L = K.rows(), live = live_rows(decay, L);
  Matrix<T> W;
  for (Index m0 = L - live; m0 < L; m0 += kSummaryBlock) {
    const Index n = std::min(kSummaryBlock, L - m0);
    W.resize(n, K.cols());
    for (Index i = 0; i < n; ++i)
      W.row(i) = K.row(m0 + i) * static_cast<T>(decay.factor(L - 1 - (m0 + i)));
    S.noalias() += W.transpose() * V.middleRows(m0, n);
    z.noalias() += W.colwise().sum().transpose();
  }
}

/// Checks shared by the forward and backward entry points; time 0 (an empty segment) is allowed.
template <class V>
void check_segment_view(const char* fn, const char* name, const V& v, Index batch, Index time,
                        Index heads, Index dim) {
  if (v.time == 0 && time <= 0) {  // an empty segment: no buffer needed, sizes still checked
    auto s = [](Index x) { return x < 0 ? std::string("*") : std::to_string(x); };
    if (v.batch < 1 || v.heads < 1 || v.dim < 1 || (batch >= 0 && v.batch != batch) ||
        (heads >= 0 && v.heads != heads) || (dim >= 0 && v.dim != dim))
      fail(fn, std::string(name) + " is [" + s(v.batch) + ", 0, " + s(v.heads) + ", " + s(v.dim) +
                   "], expected [" + s(batch) + ", 0, " + s(heads) + ", " + s(dim) +
                   "] (batch, heads and dim >= 1)");
    return;
  }
  retention::detail::check_view_shape(fn, name, v, batch, time, heads, dim);
}

inline std::vector<double> checked_gammas(const char* fn, const std::vector<double>& gammas,
                                          Index heads) {
  if (static_cast<Index>(gammas.size()) != heads)
    fail(fn, "gammas has " + std::to_string(gammas.size()) +
                 " entries, expected heads = " + std::to_string(heads));
  for (double g : gammas) retention::detail::check_gamma(fn, g);
  return gammas;
}

/// Checks a state list (count, shapes, positions >= 0; `same_position`: all at one position).
template <class T>
void check_state_vector(const char* fn, const char* name, const std::vector<RetentionState<T>>& s,
                        Index pairs, Index dk, Index dv, bool same_position) {
  retention::detail::check_states(fn, s, 1, pairs, dk, dv, name);
  if (same_position)
    for (const auto& st : s)
      if (st.position != s.front().position)
        fail(fn, std::string(name) + " must all be at one position, got " +
                     std::to_string(s.front().position) + " and " + std::to_string(st.position));
}

/// The forward's core: given this rank's summaries (each pair's S, z from a zero state, computed
/// by `summarise(record)`), the scan, then the incoming states. Shared by the kernel entry point
/// and the layer. Returns the incoming states (rank 0: `initial` or zero states at p0).
template <class T, class Summarise>
std::vector<RetentionState<T>> scan_incoming_states(ContextGroup& g, const char* fn,
                                                    const RecordLayout& layout,
                                                    const std::vector<CausalDecay>& masks,
                                                    Index heads, Index length, Index position,
                                                    const std::vector<RetentionState<T>>* initial,
                                                    Summarise&& summarise) {
  CallStats& st = GroupAccess::stats(g);
  std::vector<T> record(static_cast<std::size_t>(layout.size()), T(0));
  st.record_bytes = record.size() * sizeof(T);
  // After the agreement every input is valid, so only resource failures can happen here; the
  // failing rank still takes part in the scan, poisoning the records of every later rank (the
  // ranks whose results depend on it), then throws.
  double t0 = MPI_Wtime();
  LocalError error = capture([&] {
    for (Index p = 0; p < layout.pairs; ++p)
      record[static_cast<std::size_t>(layout.offset(p))] =
          static_cast<T>(masks[static_cast<std::size_t>(p % heads)].factor(length));
    // Nobody needs the summary of the last rank, or of a group of one.
    if (g.rank() == g.size() - 1) return;
    summarise(record);
    if (initial) {  // rank 0: the state after its segment includes the decayed initial state
      for (Index p = 0; p < layout.pairs; ++p) {
        T* r = record.data() + layout.offset(p);
        const auto& s = (*initial)[static_cast<std::size_t>(p)];
        const T a = r[0];
        Eigen::Map<Matrix<T>> S(r + 1, layout.dk, layout.dv);
        Eigen::Map<Vector<T>> z(r + 1 + layout.dk * layout.dv, layout.dk);
        S += a * s.S;
        z += a * s.z;
      }
    }
  });
  if (error.kind) record[0] = T(1);
  st.summary_seconds += MPI_Wtime() - t0;

  t0 = MPI_Wtime();
  const bool have = exclusive_scan(g, fn, kTagForward, false, record, CombineRecords<T>{layout},
                                   &st.scan_bytes_sent, &st.scan_bytes_received);
  st.scan_rounds = scan_rounds(g.size());
  st.scan_seconds += MPI_Wtime() - t0;
  if (error.kind == 1) throw shape_error(error.message);
  if (error.kind) throw std::runtime_error(error.message);
  if (have && record[0] != T(0))
    throw std::runtime_error(std::string(fn) +
                             ": an earlier rank of the group failed after the agreement step "
                             "(see its exception); this rank's results would depend on it");

  std::vector<RetentionState<T>> incoming;
  if (!have) {
    if (initial) {
      incoming = *initial;
    } else {
      incoming.assign(static_cast<std::size_t>(layout.pairs),
                      RetentionState<T>(layout.dk, layout.dv));
      for (auto& s : incoming) s.position = position;
    }
    return incoming;
  }
  incoming.reserve(static_cast<std::size_t>(layout.pairs));
  for (Index p = 0; p < layout.pairs; ++p) {
    const T* r = record.data() + layout.offset(p);
    RetentionState<T> s(layout.dk, layout.dv);
    s.S = Eigen::Map<const Matrix<T>>(r + 1, layout.dk, layout.dv);
    s.z = Eigen::Map<const Vector<T>>(r + 1 + layout.dk * layout.dv, layout.dk);
    s.position = position;
    incoming.push_back(std::move(s));
  }
  return incoming;
}

inline void reset_stats(ContextGroup& g) { GroupAccess::stats(g) = CallStats(); }

}  // namespace detail

/// Context-parallel multi-head retention (docs/math.md §2). Collective over the group: rank r
/// passes its segment of the sequence, q, k [B, T_r, H, dk], v and out [B, T_r, H, dv] (T_r >= 0,
/// any strides; every rank the same B, H, dk, dv, scalar type, normalisation and gammas), and gets
/// in `out` exactly the rows that one multi_head_retention over the whole sequence gives for its
/// tokens (global positions p0 + T_0 + ... + T_{r-1} onwards), to rounding.
///
/// How: each rank forms its segment's summary per pair (a = gamma^T_r and the state the segment
/// leaves from zero, S = K^T diag(gamma^(T_r-1-m)) V, z likewise: 2 T_r dk dv flops), one
/// exclusive scan in rank order combines the summaries ((a1, S1) then (a2, S2) gives
/// (a1 a2, a2 S1 + S2)) into each rank's incoming state, and each rank runs multi_head_retention
/// from it. Every normalisation is then exact, since the local pass sees the true state and global
/// position. Communication: one all-reduce of a few numbers, a scan of one 8-byte number, and a
/// scan of ceil(log2 P) rounds of 1 + B H (1 + dk dv + dk) numbers per rank; nothing grows with T.
///
/// Errors: bad input on any rank, or ranks that disagree, throw the same exception on every rank
/// (shape_error, naming the rank or the field); MPI failures throw mpi_error.
template <class T>
void context_parallel_retention(ContextGroup& group, const HeadsView<const T>& q,
                                const HeadsView<const T>& k, const HeadsView<const T>& v,
                                const HeadsView<T>& out, const std::vector<double>& gammas,
                                const ContextParallelOptions<T>& options = {}) {
  retention::detail::assert_scalar<T>();
  const char* fn = "context_parallel_retention";
  detail::reset_stats(group);
  CallStats& st = detail::GroupAccess::stats(group);
  const Index B = q.batch, L = q.time, H = q.heads, dk = q.dim, dv = v.dim;
  std::vector<CausalDecay> masks;
  Index p0 = 0;
  double t0 = MPI_Wtime();
  const detail::LocalError local = detail::capture([&] {
    detail::check_segment_view(fn, "q", q, -1, -1, -1, -1);
    detail::check_segment_view(fn, "k", k, B, L, H, dk);
    detail::check_segment_view(fn, "v", v, B, L, H, -1);
    detail::check_segment_view(fn, "out", out, B, L, H, dv);
    if (L > 0) {
      retention::detail::check_no_overlap(fn, out, q, "q");
      retention::detail::check_no_overlap(fn, out, k, "k");
      retention::detail::check_no_overlap(fn, out, v, "v");
    }
    masks = causal_masks(detail::checked_gammas(fn, gammas, H));
    retention::detail::check_form(fn, options.form);
    retention::detail::check_normalization(fn, options.normalization);
    retention::detail::check_threads(fn, "options.threads", options.threads);
    if (options.chunk < 0)
      detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
    const Index pairs = retention::detail::checked_product(fn, "batch * heads", B, H);
    retention::detail::checked_product(fn, "record size", pairs, dk * dv + dk + 1);
    if (options.initial_states) {
      if (group.rank() != 0)
        detail::fail(fn, "options.initial_states is given on rank " + std::to_string(group.rank()) +
                             "; only rank 0 (the start of the sequence) may pass them");
      detail::check_state_vector(fn, "initial_states", *options.initial_states, pairs, dk, dv,
                                 true);
      p0 = options.initial_states->front().position;
      if (p0 > std::numeric_limits<std::int64_t>::max() / 4)
        detail::fail(fn, "initial_states position is too large");
    }
  });
  detail::agree(group, fn,
                {{"the call", 1},
                 {"scalar size", static_cast<std::int64_t>(sizeof(T))},
                 {"batch", B},
                 {"heads", H},
                 {"key dim", dk},
                 {"value dim", dv},
                 {"normalization", static_cast<std::int64_t>(options.normalization)},
                 {"gammas", detail::hash_field(detail::hash_bytes(
                                gammas.data(), gammas.size() * sizeof(double)))}},
                local);
  const Index position = detail::position_scan(group, fn, p0, L);
  st.position = position;
  st.length = L;
  st.check_seconds = MPI_Wtime() - t0;

  const Index pairs = B * H;
  const detail::RecordLayout layout{pairs, dk, dv};
  std::vector<RetentionState<T>> incoming = detail::scan_incoming_states<T>(
      group, fn, layout, masks, H, L, position, options.initial_states,
      [&](std::vector<T>& record) {
        if (L == 0) return;
        const double flops = 2.0 * static_cast<double>(L) * static_cast<double>(dk * dv);
        for_each_head(B, H, flops, options.threads, [&](Index b, Index h) {
          const retention::detail::SerialEigenScope serial;
          T* r = record.data() + layout.offset(b * H + h);
          Eigen::Map<Matrix<T>> S(r + 1, dk, dv);
          Eigen::Map<Vector<T>> z(r + 1 + dk * dv, dk);
          detail::add_segment_state<T>(k.head(b, h), v.head(b, h),
                                       masks[static_cast<std::size_t>(h)], S, z);
        });
      });

  t0 = MPI_Wtime();
  std::vector<RetentionState<T>> finals;
  if (L > 0) {
    MultiHeadOptions<T> o;
    o.form = options.form;
    o.chunk = options.chunk;
    o.normalization = options.normalization;
    o.threads = options.threads;
    o.initial_states = &incoming;
    if (options.final_states) o.final_states = &finals;
    multi_head_retention(q, k, v, out, masks, o);
  } else if (options.final_states) {
    finals = incoming;
  }
  st.local_seconds = MPI_Wtime() - t0;
  if (options.final_states) options.final_states->swap(finals);
  if (options.incoming_states) options.incoming_states->swap(incoming);
}

/// context_parallel_retention over dense buffers: q, k [B, T_r, H, dk], v and out [B, T_r, H, dv]
/// row-major (shape.time = this rank's T_r, may be 0).
template <class T>
void context_parallel_retention(ContextGroup& group, const T* q, const T* k, const T* v, T* out,
                                const MultiHeadShape& shape, const std::vector<double>& gammas,
                                const ContextParallelOptions<T>& options = {}) {
  const Index B = shape.batch, L = shape.time, H = shape.heads;
  auto view = [&](auto* p, Index dim) {
    using P = std::remove_pointer_t<decltype(p)>;
    const Index row = H * dim;
    return HeadsView<P>{p, B, L, H, dim, L * row, row, dim};
  };
  context_parallel_retention(group, view(q, shape.key_dim), view(k, shape.key_dim),
                             view(v, shape.value_dim), view(out, shape.value_dim), gammas, options);
}

/// Gradients of context_parallel_retention (docs/math.md §7): collective; rank r passes its
/// segment's q, k, v, d_out = dL/dO [B, T_r, H, *] and the incoming states its forward returned,
/// and gets dq, dk, dv for its rows equal to one multi_head_retention_backward over the whole
/// sequence, to rounding.
///
/// How: each rank runs the backward of its segment with a zero final-state gradient (the last
/// rank: the given one), which yields c = dL/d(incoming state) of its own outputs; a reverse
/// exclusive scan combines (gamma^T_r, c) in reverse rank order, with the forward's operator, into
/// each rank's final-state gradient G = (dS, dz); each rank then adds G's terms, which do not
/// depend on the normalisation: dK += diag(gamma^(T_r-1-m)) (V dS^T + 1 dz^T),
/// dV += diag(gamma^(T_r-1-m)) K dS, d(incoming) = c + gamma^T_r G (§7.1). Communication as in
/// the forward (without the position scan).
template <class T>
void context_parallel_retention_backward(ContextGroup& group, const HeadsView<const T>& q,
                                         const HeadsView<const T>& k, const HeadsView<const T>& v,
                                         const HeadsView<const T>& d_out,
                                         const std::vector<double>& gammas, const HeadsView<T>& dq,
                                         const HeadsView<T>& dk, const HeadsView<T>& dv,
                                         const ContextParallelBackwardOptions<T>& options = {}) {
  retention::detail::assert_scalar<T>();
  const char* fn = "context_parallel_retention_backward";
  detail::reset_stats(group);
  CallStats& st = detail::GroupAccess::stats(group);
  const Index B = q.batch, L = q.time, H = q.heads, Dk = q.dim, Dv = v.dim;
  const bool last = group.rank() == group.size() - 1;
  std::vector<CausalDecay> masks;
  double t0 = MPI_Wtime();
  const detail::LocalError local = detail::capture([&] {
    detail::check_segment_view(fn, "q", q, -1, -1, -1, -1);
    detail::check_segment_view(fn, "k", k, B, L, H, Dk);
    detail::check_segment_view(fn, "v", v, B, L, H, -1);
    detail::check_segment_view(fn, "d_out", d_out, B, L, H, Dv);
    detail::check_segment_view(fn, "dq", dq, B, L, H, Dk);
    detail::check_segment_view(fn, "dk", dk, B, L, H, Dk);
    detail::check_segment_view(fn, "dv", dv, B, L, H, Dv);
    masks = causal_masks(detail::checked_gammas(fn, gammas, H));
    retention::detail::check_form(fn, options.form);
    retention::detail::check_normalization(fn, options.normalization);
    retention::detail::check_threads(fn, "options.threads", options.threads);
    if (options.chunk < 0)
      detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
    const Index pairs = retention::detail::checked_product(fn, "batch * heads", B, H);
    retention::detail::checked_product(fn, "record size", pairs, Dk * Dv + Dk + 1);
    if (!options.incoming_states)
      detail::fail(fn, "options.incoming_states is required (the forward's incoming_states)");
    detail::check_state_vector(fn, "incoming_states", *options.incoming_states, pairs, Dk, Dv,
                               false);
    if (options.final_state_gradients) {
      if (!last)
        detail::fail(fn, "options.final_state_gradients is given on rank " +
                             std::to_string(group.rank()) + "; only the last rank (rank " +
                             std::to_string(group.size() - 1) + ") may pass them");
      retention::detail::check_states(fn, *options.final_state_gradients, 1, pairs, Dk, Dv,
                                      "final_state_gradients");
    }
  });
  detail::agree(group, fn,
                {{"the call", 2},
                 {"scalar size", static_cast<std::int64_t>(sizeof(T))},
                 {"batch", B},
                 {"heads", H},
                 {"key dim", Dk},
                 {"value dim", Dv},
                 {"normalization", static_cast<std::int64_t>(options.normalization)},
                 {"detach_score_normalizer", options.detach_score_normalizer ? 1 : 0},
                 {"gammas", detail::hash_field(detail::hash_bytes(
                                gammas.data(), gammas.size() * sizeof(double)))}},
                local);
  st.check_seconds = MPI_Wtime() - t0;
  st.length = L;
  const Index pairs = B * H;
  st.position = options.incoming_states->front().position;

  // Local backward with this rank's own final-state gradient (zero except on the last rank).
  t0 = MPI_Wtime();
  const detail::RecordLayout layout{pairs, Dk, Dv};
  std::vector<T> record(static_cast<std::size_t>(layout.size()), T(0));
  st.record_bytes = record.size() * sizeof(T);
  std::vector<RetentionState<T>> c;
  detail::LocalError error = detail::capture([&] {
    if (L > 0) {
      MultiHeadBackwardOptions<T> o;
      o.form = options.form;
      o.chunk = options.chunk;
      o.normalization = options.normalization;
      o.detach_score_normalizer = options.detach_score_normalizer;
      o.initial_states = options.incoming_states;
      o.final_state_gradients = options.final_state_gradients;
      o.initial_state_gradients = &c;
      o.threads = options.threads;
      multi_head_retention_backward(q, k, v, d_out, gammas, dq, dk, dv, o);
    } else {
      c.assign(static_cast<std::size_t>(pairs), RetentionState<T>(Dk, Dv));
      if (options.final_state_gradients)
        for (Index p = 0; p < pairs; ++p) {
          const auto& g = (*options.final_state_gradients)[static_cast<std::size_t>(p)];
          c[static_cast<std::size_t>(p)].S = g.S;
          c[static_cast<std::size_t>(p)].z = g.z;
        }
    }
    for (Index p = 0; p < pairs; ++p) {
      T* r = record.data() + layout.offset(p);
      r[0] = static_cast<T>(masks[static_cast<std::size_t>(p % H)].factor(L));
      Eigen::Map<Matrix<T>>(r + 1, Dk, Dv) = c[static_cast<std::size_t>(p)].S;
      Eigen::Map<Vector<T>>(r + 1 + Dk * Dv, Dk) = c[static_cast<std::size_t>(p)].z;
    }
  });
  if (error.kind) record[0] = T(1);
  st.local_seconds = MPI_Wtime() - t0;

  t0 = MPI_Wtime();
  const bool have = detail::exclusive_scan(group, fn, detail::kTagBackward, true, record,
                                           detail::CombineRecords<T>{layout}, &st.scan_bytes_sent,
                                           &st.scan_bytes_received);
  st.scan_rounds = detail::scan_rounds(group.size());
  st.scan_seconds = MPI_Wtime() - t0;
  if (error.kind == 1) throw shape_error(error.message);
  if (error.kind) throw std::runtime_error(error.message);
  if (have && record[0] != T(0))
    throw std::runtime_error(std::string(fn) +
                             ": a later rank of the group failed after the agreement step (see "
                             "its exception); this rank's gradients would depend on it");

  // The final-state gradient G from the later ranks: its terms in dK, dV and d(incoming).
  t0 = MPI_Wtime();
  if (have) {
    const double flops = 6.0 * static_cast<double>(L) * static_cast<double>(Dk * Dv);
    for_each_head(B, H, flops, options.threads, [&](Index b, Index h) {
      const retention::detail::SerialEigenScope serial;
      const Index p = b * H + h;
      const T* r = record.data() + layout.offset(p);
      const Eigen::Map<const Matrix<T>> dS(r + 1, Dk, Dv);
      const Eigen::Map<const Vector<T>> dz(r + 1 + Dk * Dv, Dk);
      const CausalDecay& decay = masks[static_cast<std::size_t>(h)];
      auto& ci = c[static_cast<std::size_t>(p)];
      const T a = static_cast<T>(decay.factor(L));
      ci.S += a * dS;
      ci.z += a * dz;
      if (L == 0) return;
      const auto K = k.head(b, h);
      const auto V = v.head(b, h);
      auto dK = dk.head(b, h);
      auto dV = dv.head(b, h);
      const Index live = detail::live_rows(decay, L);
      Vector<T> f;
      Matrix<T> tmp;
      for (Index m0 = L - live; m0 < L; m0 += detail::kSummaryBlock) {
        const Index n = std::min(detail::kSummaryBlock, L - m0);
        f.resize(n);
        for (Index i = 0; i < n; ++i) f(i) = static_cast<T>(decay.factor(L - 1 - (m0 + i)));
        tmp.noalias() = V.middleRows(m0, n) * dS.transpose();
        tmp.rowwise() += dz.transpose();
        dK.middleRows(m0, n).noalias() += f.asDiagonal() * tmp;
        tmp.noalias() = K.middleRows(m0, n) * dS;
        dV.middleRows(m0, n).noalias() += f.asDiagonal() * tmp;
      }
    });
  }
  st.summary_seconds = MPI_Wtime() - t0;
  if (options.incoming_state_gradients) {
    for (Index p = 0; p < pairs; ++p)
      c[static_cast<std::size_t>(p)].position =
          (*options.incoming_states)[static_cast<std::size_t>(p)].position;
    options.incoming_state_gradients->swap(c);
  }
}

/// Context-parallel prefill of a MultiScaleRetention layer (docs/math.md §3), collective: rank r
/// passes its segment x [T_r, d] of one sequence (T_r >= 0) and gets its rows of what one
/// layer.prefill over the whole sequence gives, to rounding. Projections, rotation, norms and the
/// gate stay local; only the retention states cross ranks (one scan, as in
/// context_parallel_retention). `state`: on rank 0, the state the sequence starts from (e.g.
/// layer.make_state()); on the other ranks any state of the layer's shape, whose contents are
/// replaced. On return every rank's state is the state after its own last token; on the last rank
/// that is the whole sequence's state, ready for layer.step(). Every rank must pass the same layer
/// (configuration and weights are compared by hash).
///
/// Cost beyond the local prefill: the k and v projections of the segment's rows again (the layer
/// keeps its projection internal) and the 2 T_r dk dv flops per head of the summary.
template <class T, class D>
Matrix<T> context_parallel_prefill(ContextGroup& group, const MultiScaleRetention<T>& layer,
                                   const Eigen::MatrixBase<D>& x_in, MsrState<T>& state,
                                   Form form = Form::chunkwise, Index chunk = 0) {
  retention::detail::assert_same_scalar<T, typename D::Scalar>();
  const char* fn = "context_parallel_prefill";
  detail::reset_stats(group);
  CallStats& st = detail::GroupAccess::stats(group);
  const Index d = layer.embed_dim(), H = layer.heads(), dk = layer.key_dim(),
              dv = layer.head_value_dim(), L = x_in.rows();
  const MsrConfig& cfg = layer.config();
  Index p0 = 0;
  std::uint64_t weights = 0;
  double t0 = MPI_Wtime();
  const detail::LocalError local = detail::capture([&] {
    retention::detail::check_shape(fn, "x", x_in, -1, d);
    retention::detail::check_form(fn, form);
    if (chunk < 0)
      detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(chunk));
    if (group.rank() == 0) {
      if (static_cast<Index>(state.heads.size()) != H)
        detail::fail(fn, "state.heads has " + std::to_string(state.heads.size()) +
                             " states, expected heads = " + std::to_string(H));
      detail::check_state_vector(fn, "state.heads", state.heads, H, dk, dv, true);
      if (state.heads.front().position != state.position)
        detail::fail(fn, "state.heads are at position " +
                             std::to_string(state.heads.front().position) + ", state.position is " +
                             std::to_string(state.position));
      p0 = state.position;
      if (p0 > std::numeric_limits<std::int64_t>::max() / 4)
        detail::fail(fn, "state.position is too large");
    }
    for (const Linear<T>* l :
         {&layer.q_proj(), &layer.k_proj(), &layer.v_proj(), &layer.g_proj(), &layer.out_proj()}) {
      weights = detail::hash_bytes(
          l->weight().data(), static_cast<std::size_t>(l->weight().size()) * sizeof(T), weights);
      if (l->has_bias())
        weights = detail::hash_bytes(
            l->bias().data(), static_cast<std::size_t>(l->bias().size()) * sizeof(T), weights);
    }
  });
  detail::agree(group, fn,
                {{"the call", 3},
                 {"scalar size", static_cast<std::int64_t>(sizeof(T))},
                 {"embed_dim", d},
                 {"value_dim", layer.value_dim()},
                 {"heads", H},
                 {"normalization", static_cast<std::int64_t>(cfg.normalization)},
                 {"head_norm", static_cast<std::int64_t>(cfg.head_norm)},
                 {"eps", detail::hash_field(detail::hash_bytes(&cfg.eps, sizeof(double)))},
                 {"biases", cfg.biases ? 1 : 0},
                 {"gammas", detail::hash_field(detail::hash_bytes(
                                cfg.gammas.data(), cfg.gammas.size() * sizeof(double)))},
                 {"weights", detail::hash_field(weights)}},
                local);
  const Index position = detail::position_scan(group, fn, p0, L);
  st.position = position;
  st.length = L;
  st.check_seconds = MPI_Wtime() - t0;

  const detail::RecordLayout layout{H, dk, dv};
  const std::vector<CausalDecay>& masks = layer.masks();
  std::vector<RetentionState<T>> incoming = detail::scan_incoming_states<T>(
      group, fn, layout, masks, H, L, position, group.rank() == 0 ? &state.heads : nullptr,
      [&](std::vector<T>& record) {
        if (L == 0) return;
        // k (scaled and rotated at the global positions, as the layer does) and v of the rows
        // that can reach the segment's state.
        Index live = 0;
        for (const auto& m : masks) live = std::max(live, detail::live_rows(m, L));
        const Linear<T> kv = Linear<T>::concat(
            {{&layer.k_proj(), 1.0 / std::sqrt(static_cast<double>(dk))}, {&layer.v_proj(), 1.0}});
        const Eigen::Ref<const Matrix<T>> x(x_in);
        Matrix<T> p(live, d + layer.value_dim());
        kv.forward_into(x.bottomRows(live), p);
        layer.rotation().apply(p.leftCols(d), position + L - live);
        const Index width = p.cols();
        const HeadsView<const T> kh{p.data(), 1, live, H, dk, live * width, width, dk};
        const HeadsView<const T> vh{p.data() + d, 1, live, H, dv, live * width, width, dv};
        const double flops = 2.0 * static_cast<double>(live) * static_cast<double>(dk * dv);
        for_each_head(1, H, flops, cfg.threads, [&](Index, Index h) {
          const retention::detail::SerialEigenScope serial;
          T* r = record.data() + layout.offset(h);
          Eigen::Map<Matrix<T>> S(r + 1, dk, dv);
          Eigen::Map<Vector<T>> z(r + 1 + dk * dv, dk);
          // The live rows are the segment's last ones: their weights are gamma^(live-1-m).
          detail::add_segment_state<T>(kh.head(0, h), vh.head(0, h),
                                       masks[static_cast<std::size_t>(h)], S, z);
        });
      });

  t0 = MPI_Wtime();
  MsrState<T> s = layer.make_state();
  s.heads.swap(incoming);
  s.position = position;
  Matrix<T> y = layer.prefill(x_in, s, form, chunk);
  st.local_seconds = MPI_Wtime() - t0;
  state = std::move(s);
  return y;
}

}  // namespace mpi
}  // namespace retention
