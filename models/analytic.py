"""Analytic models: Gaussian mixtures whose denoiser and data statistics are exact.

Each component k is N(mu_k, Sigma_k) with Sigma_k = U_k diag(lam_k) U_k^T + s2_k I (U_k orthonormal, rank r).
Noised by sigma, x ~ sum_k w_k N(mu_k, Sigma_k + sigma^2 I), and the exact denoiser is
    D(x; sigma) = sum_k p(k | x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)].
Everything is computed through the rank-r factors, so a 3x32x32 mixture costs O(B K d r) per call.
"""
import math

import numpy as np
import torch

from models.base import Denoiser, pooled_feature


class GaussianMixture(Denoiser):
    def __init__(self, means, bases, eigvals, iso_vars, weights, sample_shape, sigma_min=0.002, sigma_max=80.0,
                 name='gmm'):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        K, d = means.shape
        assert math.prod(sample_shape) == d
        self.register_buffer('means', means)                                         # [K, d]
        self.register_buffer('bases', torch.as_tensor(bases, dtype=torch.float64))   # [K, d, r] orthonormal
        self.register_buffer('eigvals', torch.as_tensor(eigvals, dtype=torch.float64))    # [K, r] >= 0
        self.register_buffer('iso_vars', torch.as_tensor(iso_vars, dtype=torch.float64))  # [K] > 0
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer('log_weights', torch.log(weights / weights.sum()))      # [K]
        # The bases side by side, [d, K r] and [K r, d], and the means' projections: one matrix product per call.
        r = self.bases.shape[2]
        self.register_buffer('bases_cols', self.bases.permute(1, 0, 2).reshape(d, K * r).contiguous())
        self.register_buffer('bases_rows', self.bases.permute(0, 2, 1).reshape(K * r, d).contiguous())
        self.register_buffer('means_proj', torch.einsum('kd,kdr->kr', means, self.bases))     # [K, r]
        self.sample_shape = tuple(sample_shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.name = name

    # -- exact denoiser ------------------------------------------------------------------------------------
    def _loglik(self, x, sigma):
        """Per-component log N(x; mu_k, Sigma_k + sigma^2 I) [B, K] and the projections U_k^T (x - mu_k) [B, K, r].
        x: [B, d], sigma: [B]. Formed in float64 whatever x's dtype: the log-likelihoods are large (~d) and nearly
        equal across components at high sigma (the responsibilities would lose ~1e-3 in float32). Never forms the
        [B, K, d] differences x - mu_k: |x - mu_k|^2 and the projections come from [B, d] x [d, K(r+1)] products."""
        K, d, r = self.bases.shape
        x64 = x.to(torch.float64)
        var = sigma.to(torch.float64)[:, None] ** 2                                  # [B, 1]
        proj = (x64 @ self.bases_cols).reshape(-1, K, r) - self.means_proj          # [B, K, r]
        dist2 = (x64 * x64).sum(1, keepdim=True) - 2 * x64 @ self.means.T + (self.means ** 2).sum(1)   # [B, K]
        iso_tot = self.iso_vars + var                                                 # [B, K]
        sub_tot = self.eigvals + iso_tot[..., None]                                   # [B, K, r]
        maha = dist2 / iso_tot + (proj ** 2 * (1 / sub_tot - 1 / iso_tot[..., None])).sum(-1)
        logdet = torch.log(sub_tot).sum(-1) + (d - r) * torch.log(iso_tot)
        return -0.5 * (maha + logdet + d * math.log(2 * math.pi)), proj, iso_tot, sub_tot

    def denoise(self, x, sigma, cond=None):
        """sum_k p(k | x) [mu_k + g_k (x - mu_k) + U_k G_k U_k^T (x - mu_k)], with g_k = s2_k / (s2_k + sigma^2)
        on the isotropic part and G_k the extra gain along U_k; summed over k before touching d-sized vectors."""
        shape, dt = x.shape, x.dtype
        flat = x.reshape(shape[0], -1)
        loglik, proj, iso_tot, sub_tot = self._loglik(flat, sigma)
        resp = torch.softmax(loglik + self.log_weights, dim=1)                       # [B, K] float64
        iso_gain = self.iso_vars / iso_tot                                            # [B, K]
        sub_gain = (self.eigvals + self.iso_vars[:, None]) / sub_tot - iso_gain[..., None]   # [B, K, r]
        K, d, r = self.bases.shape
        coef = (resp[..., None] * sub_gain * proj).to(dt).reshape(-1, K * r)
        denoised = ((resp * iso_gain).sum(1, keepdim=True).to(dt) * flat + (resp * (1 - iso_gain)).to(dt)
                    @ self.means.to(dt) + coef @ self.bases_rows.to(dt))
        denoised = denoised.reshape(shape)
        return denoised, pooled_feature(denoised) if len(shape) == 4 else denoised.reshape(shape[0], -1)

    # -- exact data statistics and sampling ----------------------------------------------------------------
    def log_density(self, x, sigma=0.0):
        """log p_sigma(x) of the (noised) data distribution, for x of shape [B, *sample_shape]."""
        flat = x.reshape(x.shape[0], -1)
        loglik = self._loglik(flat, torch.full((x.shape[0],), float(sigma), dtype=torch.float64,
                                               device=x.device))[0]
        return torch.logsumexp(loglik + self.log_weights, dim=1).to(x.dtype)

    def data_mean(self):
        w = self.log_weights.exp()
        return w @ self.means                                                  # [d] float64

    def data_covariance(self):
        """Exact covariance of the data distribution, [d, d] float64."""
        w = self.log_weights.exp()
        mean = self.data_mean()
        d = self.means.shape[1]
        cov = torch.zeros(d, d, dtype=torch.float64, device=self.means.device)
        for k in range(len(w)):
            U = self.bases[k]
            comp = (U * self.eigvals[k]) @ U.T + self.iso_vars[k] * torch.eye(d, dtype=torch.float64,
                                                                              device=U.device)
            dm = self.means[k] - mean
            cov += w[k] * (comp + torch.outer(dm, dm))
        return cov

    def sample_data(self, n, generator=None, device='cpu'):
        """n exact samples of the data distribution, [n, *sample_shape] float64."""
        K, d, r = self.bases.shape
        comp = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator)
        z_sub = torch.randn(n, r, dtype=torch.float64, generator=generator)
        z_iso = torch.randn(n, d, dtype=torch.float64, generator=generator)
        U, lam, s2 = self.bases.cpu()[comp], self.eigvals.cpu()[comp], self.iso_vars.cpu()[comp]
        x = self.means.cpu()[comp] + torch.einsum('ndr,nr->nd', U, lam.sqrt() * z_sub) + s2.sqrt()[:, None] * z_iso
        return x.reshape(n, *self.sample_shape).to(device)


# -- the embedded analytic datasets --------------------------------------------------------------------------

def _smooth_fields(rng, count, channels, size, cutoff):
    """Random smooth images: low-frequency Fourier series with a 1/f amplitude falloff, one per count."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    fields = np.zeros((count, channels, size, size))
    for fy in range(cutoff):
        for fx in range(cutoff):
            amp = 1.0 / (1.0 + fy + fx)
            phase = rng.uniform(0, 2 * np.pi, (count, channels, 1, 1))
            coef = rng.normal(0, amp, (count, channels, 1, 1))
            fields += coef * np.cos(2 * np.pi * (fy * yy + fx * xx) / size + phase)
    return fields


def image_mixture(num_components=8, rank=16, size=32, channels=3, seed=2024, sigma_min=0.002, sigma_max=80.0):
    """Image-shaped mixture: smooth, image-like component means in [-1, 1] and low-rank-plus-isotropic
    covariances whose principal directions are smooth fields too (so trajectories curve as image models' do)."""
    rng = np.random.default_rng(seed)
    d = channels * size * size
    means = _smooth_fields(rng, num_components, channels, size, cutoff=4)
    means = 0.8 * means / np.abs(means).reshape(num_components, -1).max(1)[:, None, None, None]
    bases, eigvals = [], []
    for _ in range(num_components):
        dirs = _smooth_fields(rng, rank, channels, size, cutoff=6).reshape(rank, d).T     # [d, r]
        q, _ = np.linalg.qr(dirs)
        bases.append(q)
        eigvals.append(4.0 * 0.6 ** np.arange(rank) * rng.uniform(0.5, 1.5, rank))
    iso_vars = rng.uniform(0.5, 1.5, num_components) * 1e-3
    weights = rng.dirichlet(np.full(num_components, 5.0))
    return GaussianMixture(means.reshape(num_components, d), np.stack(bases), np.stack(eigvals), iso_vars, weights,
                           (channels, size, size), sigma_min, sigma_max, name='gmm_image')


def planar_mixture(sigma_min=0.002, sigma_max=80.0):
    """2-D mixture of six anisotropic Gaussians on a ring (for pictures of trajectories)."""
    K = 6
    angles = 2 * np.pi * np.arange(K) / K
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    bases = np.stack([[[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]] for a in angles])   # [K, 2, 2]
    eigvals = np.tile([0.15, 0.0], (K, 1))       # elongated along the radial direction
    iso_vars = np.full(K, 0.01)
    weights = np.linspace(1.0, 2.0, K)
    return GaussianMixture(means, bases, eigvals, iso_vars, weights, (2, 1, 1), sigma_min, sigma_max,
                           name='gmm_2d')


PRESETS = {'gmm_image': image_mixture, 'gmm_2d': planar_mixture}


def load(model_path=None, preset='gmm_image', **options):
    """Family loader for 'analytic': the model is built from code, so model_path names the preset if given."""
    name = model_path or preset
    if name not in PRESETS:
        from models import ModelError
        raise ModelError(f"unknown analytic model {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](**options)
