// The library's teams (detail/threading.hpp): every share runs once, on at most `team` threads (a
// late member's share runs on a thread that is free), and long shares on separate threads; members
// late twice within 50 ms pause the pool, whose regions then run on the caller; the first exception
// reaches the caller; calls inside a share run alone (no nesting); a second user thread that calls
// in while a team runs still gets its work done; a child process after fork() starts its own
// threads.
#include <retention/detail/threading.hpp>

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

namespace {

using retention::Index;
namespace detail = retention::detail;

#if defined(_OPENMP)
TEST(Threading, EveryShareRunsOnceOnAtMostTeamThreads) {
  for (int team : {2, 3, 5}) {
    for (int round = 0; round < 200; ++round) {
      std::vector<int> runs(static_cast<std::size_t>(team), 0);
      std::vector<int> sizes(static_cast<std::size_t>(team), 0);
      std::set<std::thread::id> ids;
      std::mutex m;
      detail::parallel_region(team, [&](int t, int n) {
        std::lock_guard<std::mutex> lock(m);
        ++runs[static_cast<std::size_t>(t)];
        sizes[static_cast<std::size_t>(t)] = n;
        ids.insert(std::this_thread::get_id());
      });
      for (int t = 0; t < team; ++t) {
        ASSERT_EQ(runs[static_cast<std::size_t>(t)], 1) << "team " << team << " share " << t;
        ASSERT_EQ(sizes[static_cast<std::size_t>(t)], team);
      }
      ASSERT_LE(static_cast<int>(ids.size()), team);
    }
  }
}

// Shares that last long enough for every member to wake run on separate threads at once: the
// team is real, not the caller running every share.
TEST(Threading, LongSharesRunOnSeparateThreadsAtOnce) {
  detail::ThreadPool::get().late_members().forget();  // a pause left by a late member elsewhere
  const int team = 2;
  std::set<std::thread::id> ids;
  std::mutex m;
  std::atomic<int> inside{0}, most{0};
  detail::parallel_region(team, [&](int, int) {
    {
      std::lock_guard<std::mutex> lock(m);
      ids.insert(std::this_thread::get_id());
    }
    const int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    --inside;
  });
  EXPECT_EQ(static_cast<int>(ids.size()), team);
  EXPECT_EQ(most.load(), team) << "the shares overlapped in time";
}

// While the pool is paused after late members, a region runs every share once on the caller, in
// order of the split it would have had; afterwards teams run on their threads again.
TEST(Threading, APausedPoolRunsEveryShareOnTheCaller) {
  detail::ThreadPool& pool = detail::ThreadPool::get();
  const auto now = std::chrono::steady_clock::now();
  pool.late_members().pause_until(now + std::chrono::seconds(60));
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::thread::id> ran(3);
  std::vector<int> runs(3, 0);
  detail::parallel_region(3, [&](int t, int n) {
    EXPECT_EQ(n, 3);
    ran[static_cast<std::size_t>(t)] = std::this_thread::get_id();
    ++runs[static_cast<std::size_t>(t)];
  });
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(runs[static_cast<std::size_t>(t)], 1);
    EXPECT_EQ(ran[static_cast<std::size_t>(t)], caller) << "share " << t;
  }
  pool.late_members().forget();
  EXPECT_FALSE(pool.late_members().paused());
}
#endif

// The rule that starts a pause, on given times: a member finishing more than 200 us plus the
// caller's own time after the caller is late; two late regions within 50 ms pause the pool for
// 20 ms; one alone, two further apart, or members just within the margin do not.
TEST(Threading, LateMembersTwiceWithinTheWindowPauseThePool) {
  using Clock = detail::LateMembers::Clock;
  using std::chrono::microseconds;
  using std::chrono::milliseconds;
  const Clock::time_point t0 = Clock::now();
  // A region from `at`: the caller's shares take `own`, the last member ends `after` later.
  auto region = [&](detail::LateMembers& m, Clock::time_point at, microseconds own,
                    microseconds after) { return m.note(at, at + own, at + own + after); };
  {
    detail::LateMembers m;
    EXPECT_FALSE(region(m, t0, microseconds(1000), microseconds(1150)));  // within own + 200 us
    EXPECT_FALSE(region(m, t0 + milliseconds(3), microseconds(1000), microseconds(1199)));
    EXPECT_FALSE(m.paused(t0 + milliseconds(5))) << "no member was late";
  }
  {
    detail::LateMembers m;
    EXPECT_FALSE(region(m, t0, microseconds(100), microseconds(5000))) << "once is not enough";
    EXPECT_FALSE(m.paused(t0 + milliseconds(6)));
    EXPECT_TRUE(region(m, t0 + milliseconds(10), microseconds(100), microseconds(5000)));
    const Clock::time_point end = t0 + milliseconds(10) + microseconds(5100);
    EXPECT_TRUE(m.paused(end + milliseconds(19)));
    EXPECT_FALSE(m.paused(end + milliseconds(21))) << "the pause lasts 20 ms";
    m.forget();
    EXPECT_FALSE(m.paused(end + milliseconds(1)));
  }
  {
    detail::LateMembers m;
    EXPECT_FALSE(region(m, t0, microseconds(100), microseconds(5000)));
    EXPECT_FALSE(region(m, t0 + milliseconds(60), microseconds(100), microseconds(5000)))
        << "late twice, but 55 ms apart";
    EXPECT_FALSE(m.paused(t0 + milliseconds(66)));
  }
}

#if defined(_OPENMP)
// A team that does not wake sleeping threads still runs every share exactly once: the caller
// runs whatever no polling thread took.
TEST(Threading, ATeamThatDoesNotWakeRunsEveryShareOnce) {
  for (int team : {2, 3}) {
    for (int round = 0; round < 200; ++round) {
      // Alternate with waking teams, so that some rounds find threads polling and some asleep.
      if (round % 3 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(team));
      for (auto& r : runs) r = 0;
      detail::parallel_region(detail::Team(team, round % 2 == 0), [&](int t, int n) {
        ++runs[static_cast<std::size_t>(t)];
        EXPECT_EQ(n, team);
      });
      for (int t = 0; t < team; ++t)
        ASSERT_EQ(runs[static_cast<std::size_t>(t)].load(), 1) << "team " << team << " share " << t;
    }
  }
}

// The rule: threads for work from min_flops_per_thread each; sleeping threads woken only for
// min_flops_to_wake or more.
TEST(Threading, TeamsWakeSleepingThreadsOnlyForLargeWork) {
  const double small = 3.0 * detail::min_flops_per_thread;
  const detail::Team a = detail::plan_team(2, 100, small);
  EXPECT_EQ(a.size, 2);
  EXPECT_FALSE(a.wake);
  const detail::Team b = detail::plan_team(2, 100, detail::min_flops_to_wake);
  EXPECT_EQ(b.size, 2);
  EXPECT_TRUE(b.wake);
  EXPECT_FALSE(detail::plan_team(2, 100, 0.9 * detail::min_flops_to_wake).wake);
  const detail::Team c = detail::plan_team(2, 100, 0.5 * detail::min_flops_per_thread);
  EXPECT_EQ(c.size, 1);
  EXPECT_EQ(detail::plan_team(1, 100, 1e12).size, 1);
  EXPECT_EQ(detail::plan_team(3, 2, 1e12).size, 2) << "capped by the tasks";
}

TEST(Threading, NoNestingInsideAShare) {
  std::atomic<int> inner{0};
  detail::parallel_region(2, [&](int, int) { inner += detail::team_size(8, 100, 1e12); });
  EXPECT_EQ(inner.load(), 2);
  EXPECT_EQ(detail::team_size(2, 100, 1e12), 2) << "outside a team the rule applies again";
}
#endif

TEST(Threading, EveryTaskRunsOnceAndTheFirstErrorReachesTheCaller) {
  const Index tasks = 1000;
  std::vector<std::atomic<int>> count(static_cast<std::size_t>(tasks));
  for (auto& c : count) c = 0;
  detail::parallel_tasks(2, tasks, [&](Index i) { ++count[static_cast<std::size_t>(i)]; });
  for (Index i = 0; i < tasks; ++i) EXPECT_EQ(count[static_cast<std::size_t>(i)].load(), 1);

  std::atomic<int> ran{0};
  EXPECT_THROW(detail::parallel_tasks(2, tasks,
                                      [&](Index i) {
                                        ++ran;
                                        if (i == 3) throw std::runtime_error("task 3");
                                      }),
               std::runtime_error);
  EXPECT_GE(ran.load(), 4);
  // The team is usable again afterwards.
  std::atomic<Index> sum{0};
  detail::parallel_tasks(2, 100, [&](Index i) { sum += i; });
  EXPECT_EQ(sum.load(), 4950);
}

TEST(Threading, TwoCallersAtOnceBothFinish) {
  const Index tasks = 20000;
  std::atomic<Index> a{0}, b{0};
  auto call = [&](std::atomic<Index>& sum) {
    for (int r = 0; r < 20; ++r) detail::parallel_tasks(2, tasks, [&](Index i) { sum += i % 7; });
  };
  std::thread other([&] { call(b); });
  call(a);
  other.join();
  Index expected = 0;
  for (Index i = 0; i < tasks; ++i) expected += i % 7;
  EXPECT_EQ(a.load(), 20 * expected);
  EXPECT_EQ(b.load(), 20 * expected);
}

TEST(Threading, AChildProcessAfterForkRunsTeams) {
  std::atomic<Index> sum{0};
  detail::parallel_tasks(2, 100, [&](Index i) { sum += i; });  // the parent's threads exist
  ASSERT_EQ(sum.load(), 4950);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(60);  // a child that waits for threads it does not have dies instead of hanging
    std::atomic<Index> s{0};
    detail::parallel_tasks(2, 100, [&](Index i) { s += i; });
    _exit(s.load() == 4950 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
