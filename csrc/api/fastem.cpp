// The C++ API of csrc/api/fastem.h: the loop of Python's fastem_ext.aot
// Package.run around the exported step program.
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

constexpr int kFormat = 3; // aot.FORMAT
constexpr int64_t kChannels = 3; // the network's; grey photos are repeated
constexpr double kMadToStd = 0.6744897501960817; // median(|N(0, 1)|)

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

// fastem_ext.centring: the centre of mass of `kernel` [K, K] minus its centre
// (K/2, K/2), as a float64 tensor [dy, dx].
at::Tensor centroid_offset(const at::Tensor& kernel) {
  const int64_t size = kernel.size(-1);
  const at::Tensor index =
      at::arange(size, kernel.options().dtype(at::kDouble)) - size / 2;
  const at::Tensor total = kernel.sum();
  return at::stack(
             {(kernel.sum(1) * index).sum(), (kernel.sum(0) * index).sum()}) /
      total;
}

// centring.shift: `images` [..., H, W] (float64) moved by `offset` [dy, dx] by
// a Fourier phase ramp on the circular grid.
at::Tensor shift(const at::Tensor& images, const at::Tensor& offset) {
  const auto real = images.options().dtype(at::kDouble);
  const at::Tensor fy =
      at::fft_fftfreq(images.size(-2), 1.0, real).unsqueeze(1);
  const at::Tensor fx =
      at::fft_fftfreq(images.size(-1), 1.0, real).unsqueeze(0);
  const at::Tensor ramp = at::polar(
      at::ones_like(fy * fx), -2 * M_PI * (fy * offset[0] + fx * offset[1]));
  return at::real(at::fft_ifft2(at::fft_fft2(images) * ramp));
}

constexpr int64_t kKernelPad = 2; // centring.KERNEL_PAD
constexpr int64_t kImagePad = 16; // centring.IMAGE_PAD

// centring.recentre: the kernel moved so that its centre of mass is its centre
// pixel, `images` [n, C, H, W] in [0, 1] moved the opposite way; returns the
// offset the images moved.
at::Tensor recentre(at::Tensor& kernel, at::Tensor& images) {
  const at::Tensor weights = kernel.to(at::kDouble);
  const at::Tensor offset = centroid_offset(weights);
  const int64_t size = weights.size(-1);
  const at::Tensor moved =
      shift(at::constant_pad_nd(
                weights, {kKernelPad, kKernelPad, kKernelPad, kKernelPad}),
            -offset)
          .slice(0, kKernelPad, kKernelPad + size)
          .slice(1, kKernelPad, kKernelPad + size)
          .clamp_min(0.0);
  kernel = (moved / moved.sum()).to(kernel.scalar_type());
  const int64_t height = images.size(-2), width = images.size(-1);
  const int64_t pad = std::min({kImagePad, height - 1, width - 1});
  const at::Tensor flat = at::reflection_pad2d(
      images.reshape({-1, 1, height, width}).to(at::kDouble),
      {pad, pad, pad, pad});
  std::vector<at::Tensor> shifted;
  for (int64_t i = 0; i < flat.size(0); ++i) { // one at a time: 16 B/pixel
    shifted.push_back(shift(flat[i], offset)
                          .slice(1, pad, pad + height)
                          .slice(2, pad, pad + width));
  }
  images = at::stack(shifted)
               .clamp(0.0, 1.0)
               .reshape(images.sizes())
               .to(images.scalar_type());
  return offset.to(at::kCPU);
}

constexpr uint64_t kSeeds = uint64_t{1} << 63; // restarts.SEEDS

// restarts.restart_seed: the seed of restart `index` of `count`, seed·count +
// index mod 2^63 (unsigned arithmetic wraps mod 2^64, a multiple of 2^63).
uint64_t restart_seed(uint64_t seed, int64_t index, int64_t count) {
  return (seed * static_cast<uint64_t>(count) + static_cast<uint64_t>(index)) %
      kSeeds;
}

// restarts.total_variation of `images` [..., H, W].
double total_variation(const at::Tensor& images) {
  const int64_t height = images.size(-2), width = images.size(-1);
  const at::Tensor across = (images.slice(-1, 1, width) -
                             images.slice(-1, 0, width - 1))
                                .abs()
                                .mean();
  const at::Tensor down = (images.slice(-2, 1, height) -
                           images.slice(-2, 0, height - 1))
                              .abs()
                              .mean();
  return (across + down).item<double>();
}

} // namespace

double estimate_noise(const at::Tensor& image, double floor) {
  // As fastem_ext.noise.estimate_noise: tests/test_aot_cpp.py compares the two
  // on the same random draws (grey and colour, odd and even sizes).
  const int64_t height = image.size(-2) / 2 * 2;
  const int64_t width = image.size(-1) / 2 * 2;
  const at::Tensor x =
      image.slice(-2, 0, height).slice(-1, 0, width).to(at::kDouble);
  const auto even = [](const at::Tensor& t, int64_t dim, int64_t start) {
    return t.slice(dim, start, c10::nullopt, 2);
  };
  const at::Tensor top = even(x, -2, 0), bottom = even(x, -2, 1);
  const at::Tensor diagonal = (even(top, -1, 0) - even(top, -1, 1) -
                               even(bottom, -1, 0) + even(bottom, -1, 1)) /
      2;
  const double sigma = diagonal.abs().median().item<double>() / kMadToStd;
  return std::max(sigma, floor);
}

struct Deblurrer::State {
  std::map<std::string, std::string> manifest;
  c10::Device device{c10::kCPU};
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> program;
  int64_t height = 0, width = 0, top = 0, left = 0, grid_height = 0,
          grid_width = 0, particles = 0, kernel_size = 0, steps = 0,
          restarts = 0;
  bool masked = false;
  double sigma_min = 0.0, sigma_max = 0.0, sigma_floor = 0.0;
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
  const std::filesystem::path step = folder / "step.pt2";
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
  s.top = integer(s.manifest, "top");
  s.left = integer(s.manifest, "left");
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
  s.masked = integer(s.manifest, "masked") != 0;
  s.sigma_min = real(s.manifest, "sigma_min");
  s.sigma_max = real(s.manifest, "sigma_max");
  s.sigma_floor = real(s.manifest, "sigma_floor");
  const std::vector<float> kernel = reals(
      s.manifest, "initial_kernel", s.kernel_size * s.kernel_size);
  s.initial_kernel =
      at::tensor(kernel).reshape({s.kernel_size, s.kernel_size}).to(s.device);
  try {
    s.program = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        step.string(), "model", false, 1, s.device.index());
  } catch (const std::exception& err) {
    throw PackageError(
        "bad package " + path + ": cannot load step.pt2: " +
        first_line(err.what()));
  }
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
  const double level =
      sigma.has_value() ? *sigma : estimate_noise(photo, s.sigma_floor);
  if (!std::isfinite(level) || level < s.sigma_min || level > s.sigma_max) {
    std::ostringstream message;
    message << (sigma.has_value() ? "sigma" : "the estimated noise level (pass sigma)")
            << " must be in [" << s.sigma_min << ", " << s.sigma_max
            << "] in [0, 1] units, got " << level;
    throw InputError(message.str());
  }
  // boundary.Frame.pad: edge replication around the frame, and its mask.
  const at::Tensor colour =
      photo.size(0) == 1 ? photo.expand({kChannels, -1, -1}) : photo;
  const at::Tensor on_device = colour.to(s.device);
  if (s.masked) {
    const int64_t bottom = s.grid_height - s.height - s.top;
    const int64_t right = s.grid_width - s.width - s.left;
    s.y = at::pad(
              on_device.unsqueeze(0),
              {s.left, right, s.top, bottom},
              "replicate")
              .squeeze(0)
              .contiguous();
  } else {
    s.y = on_device.contiguous();
  }
  s.mask = at::zeros({1, s.grid_height, s.grid_width}, s.y.options());
  s.mask.slice(1, s.top, s.top + s.height)
      .slice(2, s.left, s.left + s.width)
      .fill_(1.0);
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
  const auto frame = [&](const at::Tensor& images) {
    return images.slice(2, s.top, s.top + s.height)
        .slice(3, s.left, s.left + s.width);
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
        return s.program->run({x, kernel, step, noise, s.y, s.mask, sigma});
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
    // schedule.to_image of the clamped particles, re-centred with the kernel
    // (every exported method is blind: as Python's run()).
    at::Tensor images = (x.clamp(-1.0, 1.0) + 1.0) / 2.0;
    const at::Tensor moved = recentre(kernel, images);
    const double score = total_variation(frame(images));
    if (!kept || score < best) {
      kept = true;
      best = score;
      result.restart = restart;
      result.particles = frame(images).clone(); // not a view of the whole grid
      result.kernel = kernel;
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
