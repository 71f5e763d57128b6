import torch
from dense import circular_convolve, operator_matrix

from fastem_ext.guidance import dps_guidance, pigdm_guidance, pigdm_vector
from fastem_ext.physics import blur_spectrum, psf2otf

HW, C = (6, 5), 3


def _setup(seed=0, n=2, size=3):
    g = torch.Generator().manual_seed(seed)
    kernel = torch.rand(size, size, generator=g, dtype=torch.float64) + 0.05
    kernel = kernel / kernel.sum()
    x0 = torch.rand(n, C, *HW, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(C, *HW, generator=g, dtype=torch.float64) * 2 - 1
    dense_h = operator_matrix(lambda img: circular_convolve(img, kernel), (C, *HW))
    return kernel, x0, y, dense_h


def test_pigdm_vector_equals_dense_formula():
    kernel, x0, y, h = _setup()
    r2, sigma = 0.37, 0.08
    otf = psf2otf(kernel, HW)
    v = pigdm_vector(torch.fft.rfft2(y) - otf * torch.fft.rfft2(x0), otf, r2, sigma, HW)
    cov = r2 * h @ h.T + sigma**2 * torch.eye(h.shape[0], dtype=torch.float64)
    for i in range(x0.shape[0]):
        residual = y.reshape(-1) - h @ x0[i].reshape(-1)
        expected = h.T @ torch.linalg.solve(cov, residual)
        torch.testing.assert_close(v[i].reshape(-1), expected, rtol=1e-10, atol=1e-12)


def test_pigdm_guidance_is_the_gradient_of_the_gaussian_log_likelihood():
    """With a linear 'network' x̂0 = A x_t, g = ∇_{x_t} log N(y; H x̂0, r²HHᵀ + σ²I)."""
    kernel, _, y, h = _setup(seed=1, n=1)
    g = torch.Generator().manual_seed(2)
    n_pix = h.shape[0]
    a = torch.eye(n_pix, dtype=torch.float64) + 0.1 * torch.randn(n_pix, n_pix, generator=g,
                                                                  dtype=torch.float64)
    x_t = torch.randn(1, C, *HW, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = (a @ x_t.reshape(-1)).reshape(1, C, *HW)
    r2, sigma = 0.2, 0.1
    otf = psf2otf(kernel, HW)
    residual = torch.fft.rfft2(y) - otf * torch.fft.rfft2(x0.detach())
    grad = pigdm_guidance(x_t, x0, residual, otf, r2, sigma)

    x_t2 = x_t.detach().clone().requires_grad_(True)
    residual = y.reshape(-1) - h @ (a @ x_t2.reshape(-1))
    cov = r2 * h @ h.T + sigma**2 * torch.eye(n_pix, dtype=torch.float64)
    log_lik = -0.5 * residual @ torch.linalg.solve(cov, residual)
    (expected,) = torch.autograd.grad(log_lik, x_t2)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_dps_gradient_is_per_particle_norm():
    kernel, _, y, h = _setup(seed=3, n=3)
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(3, C, *HW, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.tanh(x_t) * 0.9  # any differentiable map, applied per particle
    grad = dps_guidance(x_t, y - blur_spectrum(x0, psf2otf(kernel, HW)))
    for i in range(3):
        xi = x_t[i].detach().clone().requires_grad_(True)
        norm = (y.reshape(-1) - h @ (torch.tanh(xi) * 0.9).reshape(-1)).norm()
        (expected,) = torch.autograd.grad(norm, xi)
        torch.testing.assert_close(grad[i], -expected, rtol=1e-9, atol=1e-12)
