"""Solvers: counted NFE equals the formula; bad options fail clearly; ipndm_v is exact for polynomial slopes on
non-uniform grids; everything is differentiable; dtype/device follow the latents."""
import math

import pytest
import torch

import solvers
from solvers.noise import ImageNoise
from models.base import Denoiser
from solvers.classical import ipndm_v, ipndm_v_weights


@pytest.mark.parametrize('name', sorted(solvers.SOLVERS))
@pytest.mark.parametrize('afs,denoise_to_zero', [(False, False), (True, False), (False, True)])
def test_counted_nfe_matches_formula(gmm_image, name, afs, denoise_to_zero):
    latents = torch.randn(3, 3, 32, 32)
    extra = dict(noise=ImageNoise(range(3))) if solvers.SOLVERS[name].stochastic else {}
    if extra and afs or name == 'sed_ref' and denoise_to_zero:
        # AFS is an ODE-solver option; sed_ref ends with its own final step. Both are refused, not ignored.
        with pytest.raises(ValueError, match='drop'):
            solvers.sample(gmm_image, latents, name, 3, afs=afs, denoise_to_zero=denoise_to_zero, **extra)
        return
    for num_steps in (3, 6):
        with solvers.count_calls(gmm_image) as counter:
            x = solvers.sample(gmm_image, latents, name, num_steps, afs=afs, denoise_to_zero=denoise_to_zero,
                               **extra)
        assert x.shape == latents.shape and torch.isfinite(x).all()
        assert counter.nfe(3) == solvers.nfe_formula(name, num_steps, afs=afs, denoise_to_zero=denoise_to_zero)


@pytest.mark.parametrize('name', ['ipndm', 'ipndm_v', 'deis', 'dpmpp', 'unipc'])
def test_max_order_one_is_euler_like(gmm_image, name):
    latents = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x = solvers.sample(gmm_image, latents, name, 5, max_order=1)
    ref = solvers.sample(gmm_image, latents, 'euler', 5)
    if name in ('dpmpp', 'unipc'):
        # First order in the exponential-integrator form is DDIM, which equals Euler in sigma.
        ref = solvers.sample(gmm_image, latents, 'euler', 5)
    if name == 'unipc':
        assert torch.isfinite(x).all()      # UniPC-1 adds its corrector: not plain DDIM
    else:
        assert torch.allclose(x, ref, atol=1e-10)


@pytest.mark.parametrize('kwargs,match', [
    (dict(solver='rk45'), 'unknown solver'),
    (dict(schedule_type='cosine'), 'unknown schedule_type'),
    (dict(num_steps=1), 'num_steps'),
    (dict(solver='dpmpp', max_order=4), 'max_order=4 is out of range for solver .dpmpp.; allowed: 1-3'),
    (dict(solver='ipndm', max_order=0), 'allowed: 1-4'),
    (dict(solver='heun', max_order=2), 'max_order'),
    (dict(sigma_min=5.0, sigma_max=1.0), 'sigma_min'),
    (dict(solver='unipc', variant='bh3'), 'variant'),
])
def test_bad_options(gmm_image, kwargs, match):
    opts = dict(solver='euler', num_steps=5)
    opts.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solvers.sample(gmm_image, torch.randn(1, 3, 32, 32), **opts)


class PolynomialSlope(Denoiser):
    """A synthetic 'denoiser' whose ODE slope is a given polynomial of sigma: D = x - sigma p(sigma)."""
    sample_shape = (1, 1, 1)

    def __init__(self, coeffs):
        super().__init__()
        self.coeffs = coeffs

    def slope(self, sigma):
        return sum(c * sigma ** k for k, c in enumerate(self.coeffs))

    def denoise(self, x, sigma, cond=None):
        return x - sigma.reshape(-1, 1, 1, 1) * self.slope(sigma).reshape(-1, 1, 1, 1), None

    def integral(self, a, b):
        return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(self.coeffs))


def reference_ipndm_v_coded(h, h1, h2, order):
    """The reference implementation's order-3 weights (operator-precedence slip), for contrast."""
    T = 0.5 * (1 - h ** 2 / (3 * h1 * (h1 + h2)))
    return [1 + h / (2 * h1) + T, -h / (2 * h1) - (1 + h1 / h2) * T, T * h1 / h2]


@pytest.mark.parametrize('order', [1, 2, 3, 4])
def test_ipndm_v_exact_for_polynomial_slopes(order):
    torch.manual_seed(order)
    # A deliberately non-uniform grid: the EDM rho=7 grid with random jitter.
    sigmas = solvers.get_schedule(12, 0.002, 80.0, 'polynomial', 7.0)
    jitter = 1 + 0.2 * torch.rand(10, dtype=torch.float64)
    sigmas[1:-1] = sigmas[1:-1] * jitter
    sigmas, _ = torch.sort(sigmas, descending=True)
    coeffs = [float(c) for c in torch.randn(order, dtype=torch.float64)]    # degree order - 1
    net = PolynomialSlope(coeffs)
    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    _, traj = ipndm_v(net, x0, sigmas, max_order=order, return_trajectory=True)
    for i in range(order - 1, len(sigmas) - 1):         # steps past the warm start run at full order
        step = (traj[i + 1] - traj[i]).item()
        exact = net.integral(sigmas[i], sigmas[i + 1]).item()
        assert abs(step - exact) <= 1e-9 * max(1.0, abs(exact)), (order, i, step, exact)


def test_ipndm_v_weights_differ_from_reference_bug():
    # On a non-uniform grid the reference's order-3 weights do not integrate sigma^2 exactly; ours do.
    nodes = [torch.tensor(v, dtype=torch.float64) for v in (5.0, 9.0, 20.0)]
    t_next = torch.tensor(2.0, dtype=torch.float64)
    h, h1, h2 = t_next - nodes[0], nodes[0] - nodes[1], nodes[1] - nodes[2]
    exact = (t_next ** 3 - nodes[0] ** 3) / 3
    ours = h * sum(w * n ** 2 for w, n in zip(ipndm_v_weights(nodes, t_next), nodes))
    coded = h * sum(w * n ** 2 for w, n in zip(reference_ipndm_v_coded(h, h1, h2, 3), nodes))
    assert abs(ours - exact) < 1e-10
    assert abs(coded - exact) > 1.0


@pytest.mark.parametrize('name', sorted(solvers.SOLVERS))
def test_differentiable_in_latents_and_sigmas(gmm_image, name):
    latents = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    sigmas = solvers.get_schedule(5, 0.002, 80.0).requires_grad_(True)
    extra = dict(noise=ImageNoise(range(2))) if solvers.SOLVERS[name].stochastic else {}
    x = solvers.sample(gmm_image, latents, name, sigmas=sigmas, **extra)
    grad_l, grad_s = torch.autograd.grad(x.square().sum(), [latents, sigmas])
    assert torch.isfinite(grad_l).all() and grad_l.abs().sum() > 0
    # sed_ref, as the reference does, rebuilds its grid from the end points and rho: only they carry a gradient.
    interior = slice(1, -1) if name != 'sed_ref' else slice(None)
    assert torch.isfinite(grad_s).all() and grad_s[interior].abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_dtype_follows_latents(gmm_image, dtype):
    x = solvers.sample(gmm_image, torch.randn(2, 3, 32, 32, dtype=dtype), 'dpmpp', 6)
    assert x.dtype == dtype


def test_trajectory(gmm_image):
    latents = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x, traj = solvers.sample(gmm_image, latents, 'heun', 6, return_trajectory=True)
    assert traj.shape == (6, 2, 3, 32, 32)
    assert torch.equal(traj[-1], x) and torch.allclose(traj[0], latents * 80.0)
    x, traj = solvers.sample(gmm_image, latents, 'heun', 6, return_trajectory=True, denoise_to_zero=True)
    assert traj.shape == (7, 2, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (checked on the GPU machine)')
def test_cuda(gmm_image):
    net = gmm_image.to('cuda')
    x = solvers.sample(net, torch.randn(2, 3, 32, 32, device='cuda'), 'unipc', 6)
    assert x.device.type == 'cuda'
