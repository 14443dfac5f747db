"""The analytic mixtures: the denoiser is exactly E[x0 | x_sigma] (Tweedie: D = x + sigma^2 grad log p_sigma),
stable in float32 and float64 over sigma in [1e-3, 1e3]; exact statistics match samples."""
import math

import pytest
import torch


@pytest.mark.parametrize('sigma', [1e-3, 0.05, 1.0, 20.0, 1e3])
def test_denoiser_is_tweedie(gmm_image, sigma):
    # Tweedie's formula from the exact log-density (an independent route through autograd).
    g = torch.Generator().manual_seed(0)
    x = (gmm_image.sample_data(3, g) + sigma * torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    grad, = torch.autograd.grad(gmm_image.log_density(x, sigma).sum(), x)
    tweedie = x + sigma ** 2 * grad
    denoised = gmm_image(x.detach(), sigma)
    scale = denoised.abs().max()
    assert ((denoised - tweedie).abs().max() / scale) < 1e-6 * max(1.0, sigma ** 2)


@pytest.mark.parametrize('sigma', [1e-3, 0.05, 1.0, 20.0, 80.0, 1e3])
def test_float32_matches_float64(gmm_image, sigma):
    g = torch.Generator().manual_seed(1)
    x = gmm_image.sample_data(4, g) + sigma * torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    d64 = gmm_image(x, sigma)
    d32 = gmm_image(x.float(), sigma)
    assert torch.isfinite(d32).all()
    assert (d32.double() - d64).abs().max() < 1e-5


def test_planar_mixture_tweedie(gmm_2d):
    x = torch.randn(64, 2, 1, 1, dtype=torch.float64) * 3
    for sigma in [1e-3, 0.3, 5.0]:
        xr = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(gmm_2d.log_density(xr, sigma).sum(), xr)
        assert torch.allclose(gmm_2d(x, sigma), x + sigma ** 2 * grad, atol=1e-9)


def test_exact_statistics_match_samples(gmm_image):
    g = torch.Generator().manual_seed(2)
    n = 20000
    samples = gmm_image.sample_data(n, g).reshape(n, -1)
    mean, cov = gmm_image.data_mean(), gmm_image.data_covariance()
    # Standard error of the sample mean per pixel is sqrt(var / n).
    se = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mean).abs() / se).max() < 5.5
    emp_var = samples.var(0)
    rel = (emp_var - cov.diagonal()).abs() / cov.diagonal()
    assert rel.max() < 6 * math.sqrt(2 / n) * 3   # variance estimate of heavy-ish mixture marginals
    # A random projection's variance matches the exact covariance.
    v = torch.randn(samples.shape[1], generator=g, dtype=torch.float64)
    assert abs((samples @ v).var() / (v @ cov @ v) - 1) < 0.05


def test_log_density_normalised(gmm_2d):
    # Integrate the 2-D density on a grid: it must integrate to 1.
    lin = torch.linspace(-6, 6, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing='ij')
    pts = torch.stack([xx, yy], -1).reshape(-1, 2, 1, 1)
    dens = gmm_2d.log_density(pts).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(dens.item() - 1) < 1e-3


def test_means_look_like_images(gmm_image):
    means = gmm_image.means.reshape(-1, 3, 32, 32)
    assert means.abs().max() <= 1.0
    # Smooth: neighbouring pixels are strongly correlated, unlike white noise.
    a, b = means[..., :, :-1].reshape(-1), means[..., :, 1:].reshape(-1)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
