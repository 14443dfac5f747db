"""Benchmarks for fid.py: Frechet distance speed/accuracy at 2048 dims, and pixel-FD on the analytic model.

  python bench/bench_fid.py fd                        # ours vs scipy.linalg.sqrtm at 2048 dims
  python bench/bench_fid.py pixel --num=10000          # sampling floor and pixel-FD vs NFE (Euler)
Results are printed as markdown table rows for docs/fid.md.
"""
import os
import sys
import time
import warnings

import click
import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402


def fd_sqrtm(mu1, s1, mu2, s2):
    """The classical route (EDM, pytorch-fid): scipy.linalg.sqrtm of S1 S2."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def random_stats(rng, d, n):
    """Statistics of n samples of a random d-dim Gaussian with a decaying spectrum (like Inception features)."""
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 1.0 / (1 + np.arange(d)) ** 0.7
    x = (rng.standard_normal((n, d)) * scales) @ basis.T + 0.1 * rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


@click.group()
def main():
    pass


@main.command()
@click.option('--dim', type=int, default=2048, show_default=True)
@click.option('--repeats', type=int, default=3, show_default=True)
def fd(dim, repeats):
    """Frechet distance: ours vs sqrtm at `dim` dimensions (full rank, and rank-deficient)."""
    rng = np.random.default_rng(0)
    print(f'| covariances | ours (s) | sqrtm (s) | speed-up | relative difference |')
    print(f'| --- | --- | --- | --- | --- |')
    for label, n in [(f'full rank (n = {4 * dim})', 4 * dim), (f'rank-deficient (n = {dim // 2})', dim // 2)]:
        mu1, s1 = random_stats(rng, dim, n)
        mu2, s2 = random_stats(rng, dim, n)
        t_ours = []
        for _ in range(repeats):
            t = time.perf_counter()
            ours = fid.frechet_distance(mu1, s1, mu2, s2)
            t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = fd_sqrtm(mu1, s1, mu2, s2)
        t_ref = time.perf_counter() - t
        print(f'| {label} | {min(t_ours):.2f} | {t_ref:.2f} | {t_ref / min(t_ours):.0f}x | '
              f'{abs(ours - ref) / abs(ref):.1e} |')


def euler_sample(net, latents, num_steps, rho=7.0):
    """Plain Euler on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, EDM's rho-schedule,
    last step to sigma = 0; NFE = num_steps - 1 + 1 (the final step is D itself)."""
    s_min, s_max = net.sigma_min, net.sigma_max
    i = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (s_max ** (1 / rho) + i / (num_steps - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = net(x, s)
        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
    return x


@main.command()
@click.option('--num', type=int, default=10000, show_default=True, help='Samples per set')
@click.option('--steps', type=str, default='3,5,9,17,33,65', show_default=True, help='Euler time points')
@click.option('--preset', type=str, default='gmm_image', show_default=True)
def pixel(num, steps, preset):
    """Pixel-FD of the analytic model: exact samples (the sampling floor) and Euler at falling NFE."""
    from models.analytic import PRESETS
    torch.set_grad_enabled(False)
    net = PRESETS[preset]()
    mu, sigma = fid.pixel_reference_stats(net)
    print(f'| samples | pixel-FD vs exact statistics |')
    print(f'| --- | --- |')
    for seed in (1, 2):
        x = torch.cat([net.sample_data(1000, torch.Generator().manual_seed(seed * 1000 + k)) for k in
                       range((num + 999) // 1000)])[:num]
        print(f'| exact samples, set {seed} | {fid.pixel_fd(x, mu, sigma):.4g} |')
        if seed == 1:
            first = x
    a = fid.feature_stats(fid.PixelDetector(first.shape[1:])(fid.to_uint8(first)))
    b = fid.feature_stats(fid.PixelDetector(x.shape[1:])(fid.to_uint8(x)))
    print(f'| exact set 1 vs exact set 2 | {fid.frechet_distance(*a, *b):.4g} |')
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(num, *net.sample_shape, generator=g, dtype=torch.float64)
    for n in [int(s) for s in steps.split(',')]:
        out = torch.cat([euler_sample(net, latents[i:i + 1000], n) for i in range(0, num, 1000)])
        print(f'| Euler, NFE {n} | {fid.pixel_fd(out, mu, sigma):.4g} |')


if __name__ == '__main__':
    main()
