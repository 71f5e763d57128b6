// The fastem operator library: every schema lives here, implementations in cpu/
// and cuda/.
//
// Conventions shared by all ops (see fastem_ext/ops/*.py for the pure-torch
// specification):
//   * images and kernels are float32, spectra are complex64 rfft2 half spectra
//   [.., H, W/2+1];
//   * per-step scalars are read on the device from a 1-D table at a 0-d int64
//   `step` index, so
//     the ops can be captured once in a CUDA graph and replayed for every
//     diffusion step.
#include <torch/library.h>

namespace fastem {

bool has_cuda() {
#ifdef FASTEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(fastem, m) {
  // Fake (meta) kernels are registered from Python; this tells torch.compile
  // where they live.
  m.set_python_module("fastem_ext.ops._backend");
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("spectral_sums(Tensor spec_y, Tensor spec_x) -> (Tensor, Tensor)");
  m.def(
      "wiener_z(Tensor cross, Tensor energy, Tensor otf, Tensor shift, Tensor step, "
      "float coupling) -> Tensor");
  m.def(
      "kernel_project(Tensor z, Tensor fallback, float threshold, bool recenter) "
      "-> (Tensor, Tensor)");
  m.def(
      "pigdm_filter(Tensor spec, Tensor otf, Tensor? spec_y, Tensor r2, Tensor step, "
      "float sigma) -> Tensor");
  m.def(
      "predict_x0(Tensor x_t, Tensor eps, Tensor coefs, Tensor step) -> Tensor");
  m.def(
      "ddpm_update(Tensor x_t, Tensor eps, Tensor coefs, Tensor step, Tensor noise, "
      "Tensor? grad, float scale) -> (Tensor, Tensor)");
  m.def(
      "group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? scale, "
      "Tensor? shift, int groups, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, "
      "Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups) -> Tensor");
}

} // namespace fastem
