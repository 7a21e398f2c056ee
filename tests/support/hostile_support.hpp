// Hostile-input test framework (issue 15): a table of cases, each a call into one public entry
// point with an expected outcome, and a report of what each call did.
//
// A case expects either
//   - a clear error: retention::shape_error whose message names the public function and the
//     offending argument (error()), or
//   - a documented result: the call returns normally and a predicate written from the
//     documentation holds (result()).
// Every case lands in one column of the report:
//   clear error       the expected shape_error, naming function and argument
//   documented result  returned, and the predicate holds
//   silent wrong       anything else that did not crash: no error where one was due, a result
//                      failing its predicate, an error where a result was due, or an error
//                      message that does not name the function and argument
//   crash-like         an exception of another type (std::bad_alloc, std::length_error, ...)
// A suite passes only when the last two columns are 0. Real crashes (SIGSEGV, sanitizer reports)
// end the process, which fails the test program as a whole.
#pragma once

#include <retention/core.hpp>

#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace retention_hostile {

enum class Column { clear_error, documented_result, silent_wrong, crash_like };

inline const char* to_string(Column c) {
  switch (c) {
    case Column::clear_error:
      return "clear error";
    case Column::documented_result:
      return "documented result";
    case Column::silent_wrong:
      return "silent wrong";
    case Column::crash_like:
      return "crash-like";
  }
  return "?";
}

/// One hostile call. `needles` are the strings a clear error must contain (the public function's
/// name, then the argument: any one of `arguments` suffices); empty arguments = a result is due
/// and `check` must return true.
struct Case {
  std::string entry;
  std::string description;
  std::vector<std::string> arguments;  // non-empty: an error is expected
  std::function<bool()> call;          // for results: true when the documented result holds
};

struct Report {
  int tried = 0;
  int counts[4] = {0, 0, 0, 0};
  std::vector<std::string> failures;  // one line per silent-wrong or crash-like case

  int count(Column c) const { return counts[static_cast<int>(c)]; }
};

class Suite {
 public:
  explicit Suite(std::string name) : name_(std::move(name)) {}

  /// Expects shape_error naming `entry` and `argument`.
  void error(const std::string& entry, const std::string& description, const std::string& argument,
             std::function<void()> call) {
    error_any(entry, description, {argument}, std::move(call));
  }

  /// Expects shape_error naming `entry` and at least one of `arguments` (a call breaking several
  /// rules may report any of them).
  void error_any(const std::string& entry, const std::string& description,
                 std::vector<std::string> arguments, std::function<void()> call) {
    cases_.push_back(Case{entry, description, std::move(arguments), [call] {
                            call();
                            return true;
                          }});
  }

  /// Expects a normal return with check() true.
  void result(const std::string& entry, const std::string& description,
              std::function<bool()> check) {
    cases_.push_back(Case{entry, description, {}, std::move(check)});
  }

  std::size_t size() const { return cases_.size(); }

  /// Runs every case, prints the table (and every failing case), and returns the report.
  Report run(std::ostream& os = std::cout) const {
    Report rep;
    for (const Case& c : cases_) {
      std::string detail;
      const Column col = classify(c, detail);
      ++rep.tried;
      ++rep.counts[static_cast<int>(col)];
      if (col == Column::silent_wrong || col == Column::crash_like)
        rep.failures.push_back(std::string(to_string(col)) + ": " + c.entry + " -- " +
                               c.description + " -- " + detail);
    }
    os << "[hostile " << name_ << "] " << std::setw(6) << "tried"
       << " | clear error"
       << " | documented result | silent wrong | crash-like\n";
    os << "[hostile " << name_ << "] " << std::setw(6) << rep.tried << " | " << std::setw(11)
       << rep.count(Column::clear_error) << " | " << std::setw(17)
       << rep.count(Column::documented_result) << " | " << std::setw(12)
       << rep.count(Column::silent_wrong) << " | " << std::setw(10) << rep.count(Column::crash_like)
       << "\n";
    for (const std::string& f : rep.failures) os << "[hostile " << name_ << "]   " << f << "\n";
    return rep;
  }

  /// run() plus the gtest assertions: every case tried, none silent-wrong or crash-like.
  Report run_and_expect_clean() const {
    const Report rep = run();
    EXPECT_EQ(rep.tried, static_cast<int>(cases_.size()));
    EXPECT_EQ(rep.count(Column::silent_wrong), 0);
    EXPECT_EQ(rep.count(Column::crash_like), 0);
    for (const std::string& f : rep.failures) ADD_FAILURE() << f;
    return rep;
  }

 private:
  static Column classify(const Case& c, std::string& detail) {
    const bool want_error = !c.arguments.empty();
    try {
      const bool ok = c.call();
      if (want_error) {
        detail = "returned without an error";
        return Column::silent_wrong;
      }
      if (!ok) {
        detail = "returned, but the documented result does not hold";
        return Column::silent_wrong;
      }
      return Column::documented_result;
    } catch (const retention::shape_error& e) {
      const std::string msg = e.what();
      if (!want_error) {
        detail = "unexpected shape_error: " + msg;
        return Column::silent_wrong;
      }
      if (msg.find(c.entry) == std::string::npos) {
        detail = "error does not name " + c.entry + ": " + msg;
        return Column::silent_wrong;
      }
      for (const std::string& a : c.arguments)
        if (msg.find(a) != std::string::npos) return Column::clear_error;
      detail = "error does not name the argument: " + msg;
      return Column::silent_wrong;
    } catch (const std::exception& e) {
      detail = std::string("exception of another type: ") + e.what();
      return Column::crash_like;
    } catch (...) {
      detail = "non-standard exception";
      return Column::crash_like;
    }
  }

  std::string name_;
  std::vector<Case> cases_;
};

}  // namespace retention_hostile
