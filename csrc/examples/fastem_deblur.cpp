// fastem_deblur: blind deblurring of a PNG photo from C++ with a package
// exported by `fastem export` (csrc/api/fastem.h).
//
//   fastem_deblur PACKAGE IN.png OUT.png [--kernel-out K.npy] [--sigma S]
//                 [--seed N] [--device cpu|cuda]
//
// IN.png: 8- or 16-bit, grey, grey+alpha, RGB or RGBA (alpha is dropped),
// palette; its size must be the package's. OUT.png has IN's bit depth and
// channels; OUT.npy instead writes the exact float32 [C, H, W] image.
// --kernel-out: the kernel, float32 [K, K] .npy (exact) or a 16-bit grey PNG
// scaled to its peak. --sigma: the noise level in /255 units (default:
// estimated). Exit status: 0 done, 2 bad input or failed run (one line on
// stderr, nothing written), 130 cancelled (Ctrl-C).
#include "../api/fastem.h"

#include <ATen/ATen.h>
#include <png.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::atomic<bool> cancel_requested{false};

extern "C" void on_interrupt(int) {
  cancel_requested.store(true);
}

struct Image {
  at::Tensor pixels; // [C, H, W] float32 in [0, 1]
  int bits = 8;
};

struct File {
  std::FILE* handle;
  explicit File(const std::string& path, const char* mode)
      : handle(std::fopen(path.c_str(), mode)) {
    if (handle == nullptr) {
      throw std::runtime_error(
          "cannot open " + path + ": " + std::strerror(errno));
    }
  }
  ~File() {
    std::fclose(handle);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
};

[[noreturn]] void png_failure(png_structp, png_const_charp message) {
  throw std::runtime_error(std::string("PNG: ") + message);
}

void png_warning_ignored(png_structp, png_const_charp) {}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
      text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

constexpr png_uint_32 kMaxSide = 8192; // fastem_ext.aot.MAX_SIDE: no package is larger

uint32_t tiff_word(const unsigned char* at, bool big_endian, int bytes) {
  uint32_t value = 0;
  for (int i = 0; i < bytes; ++i) {
    value |= static_cast<uint32_t>(at[big_endian ? i : bytes - 1 - i])
        << (8 * (bytes - 1 - i));
  }
  return value;
}

// The EXIF orientation (tag 0x0112 of IFD0) of a PNG's eXIf chunk; 1, upright,
// when absent or unreadable (as Python's io._orientation).
int exif_orientation(png_structp png, png_infop info) {
#ifdef PNG_eXIf_SUPPORTED
  png_uint_32 size = 0;
  png_bytep exif = nullptr;
  if (png_get_eXIf_1(png, info, &size, &exif) == 0 || exif == nullptr ||
      size < 8) {
    return 1;
  }
  const bool big = exif[0] == 'M' && exif[1] == 'M';
  if (!big && !(exif[0] == 'I' && exif[1] == 'I')) {
    return 1;
  }
  const uint32_t ifd = tiff_word(exif + 4, big, 4);
  if (ifd > size - 2) {
    return 1;
  }
  const uint32_t entries = tiff_word(exif + ifd, big, 2);
  for (uint32_t e = 0; e < entries; ++e) {
    const uint64_t at = ifd + 2 + 12ull * e;
    if (at + 12 > size) {
      break;
    }
    if (tiff_word(exif + at, big, 2) == 0x0112) {
      const uint32_t value = tiff_word(exif + at + 8, big, 2); // SHORT
      return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
    }
  }
#else
  (void)png;
  (void)info;
#endif
  return 1;
}

// As Python's fastem_ext.io.load_image: 8-bit / 255, 16-bit / 65535, alpha
// dropped, palettes and low bit depths expanded (1-bit grey: one channel).
// A photo whose EXIF orientation is not upright is refused (Python rotates
// it; this reader does not).
Image read_png(const std::string& path) {
  File file(path, "rb");
  unsigned char signature[8];
  if (std::fread(signature, 1, 8, file.handle) != 8 ||
      png_sig_cmp(signature, 0, 8) != 0) {
    throw std::runtime_error(path + " is not a PNG file");
  }
  png_structp png = png_create_read_struct(
      PNG_LIBPNG_VER_STRING, nullptr, png_failure, png_warning_ignored);
  png_infop info = png == nullptr ? nullptr : png_create_info_struct(png);
  struct Guard {
    png_structp* png;
    png_infop* info;
    ~Guard() {
      png_destroy_read_struct(png, info, nullptr); // accepts null structs
    }
  } guard{&png, &info};
  if (png == nullptr || info == nullptr) {
    throw std::runtime_error("PNG: cannot allocate libpng's structures");
  }
  png_init_io(png, file.handle);
  png_set_sig_bytes(png, 8);
  png_read_info(png, info);
  const png_uint_32 width = png_get_image_width(png, info);
  const png_uint_32 height = png_get_image_height(png, info);
  if (width == 0 || height == 0 || width > kMaxSide || height > kMaxSide) {
    throw std::runtime_error(
        path + " is " + std::to_string(width) + "x" + std::to_string(height) +
        " pixels; at most " + std::to_string(kMaxSide) + " on a side");
  }
  png_set_expand(png); // palette -> RGB, grey < 8 bits -> 8, tRNS -> alpha
  png_read_update_info(png, info);
  const int bits = png_get_bit_depth(png, info);
  const int stored = png_get_channels(png, info);
  const size_t row_bytes = png_get_rowbytes(png, info);
  std::vector<unsigned char> data(row_bytes * height);
  std::vector<png_bytep> rows(height);
  for (png_uint_32 r = 0; r < height; ++r) {
    rows[r] = data.data() + r * row_bytes;
  }
  png_read_image(png, rows.data());
  png_read_end(png, info); // an eXIf chunk may follow the pixels
  const int orientation = exif_orientation(png, info);
  if (orientation != 1) {
    throw std::runtime_error(
        path + " has EXIF orientation " + std::to_string(orientation) +
        " (not upright), which fastem_deblur does not apply: rotate the "
        "pixels upright and drop the tag first");
  }
  const int colours = stored >= 3 ? 3 : 1; // alpha dropped
  at::Tensor pixels = at::empty({colours, height, width}, at::kFloat);
  float* out = pixels.data_ptr<float>();
  for (png_uint_32 r = 0; r < height; ++r) {
    for (png_uint_32 c = 0; c < width; ++c) {
      for (int k = 0; k < colours; ++k) {
        const size_t sample = (static_cast<size_t>(c) * stored + k);
        float value = 0.0f;
        if (bits == 16) { // PNG's samples are big-endian on any host
          const png_bytep at = rows[r] + 2 * sample;
          const unsigned word = (static_cast<unsigned>(at[0]) << 8) | at[1];
          value = static_cast<float>(word) / 65535.0f;
        } else {
          value = static_cast<float>(rows[r][sample]) / 255.0f;
        }
        out[(static_cast<size_t>(k) * height + r) * width + c] = value;
      }
    }
  }
  return {pixels, bits == 16 ? 16 : 8};
}

// [C, H, W] in [0, 1] (C = 1 or 3), rounded half to even as numpy does.
std::vector<unsigned char> encode_png(const at::Tensor& image, int bits) {
  const at::Tensor pixels = image.clamp(0.0, 1.0).contiguous();
  const int64_t channels = pixels.size(0), height = pixels.size(1),
                width = pixels.size(2);
  const float* in = pixels.data_ptr<float>();
  const int bytes = bits / 8;
  const float scale = bits == 16 ? 65535.0f : 255.0f;
  std::vector<unsigned char> data(channels * height * width * bytes);
  for (int64_t r = 0; r < height; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      for (int64_t k = 0; k < channels; ++k) {
        const auto level = static_cast<uint16_t>(
            std::nearbyint(in[(k * height + r) * width + c] * scale));
        unsigned char* at_byte =
            data.data() + ((r * width + c) * channels + k) * bytes;
        if (bytes == 2) { // PNG is big-endian
          at_byte[0] = static_cast<unsigned char>(level >> 8);
          at_byte[1] = static_cast<unsigned char>(level & 0xff);
        } else {
          at_byte[0] = static_cast<unsigned char>(level);
        }
      }
    }
  }
  std::vector<unsigned char> file;
  png_structp png = png_create_write_struct(
      PNG_LIBPNG_VER_STRING, nullptr, png_failure, png_warning_ignored);
  png_infop info = png == nullptr ? nullptr : png_create_info_struct(png);
  struct Guard {
    png_structp* png;
    png_infop* info;
    ~Guard() {
      png_destroy_write_struct(png, info); // accepts null structs
    }
  } guard{&png, &info};
  if (png == nullptr || info == nullptr) {
    throw std::runtime_error("PNG: cannot allocate libpng's structures");
  }
  png_set_write_fn(
      png,
      &file,
      [](png_structp p, png_bytep chunk, png_size_t length) {
        auto* sink = static_cast<std::vector<unsigned char>*>(png_get_io_ptr(p));
        sink->insert(sink->end(), chunk, chunk + length);
      },
      nullptr);
  png_set_IHDR(
      png,
      info,
      static_cast<png_uint_32>(width),
      static_cast<png_uint_32>(height),
      bits,
      channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY,
      PNG_INTERLACE_NONE,
      PNG_COMPRESSION_TYPE_DEFAULT,
      PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int64_t r = 0; r < height; ++r) {
    png_write_row(png, data.data() + r * width * channels * bytes);
  }
  png_write_end(png, nullptr);
  return file;
}

// A float32 tensor as a NumPy .npy file (format 1.0, C order).
std::vector<unsigned char> encode_npy(const at::Tensor& tensor) {
  const at::Tensor values = tensor.to(at::kFloat).contiguous();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (int64_t d = 0; d < values.dim(); ++d) {
    header += std::to_string(values.size(d)) + (values.dim() == 1 ? ",)" : "");
    if (values.dim() > 1) {
      header += d + 1 < values.dim() ? ", " : ")";
    }
  }
  header += ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n'; // 10-byte preamble + header: a multiple of 64
  std::vector<unsigned char> file = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  file.push_back(static_cast<unsigned char>(header.size() & 0xff));
  file.push_back(static_cast<unsigned char>(header.size() >> 8));
  file.insert(file.end(), header.begin(), header.end());
  const auto* bytes = reinterpret_cast<const unsigned char*>(values.data_ptr());
  file.insert(file.end(), bytes, bytes + values.numel() * sizeof(float));
  return file;
}

std::vector<unsigned char> encode(const std::string& path, const at::Tensor& image, int bits) {
  if (ends_with(path, ".npy")) {
    return encode_npy(image);
  }
  if (ends_with(path, ".png")) {
    return encode_png(image, bits);
  }
  throw std::runtime_error(path + ": outputs must be .png or .npy");
}

// All files written, or none: each goes to a temporary name, then is renamed.
void commit(const std::vector<std::pair<std::string, std::vector<unsigned char>>>& files) {
  std::vector<std::string> staged;
  try {
    for (const auto& [path, data] : files) {
      const std::string temporary = path + ".fastem-tmp";
      std::ofstream out(temporary, std::ios::binary);
      staged.push_back(temporary);
      out.write(reinterpret_cast<const char*>(data.data()), data.size());
      if (!out.flush()) {
        throw std::runtime_error("cannot write " + path);
      }
    }
    for (size_t i = 0; i < files.size(); ++i) {
      if (std::rename(staged[i].c_str(), files[i].first.c_str()) != 0) {
        throw std::runtime_error(
            "cannot write " + files[i].first + ": " + std::strerror(errno));
      }
    }
  } catch (...) {
    for (const std::string& temporary : staged) {
      std::remove(temporary.c_str());
    }
    throw;
  }
}

// AOTInductor's runtime prints a failing program's error, several lines, to
// stderr itself before run() throws it as one fastem::Error. While alive, this
// holds what is written to stderr (fd 2) in a temporary file; release(true)
// replays it (run() succeeded: its warnings are kept), the destructor drops it
// (the error line printed after names the cause). terminal(): the real stderr.
class HeldStderr {
 public:
  HeldStderr() {
    std::fflush(stderr);
    saved_ = dup(2);
    held_ = std::tmpfile();
    if (saved_ < 0 || held_ == nullptr || dup2(fileno(held_), 2) < 0) {
      restore(); // cannot hold: write straight through
    }
  }
  ~HeldStderr() {
    release(false);
  }
  HeldStderr(const HeldStderr&) = delete;
  HeldStderr& operator=(const HeldStderr&) = delete;
  int terminal() const {
    return saved_ >= 0 ? saved_ : 2;
  }
  void release(bool replay) {
    if (held_ == nullptr) {
      return;
    }
    std::fflush(stderr);
    const bool redirected = restore();
    if (replay && redirected) {
      std::rewind(held_);
      char buffer[4096];
      size_t got = 0;
      while ((got = std::fread(buffer, 1, sizeof buffer, held_)) > 0) {
        std::fwrite(buffer, 1, got, stderr);
      }
      std::fflush(stderr);
    }
    std::fclose(held_);
    held_ = nullptr;
  }

 private:
  bool restore() {
    const bool redirected = saved_ >= 0 && dup2(saved_, 2) >= 0;
    if (saved_ >= 0) {
      close(saved_);
      saved_ = -1;
    }
    return redirected;
  }
  int saved_ = -1;
  std::FILE* held_ = nullptr;
};

double number(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size() && std::isfinite(value)) {
      return value;
    }
  } catch (const std::logic_error&) {
  }
  throw std::invalid_argument(flag + " must be a number, got '" + text + "'");
}

constexpr const char* kUsage =
    "usage: fastem_deblur PACKAGE IN.png OUT.png|OUT.npy [--kernel-out K.npy|K.png] "
    "[--sigma S (/255)] [--seed N] [--device cpu|cuda] [--quiet]";

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string kernel_out, device = "cpu";
  std::optional<double> sigma;
  uint64_t seed = 0;
  bool quiet = false;
  try {
    for (int a = 1; a < argc; ++a) {
      const std::string arg = argv[a];
      const auto value = [&]() -> std::string {
        if (a + 1 >= argc) {
          throw std::invalid_argument(arg + " needs a value");
        }
        return argv[++a];
      };
      if (arg == "--kernel-out") {
        kernel_out = value();
      } else if (arg == "--sigma") {
        sigma = number(arg, value()) / 255.0;
      } else if (arg == "--seed") {
        const double given = number(arg, value());
        if (given < 0 || given != std::floor(given) || given > 9.0e15) {
          throw std::invalid_argument("--seed must be a non-negative integer");
        }
        seed = static_cast<uint64_t>(given);
      } else if (arg == "--device") {
        device = value();
      } else if (arg == "--quiet") {
        quiet = true;
      } else if (arg.rfind("--", 0) == 0) {
        throw std::invalid_argument("unknown option " + arg);
      } else {
        positional.push_back(arg);
      }
    }
    if (positional.size() != 3) {
      throw std::invalid_argument(kUsage);
    }
    const std::string& output = positional[2];
    encode(output, at::zeros({1, 1, 1}), 8); // the output's format, checked early
    if (!kernel_out.empty()) {
      encode(kernel_out, at::zeros({1, 1, 1}), 16);
    }
    const Image photo = read_png(positional[1]);
    fastem::Deblurrer deblurrer(positional[0], device);
    deblurrer.set_observation(photo.pixels, sigma);
    std::signal(SIGINT, on_interrupt);
    if (!quiet) { // from here Ctrl-C cancels the run (tests/test_aot_cpp.py waits for it)
      std::fprintf(stderr, "running %lld steps (%lld restarts; Ctrl-C cancels)\n",
                   static_cast<long long>(deblurrer.steps() * deblurrer.restarts()),
                   static_cast<long long>(deblurrer.restarts()));
      std::fflush(stderr);
    }
    HeldStderr held;
    const int terminal = held.terminal();
    const fastem::Result result = deblurrer.run(
        seed,
        [quiet, terminal](int64_t done, int64_t total) {
          if (!quiet) {
            dprintf(terminal, "\rstep %lld/%lld%s", static_cast<long long>(done),
                    static_cast<long long>(total), done == total ? "\n" : "");
          }
        },
        &cancel_requested);
    held.release(/*replay=*/true);
    std::vector<std::pair<std::string, std::vector<unsigned char>>> files;
    files.emplace_back(output, encode(output, result.image, photo.bits));
    if (!kernel_out.empty()) {
      const at::Tensor peak_scaled = (result.kernel / result.kernel.max()).unsqueeze(0);
      files.emplace_back(
          kernel_out,
          ends_with(kernel_out, ".npy") ? encode_npy(result.kernel)
                                        : encode_png(peak_scaled, 16));
    }
    commit(files);
    if (!result.diverged.empty()) { // as Python's run(), which warns
      std::fprintf(stderr,
                   "fastem_deblur: warning: %zu of %lld restarts diverged and "
                   "were left out\n",
                   result.diverged.size(),
                   static_cast<long long>(deblurrer.restarts()));
    }
    std::printf(
        "%s: sigma %.4f/255%s, %lld restarts of %lld steps (restart %lld kept) in %.2f s\n",
        output.c_str(),
        result.sigma * 255.0,
        result.sigma_estimated ? " (estimated)" : "",
        static_cast<long long>(deblurrer.restarts()),
        static_cast<long long>(deblurrer.steps()),
        static_cast<long long>(result.restart + 1),
        result.seconds);
  } catch (const fastem::Cancelled& err) {
    std::fprintf(stderr, "\nfastem_deblur: %s: no output was written\n", err.what());
    return 130;
  } catch (const std::exception& err) {
    std::fprintf(stderr, "fastem_deblur: error: %s\n", err.what());
    return 2;
  }
  return 0;
}
