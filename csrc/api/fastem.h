// fastem from C++: the whole blind deblur (Fast Diffusion EM) with a package
// exported by `fastem export` (Python's fastem_ext.aot), no Python at run time.
//
//   fastem::Deblurrer deblurrer("pkg-256", "cpu");   // the package's folder
//   deblurrer.set_observation(image);                // [C, H, W] float32, [0, 1]
//   fastem::Result result = deblurrer.run(/*seed=*/0, on_progress, &cancel);
//
// A package holds three programs compiled by AOTInductor for one prior,
// image size, particle count, method and device (observe.pt2: the photo onto
// the computation grid and its noise estimate; step.pt2: the guided step;
// finish.pt2: a restart's result re-centred, cropped and scored) and its
// settings (manifest.json; the C++ side reads the same entries from
// step.pt2's metadata). The loop here is Python's run(): the same seed gives
// the same result (float32, CPU: within 1e-4; the CI compares them).
//
// Errors: every failure throws a fastem::Error (a std::runtime_error) whose
// what() names the cause in one line; the subclasses say which kind (a failure
// inside the compiled step, out of memory say, a run whose restarts all
// produced NaN or infinite values (one that did is left out: Result::diverged),
// or a call on a moved-from Deblurrer is a plain fastem::Error). A Deblurrer holds no
// global state: several may run side by side, each from one thread at a time.
// Link against libfastem (it also registers the fused ops the program calls).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastem {

// The base of every error thrown here.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Not a package, a damaged one, or one made by another torch release (the
// major.minor.patch differs; the message names both full versions).
class PackageError : public Error {
 public:
  using Error::Error;
};

// The device is unknown, absent, or not the one the package was compiled for.
class DeviceError : public Error {
 public:
  using Error::Error;
};

// An observation of the wrong size, channels or dtype, non-finite or outside
// [0, 1]; a noise level outside the package's range; run() before
// set_observation().
class InputError : public Error {
 public:
  using Error::Error;
};

// run() stopped because the cancel flag was set.
class Cancelled : public Error {
 public:
  using Error::Error;
};

struct Result {
  at::Tensor image; // [C, H, W] float32 in [0, 1] (the first particle), CPU
  at::Tensor particles; // [n, C, H, W] float32 in [0, 1], CPU
  at::Tensor kernel; // [K, K] float32, sum 1, centre of mass at (K/2, K/2), CPU
  // How far (pixels, down and right) the images moved when the kernel's centre
  // of mass was put on its centre pixel (Python's fastem_ext.centring).
  double recentred_dy = 0.0, recentred_dx = 0.0;
  // Which of the package's restarts was kept (restart r runs the random stream
  // of seed·restarts + r; the one whose frame has the least total variation is
  // kept, as Python's run() does).
  int64_t restart = 0;
  // The restarts left out because their result held NaN or inf (run() throws
  // Error when all of them diverged).
  std::vector<int64_t> diverged;
  double sigma = 0.0; // the noise level used, [0, 1] units
  bool sigma_estimated = false;
  double seconds = 0.0; // wall time of the sampling loop
};

// Called after every step with the steps done and their total (over all
// restarts).
using Progress = std::function<void(int64_t done, int64_t total)>;

class Deblurrer {
 public:
  // Loads the package folder `path` for `device` ("cpu", "cuda", "cuda:1"),
  // which must be the package's device type. Throws PackageError or
  // DeviceError.
  explicit Deblurrer(const std::string& path, const std::string& device = "cpu");
  ~Deblurrer();
  Deblurrer(Deblurrer&&) noexcept;
  Deblurrer& operator=(Deblurrer&&) noexcept;

  // The package's settings as strings (manifest.json's entries).
  const std::map<std::string, std::string>& manifest() const;
  int64_t height() const; // the photo size the package takes
  int64_t width() const;
  int64_t kernel_size() const;
  int64_t steps() const; // per restart
  int64_t restarts() const; // blind runs per run() (the manifest's)

  // The blurry photo: [C, H, W] (C = 1 grey or 3 RGB) float32 in [0, 1], on
  // any device. `sigma`: its noise level in [0, 1] units (10/255 = 0.039);
  // none estimates it as Python's run() does (estimate_noise, in the
  // package's observe program). Throws InputError.
  void set_observation(
      const at::Tensor& image,
      std::optional<double> sigma = std::nullopt);

  // The blind deblur of the last observation: the package's restarts, restart
  // r with the random stream of seed·restarts + r (seed below 2^63, else
  // InputError), the least total variation kept, as Python's run().
  // `progress` is called after each step; `cancel`, when set (by any thread)
  // before run() returns, stops the run with Cancelled before the next step
  // (or after the last: no result).
  Result run(
      uint64_t seed = 0,
      const Progress& progress = {},
      const std::atomic<bool>* cancel = nullptr);

 private:
  struct State;
  State& state() const; // throws Error when moved from
  void load(const std::string& path, const std::string& device);
  static void observe(
      State& s,
      const at::Tensor& image,
      std::optional<double> sigma);
  static Result sample(
      State& s,
      uint64_t seed,
      const Progress& progress,
      const std::atomic<bool>* cancel);
  std::unique_ptr<State> state_;
};

} // namespace fastem
