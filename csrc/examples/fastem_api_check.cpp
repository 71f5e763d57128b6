// Checks of the C++ API (csrc/api/fastem.h) that fastem_deblur does not
// make: two Deblurrers running at once in two threads give the result of one
// alone (no shared state); progress counts every step; a cancel flag set
// before run() stops it before the first step; wrong observations and run()
// without one throw InputError; a moved-from Deblurrer throws fastem::Error.
// With FAILING, a package whose step program refuses its inputs (made by
// tests/test_aot_cpp.py: its metadata's grid size edited), run() must throw a
// fastem::Error of one line (AOTInductor's own errors are multi-line).
//
//   fastem_api_check PACKAGE [FAILING]   exit status 0 when every check passes
#include "../api/fastem.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <atomic>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>
#include <utility>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%-60s %s\n", what, ok ? "ok" : "FAIL");
  failures += ok ? 0 : 1;
}

template <typename Failure, typename Call>
bool throws(Call&& call) {
  try {
    call();
  } catch (const Failure&) {
    return true;
  } catch (const std::exception& err) {
    std::printf("  unexpected error: %s\n", err.what());
  }
  return false;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 2 && argc != 3) {
    std::fprintf(stderr, "usage: fastem_api_check PACKAGE [FAILING]\n");
    return 2;
  }
  const std::string package = argv[1];
  try {
    fastem::Deblurrer first(package), second(package);
    auto generator = at::detail::createCPUGenerator(7);
    const at::Tensor photo =
        at::rand({3, first.height(), first.width()}, generator);
    const at::Tensor grey = photo.slice(0, 0, 1);
    first.set_observation(photo, 5.0 / 255);
    second.set_observation(grey); // σ estimated
    const fastem::Result alone = first.run(1);
    const fastem::Result grey_alone = second.run(2);
    fastem::Result together, grey_together;
    int64_t reported = 0;
    std::exception_ptr failed_one, failed_two; // a thread's error, rethrown here
    std::thread one([&] {
      try {
        together = first.run(1, [&](int64_t done, int64_t) { reported = done; });
      } catch (...) {
        failed_one = std::current_exception();
      }
    });
    std::thread two([&] {
      try {
        grey_together = second.run(2);
      } catch (...) {
        failed_two = std::current_exception();
      }
    });
    one.join();
    two.join();
    for (const std::exception_ptr& failed : {failed_one, failed_two}) {
      if (failed) {
        std::rethrow_exception(failed);
      }
    }
    check(
        at::equal(together.image, alone.image) &&
            at::equal(together.kernel, alone.kernel),
        "RGB deblurrer: side by side = alone");
    check(
        at::equal(grey_together.image, grey_alone.image) &&
            grey_alone.image.size(0) == 1 && grey_alone.sigma_estimated,
        "grey deblurrer (σ estimated): side by side = alone");
    check(
        reported == first.steps() * first.restarts(),
        "progress reports every step of every restart");
    check(
        !at::equal(first.run(3).image, alone.image),
        "another seed, another sample");
    check(
        throws<fastem::InputError>([&] { first.run(uint64_t{1} << 63); }),
        "a seed of 2^63 or more is an InputError");
    std::atomic<bool> cancel{true};
    check(
        throws<fastem::Cancelled>([&] { first.run(1, {}, &cancel); }),
        "a set cancel flag stops run() with Cancelled");
    check(
        throws<fastem::InputError>([&] {
          first.set_observation(photo.slice(2, 0, first.width() - 1));
        }),
        "a photo of another size is an InputError");
    check(
        throws<fastem::InputError>([&] { first.set_observation(photo * 2); }),
        "values outside [0, 1] are an InputError");
    check(
        throws<fastem::InputError>(
            [&] { first.set_observation(photo.to(at::kDouble)); }),
        "a float64 photo is an InputError");
    check(
        throws<fastem::InputError>([&] {
          fastem::Deblurrer fresh(package);
          fresh.run();
        }),
        "run() before set_observation is an InputError");
    check(
        throws<fastem::DeviceError>([&] { fastem::Deblurrer(package, "tpu"); }),
        "an unknown device is a DeviceError");
    check(
        throws<fastem::Error>([&] {
          fastem::Deblurrer fresh(package);
          fastem::Deblurrer taken(std::move(fresh));
          fresh.set_observation(photo);
        }),
        "a moved-from Deblurrer throws fastem::Error");
    if (argc == 3) {
      fastem::Deblurrer failing(argv[2]);
      failing.set_observation(photo, 5.0 / 255);
      bool one_line = false;
      check(
          throws<fastem::Error>([&] {
            try {
              failing.run();
            } catch (const fastem::Error& err) {
              one_line = std::string(err.what()).find('\n') == std::string::npos;
              std::printf("  (%s)\n", err.what());
              throw;
            }
          }) && one_line,
          "a failing step program throws a one-line fastem::Error");
    }
  } catch (const std::exception& err) {
    std::fprintf(stderr, "fastem_api_check: error: %s\n", err.what());
    return 2;
  }
  std::printf("%s\n", failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
