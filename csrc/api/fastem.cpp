// The C++ API of csrc/api/fastem.h: the loop of Python's fastem_ext.aot
// Package.run around the exported programs (observe, step, finish). Whatever
// the loop computes from images is in a program, traced from Python's own
// functions: no copy of them here.
#include "fastem.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/csrc/api/include/torch/version.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <sstream>
#include <utility>
#include <vector>

namespace fastem {
namespace {

constexpr int kFormat = 4; // aot.FORMAT
constexpr int64_t kChannels = 3; // the network's; grey photos are repeated
constexpr const char* kPrograms[] = {"observe", "step", "finish"}; // aot.PROGRAMS

std::string entry(
    const std::map<std::string, std::string>& manifest,
    const std::string& key) {
  const auto found = manifest.find(key);
  if (found == manifest.end()) {
    throw PackageError("bad package: its manifest has no '" + key + "'");
  }
  return found->second;
}

// The manifest entry `key` parsed whole by `parse` (std::stoll, std::stod),
// else a PackageError saying it is not `what`.
template <typename Parse>
auto parsed(
    const std::map<std::string, std::string>& manifest,
    const std::string& key,
    Parse parse,
    const char* what) {
  const std::string text = entry(manifest, key);
  try {
    size_t used = 0;
    const auto value = parse(text, &used);
    if (used == text.size()) {
      return value;
    }
  } catch (const std::logic_error&) {
  }
  throw PackageError("bad package: '" + key + "' is not " + what + ": " + text);
}

int64_t integer(
    const std::map<std::string, std::string>& manifest,
    const std::string& key) {
  return parsed(
      manifest,
      key,
      [](const std::string& text, size_t* used) {
        return static_cast<int64_t>(std::stoll(text, used));
      },
      "an integer");
}

double real(
    const std::map<std::string, std::string>& manifest,
    const std::string& key) {
  return parsed(
      manifest,
      key,
      [](const std::string& text, size_t* used) { return std::stod(text, used); },
      "a number");
}

// A space-separated list of exactly `count` numbers (Python's repr: exact).
std::vector<float> reals(
    const std::map<std::string, std::string>& manifest,
    const std::string& key,
    int64_t count) {
  std::istringstream text(entry(manifest, key));
  std::vector<float> values;
  double value = 0.0;
  while (text >> value) {
    values.push_back(static_cast<float>(value));
  }
  if (!text.eof() || static_cast<int64_t>(values.size()) != count) {
    throw PackageError(
        "bad package: '" + key + "' is not a list of " +
        std::to_string(count) + " numbers");
  }
  return values;
}

c10::Device parse_device(const std::string& name) {
  try {
    return c10::Device(name);
  } catch (const c10::Error&) {
    throw DeviceError(
        "device must be 'cpu' or 'cuda[:index]', got '" + name + "'");
  }
}

// The first line of an error's message: AOTInductor's and c10's carry a
// multi-line backtrace after it.
std::string first_line(const char* text) {
  const std::string message(text);
  return message.substr(0, message.find('\n'));
}

// `body()`, with every failure a fastem::Error: ours pass through, any other
// (c10::Error, AOTInductor's std::runtime_error, std::bad_alloc) becomes a
// fastem::Error of `context` and the first line of its message.
template <typename Body>
auto guarded(const std::string& context, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& err) {
    throw Error(context + first_line(err.what_without_backtrace()));
  } catch (const std::exception& err) {
    throw Error(context + first_line(err.what()));
  }
}

// The release part "major.minor.patch" of a version string: no local part
// ("+cpu") and no pre-release or development suffix ("a0", ".dev20250101").
std::string release(const std::string& version) {
  std::string out;
  int parts = 0;
  size_t i = 0;
  while (parts < 3 && i < version.size() &&
         std::isdigit(static_cast<unsigned char>(version[i]))) {
    const size_t start = i;
    while (i < version.size() &&
           std::isdigit(static_cast<unsigned char>(version[i]))) {
      ++i;
    }
    out += (parts > 0 ? "." : "") + version.substr(start, i - start);
    ++parts;
    if (i + 1 < version.size() && version[i] == '.' &&
        std::isdigit(static_cast<unsigned char>(version[i + 1]))) {
      ++i;
    } else {
      break;
    }
  }
  return out;
}

at::Generator seeded_generator(const c10::Device& device, uint64_t seed) {
  // Python's torch.Generator(device).manual_seed(seed).
  if (device.is_cpu()) {
    return at::detail::createCPUGenerator(seed);
  }
  at::Generator generator =
      at::detail::getCUDAHooks().getNewGenerator(device.index());
  generator.set_current_seed(seed);
  return generator;
}

constexpr uint64_t kSeeds = uint64_t{1} << 63; // restarts.SEEDS

// restarts.restart_seed: the seed of restart `index` of `count`, seed·count +
// index mod 2^63 (unsigned arithmetic wraps mod 2^64, a multiple of 2^63).
uint64_t restart_seed(uint64_t seed, int64_t index, int64_t count) {
  return (seed * static_cast<uint64_t>(count) + static_cast<uint64_t>(index)) %
      kSeeds;
}

} // namespace

struct Deblurrer::State {
  std::map<std::string, std::string> manifest;
  c10::Device device{c10::kCPU};
  // aot.PROGRAMS: the photo onto the grid and its noise level; one step; a
  // restart's result re-centred, cropped and scored.
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> observe, step, finish;
  int64_t height = 0, width = 0, grid_height = 0,
          grid_width = 0, particles = 0, kernel_size = 0, steps = 0,
          restarts = 0;
  double sigma_min = 0.0, sigma_max = 0.0;
  at::Tensor initial_kernel; // [K, K] on the device
  // The observation on the grid (set_observation).
  at::Tensor y, mask;
  int64_t channels = 0;
  double sigma = 0.0;
  bool sigma_estimated = false;
};

Deblurrer::Deblurrer(const std::string& path, const std::string& device)
    : state_(std::make_unique<State>()) {
  guarded("cannot load package " + path + ": ", [&] { load(path, device); });
}

void Deblurrer::load(const std::string& path, const std::string& device) {
  State& s = *state_;
  const std::filesystem::path folder(path);
  const auto file = [&](const std::string& program) {
    return folder / (program + ".pt2"); // aot.program_file
  };
  const std::filesystem::path step = file("step");
  if (!std::filesystem::is_regular_file(folder / "manifest.json") ||
      !std::filesystem::is_regular_file(step)) {
    throw PackageError(
        "not a fastem package (needs manifest.json and step.pt2): " + path);
  }
  std::unordered_map<std::string, std::string> metadata;
  try {
    metadata = torch::inductor::AOTIModelPackageLoader::
        load_metadata_from_package(step.string(), "model");
  } catch (const std::exception& err) {
    throw PackageError(
        "bad package " + path + ": cannot read step.pt2: " +
        first_line(err.what()));
  }
  s.manifest = {metadata.begin(), metadata.end()};
  if (integer(s.manifest, "format") != kFormat) {
    throw PackageError(
        "bad package " + path + ": format is not " + std::to_string(kFormat) +
        " (made by another fastem: export it again with this one)");
  }
  for (const char* program : kPrograms) { // after the format: format 3 had step.pt2 alone
    if (!std::filesystem::is_regular_file(file(program))) {
      throw PackageError(
          "bad package " + path + ": " + program + ".pt2 missing");
    }
  }
  const std::string made_by = entry(s.manifest, "torch_version");
  if (release(made_by) != release(TORCH_VERSION)) { // as fastem_ext.aot
    throw PackageError(
        "package " + path + " was made by torch " + made_by +
        "; this program runs libtorch " + TORCH_VERSION +
        ": export it again with torch " + TORCH_VERSION);
  }
  s.device = parse_device(device);
  const std::string package_device = entry(s.manifest, "device");
  if (c10::DeviceTypeName(s.device.type(), true) != package_device) {
    throw DeviceError(
        "package " + path + " was compiled for " + package_device +
        ", not for " + device + ": export one for " + device);
  }
  if (s.device.is_cuda() &&
      (!at::hasCUDA() ||
       s.device.index() >= at::detail::getCUDAHooks().deviceCount())) {
    throw DeviceError("device " + device + " is not available here");
  }
  s.height = integer(s.manifest, "height");
  s.width = integer(s.manifest, "width");
  s.grid_height = integer(s.manifest, "grid_height");
  s.grid_width = integer(s.manifest, "grid_width");
  s.particles = integer(s.manifest, "particles");
  s.kernel_size = integer(s.manifest, "kernel_size");
  s.steps = integer(s.manifest, "steps");
  s.restarts = integer(s.manifest, "restarts");
  if (s.restarts < 1) {
    throw PackageError(
        "bad package " + path + ": restarts must be at least 1, got " +
        std::to_string(s.restarts));
  }
  s.sigma_min = real(s.manifest, "sigma_min");
  s.sigma_max = real(s.manifest, "sigma_max");
  const std::vector<float> kernel = reals(
      s.manifest, "initial_kernel", s.kernel_size * s.kernel_size);
  s.initial_kernel =
      at::tensor(kernel).reshape({s.kernel_size, s.kernel_size}).to(s.device);
  const auto loaded = [&](const std::string& program) {
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          file(program).string(), "model", false, 1, s.device.index());
    } catch (const std::exception& err) {
      throw PackageError(
          "bad package " + path + ": cannot load " + program +
          ".pt2: " + first_line(err.what()));
    }
  };
  s.observe = loaded("observe");
  s.step = loaded("step");
  s.finish = loaded("finish");
}

Deblurrer::State& Deblurrer::state() const {
  if (!state_) {
    throw Error("this Deblurrer was moved from: it holds no package");
  }
  return *state_;
}

Deblurrer::~Deblurrer() = default;
Deblurrer::Deblurrer(Deblurrer&&) noexcept = default;
Deblurrer& Deblurrer::operator=(Deblurrer&&) noexcept = default;

const std::map<std::string, std::string>& Deblurrer::manifest() const {
  return state().manifest;
}
int64_t Deblurrer::height() const {
  return state().height;
}
int64_t Deblurrer::width() const {
  return state().width;
}
int64_t Deblurrer::kernel_size() const {
  return state().kernel_size;
}
int64_t Deblurrer::steps() const {
  return state().steps;
}

int64_t Deblurrer::restarts() const {
  return state().restarts;
}

void Deblurrer::set_observation(
    const at::Tensor& image,
    std::optional<double> sigma) {
  State& s = state();
  guarded("set_observation failed: ", [&] { observe(s, image, sigma); });
}

void Deblurrer::observe(
    State& s,
    const at::Tensor& image,
    std::optional<double> sigma) {
  if (!image.defined() || image.dim() != 3 ||
      (image.size(0) != 1 && image.size(0) != kChannels)) {
    throw InputError("image must be [C, H, W] with C = 1 or 3");
  }
  if (image.size(1) != s.height || image.size(2) != s.width) {
    throw InputError(
        "image is " + std::to_string(image.size(1)) + "x" +
        std::to_string(image.size(2)) + "; the package is for " +
        std::to_string(s.height) + "x" + std::to_string(s.width) + " photos");
  }
  if (image.scalar_type() != at::kFloat) {
    throw InputError(
        std::string("image must be float32, got ") +
        c10::toString(image.scalar_type()));
  }
  const at::Tensor photo = image.to(at::kCPU).contiguous();
  if (!photo.isfinite().all().item<bool>() || photo.min().item<float>() < 0 ||
      photo.max().item<float>() > 1) {
    throw InputError("image must hold finite values in [0, 1]");
  }
  // The program: the photo on the grid, its mask, its noise level (float64).
  const at::Tensor colour =
      photo.size(0) == 1 ? photo.expand({kChannels, -1, -1}) : photo;
  std::vector<at::Tensor> observed = guarded("the observe program failed: ", [&] {
    return s.observe->run({colour.to(s.device).contiguous()});
  });
  const double level =
      sigma.has_value() ? *sigma : observed.at(2).item<double>();
  if (!std::isfinite(level) || level < s.sigma_min || level > s.sigma_max) {
    std::ostringstream message;
    message << (sigma.has_value() ? "sigma" : "the estimated noise level (pass sigma)")
            << " must be in [" << s.sigma_min << ", " << s.sigma_max
            << "] in [0, 1] units, got " << level;
    throw InputError(message.str());
  }
  s.y = std::move(observed.at(0));
  s.mask = std::move(observed.at(1));
  s.channels = photo.size(0);
  s.sigma = level;
  s.sigma_estimated = !sigma.has_value();
}

Result Deblurrer::run(
    uint64_t seed,
    const Progress& progress,
    const std::atomic<bool>* cancel) {
  State& s = state();
  return guarded("run failed: ", [&] { return sample(s, seed, progress, cancel); });
}

Result Deblurrer::sample(
    State& s,
    uint64_t seed,
    const Progress& progress,
    const std::atomic<bool>* cancel) {
  if (!s.y.defined()) {
    throw InputError("run() needs an observation: call set_observation first");
  }
  if (seed >= kSeeds) { // as Python's run(): seeds are in [0, 2^63)
    throw InputError(
        "seed must be below 2^63, got " + std::to_string(seed));
  }
  const auto started = std::chrono::steady_clock::now();
  const at::TensorOptions options = s.y.options();
  const std::vector<int64_t> shape = {
      s.particles, kChannels, s.grid_height, s.grid_width};
  const at::Tensor sigma = at::scalar_tensor(s.sigma, options);
  const int64_t total = s.steps * s.restarts;
  const auto stop_if_cancelled = [&](int64_t done) {
    if (cancel != nullptr && cancel->load()) {
      throw Cancelled(
          "cancelled after " + std::to_string(done) + " of " +
          std::to_string(total) + " steps");
    }
  };
  Result result;
  double best = 0.0;
  bool kept = false;
  std::string first_error; // of the first restart that diverged
  // As Python's run(): `restarts` runs, restart r with the stream of seed
  // seed·restarts + r, the one whose frame has the least total variation kept
  // (fastem_ext.restarts.keep_least; the first on a tie); a restart that
  // diverged is left out, and run() fails only when all of them did.
  for (int64_t restart = 0; restart < s.restarts; ++restart) {
    at::Generator generator =
        seeded_generator(s.device, restart_seed(seed, restart, s.restarts));
    // samplers.sample's order: x_T, then one noise tensor per step.
    at::Tensor x = at::randn(shape, generator, options);
    at::Tensor kernel = s.initial_kernel.clone();
    for (int64_t i = s.steps - 1; i >= 0; --i) {
      const int64_t done = restart * s.steps + s.steps - 1 - i;
      stop_if_cancelled(done);
      const at::Tensor noise = at::randn(shape, generator, options);
      const at::Tensor step = at::scalar_tensor(i, options.dtype(at::kLong));
      // e.g. out of memory, or a program that refuses its inputs
      std::vector<at::Tensor> out = guarded("the step program failed: ", [&] {
        return s.step->run({x, kernel, step, noise, s.y, s.mask, sigma});
      });
      x = std::move(out.at(0));
      kernel = std::move(out.at(1));
      if (progress) {
        progress(done + 1, total);
      }
    }
    // As Python's run(): no NaN or inf leaves (the clamp below would hide inf).
    std::string diverged;
    if (!kernel.isfinite().all().item<bool>()) {
      diverged =
          "the M-step produced a kernel with NaN or infinite values (the prior "
          "diverged during the run); nothing was returned";
    } else if (!x.isfinite().all().item<bool>()) {
      diverged =
          "sampling produced NaN or infinite values (the prior's output or the "
          "guidance diverged during the run); nothing was returned";
    }
    if (!diverged.empty()) {
      if (s.restarts == 1) {
        throw Error(diverged);
      }
      if (first_error.empty()) {
        first_error = diverged;
      }
      result.diverged.push_back(restart);
      continue;
    }
    // The program: the particles in [0, 1] re-centred with the kernel (every
    // exported method is blind: as Python's run()), cropped to the frame, and
    // the restart's score.
    std::vector<at::Tensor> finished = guarded("the finish program failed: ", [&] {
      return s.finish->run({x, kernel});
    });
    const double score = finished.at(3).item<double>();
    if (!kept || score < best) {
      kept = true;
      best = score;
      result.restart = restart;
      result.particles = std::move(finished.at(0));
      result.kernel = std::move(finished.at(1));
      const at::Tensor moved = finished.at(2).to(at::kCPU);
      result.recentred_dy = moved[0].item<double>();
      result.recentred_dx = moved[1].item<double>();
    }
  }
  if (!kept) {
    throw Error(
        "all " + std::to_string(s.restarts) +
        " restarts diverged; the first: " + first_error);
  }
  stop_if_cancelled(total); // a flag set during the last step counts too
  if (s.channels == 1) {
    result.particles = result.particles.mean(1, /*keepdim=*/true);
  }
  result.particles = result.particles.to(at::kCPU).contiguous();
  result.image = result.particles[0];
  result.kernel = result.kernel.to(at::kCPU).contiguous();
  result.sigma = s.sigma;
  result.sigma_estimated = s.sigma_estimated;
  result.seconds = std::chrono::duration<double>(
                       std::chrono::steady_clock::now() - started)
                       .count();
  return result;
}

} // namespace fastem
