"""Analytic models: Gaussian mixtures whose denoiser and data statistics are exact.

Each component k is N(mu_k, Sigma_k) with Sigma_k = U_k diag(lam_k) U_k^T + s2_k I (U_k orthonormal, rank r).
Noised by sigma, x ~ sum_k w_k N(mu_k, Sigma_k + sigma^2 I), and the exact denoiser is
    D(x; sigma) = sum_k p(k | x) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)].
Everything is computed through the rank-r factors, so a 3x32x32 mixture costs O(B K d r) per call.
"""
import math

import numpy as np
import torch

from models.base import Denoiser, broadcast_sigma, pooled_feature


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
        flat = x.reshape(x.shape[0], -1)
        denoised = self._posterior_mean(flat, sigma, self.log_weights).reshape(x.shape)
        return denoised, self._feature(denoised)

    def _posterior_mean(self, flat, sigma, log_prior):
        """sum_k p(k | x) [mu_k + g_k (x - mu_k) + U_k G_k U_k^T (x - mu_k)] for flat x [B, d] and component log
        priors [K] or [B, K], with g_k = s2_k / (s2_k + sigma^2) on the isotropic part and G_k the extra gain
        along U_k; summed over k before touching d-sized vectors."""
        dt = flat.dtype
        loglik, proj, iso_tot, sub_tot = self._loglik(flat, sigma)
        resp = torch.softmax(loglik + log_prior, dim=1)                              # [B, K] float64
        iso_gain = self.iso_vars / iso_tot                                            # [B, K]
        sub_gain = (self.eigvals + self.iso_vars[:, None]) / sub_tot - iso_gain[..., None]   # [B, K, r]
        K, d, r = self.bases.shape
        coef = (resp[..., None] * sub_gain * proj).to(dt).reshape(-1, K * r)
        return ((resp * iso_gain).sum(1, keepdim=True).to(dt) * flat + (resp * (1 - iso_gain)).to(dt)
                @ self.means.to(dt) + coef @ self.bases_rows.to(dt))

    def _feature(self, denoised):
        return pooled_feature(denoised) if denoised.ndim == 4 else denoised.reshape(denoised.shape[0], -1)

    # -- exact data statistics and sampling (label: one class of a conditional mixture; None: all data) ------
    def _component_log_prior(self, cond, batch):
        """log prior of each component per sample, [B, K]."""
        return self.log_weights.expand(batch, -1)

    def _class_weights(self, label):
        """Component weights of the data (label None) or of one class, [K]."""
        if label is not None:
            raise ValueError(f"{self.name} is unconditional: it has no class {label}")
        return self.log_weights.exp()

    def log_density(self, x, sigma=0.0, cond=None):
        """log p_sigma(x) of the (noised) data distribution, or log p_sigma(x | class weights cond), for x of
        shape [B, *sample_shape]."""
        flat = x.reshape(x.shape[0], -1)
        loglik = self._loglik(flat, torch.full((x.shape[0],), float(sigma), dtype=torch.float64,
                                               device=x.device))[0]
        return torch.logsumexp(loglik + self._component_log_prior(cond, x.shape[0]), dim=1).to(x.dtype)

    def data_mean(self, label=None):
        """Exact mean of the data distribution (or of one class), [d] float64."""
        return self._class_weights(label) @ self.means

    def data_covariance(self, label=None):
        """Exact covariance of the data distribution (or of one class), [d, d] float64."""
        return self._mixture_covariance(self._class_weights(label))

    def _mixture_covariance(self, w):
        mean = w @ self.means
        d = self.means.shape[1]
        cov = torch.zeros(d, d, dtype=torch.float64, device=self.means.device)
        for k in torch.nonzero(w).reshape(-1).tolist():
            U = self.bases[k]
            comp = (U * self.eigvals[k]) @ U.T + self.iso_vars[k] * torch.eye(d, dtype=torch.float64,
                                                                              device=U.device)
            dm = self.means[k] - mean
            cov += w[k] * (comp + torch.outer(dm, dm))
        return cov

    def sample_data(self, n, generator=None, device='cpu', label=None):
        """n exact samples of the data distribution (or of one class), [n, *sample_shape] float64."""
        return self._sample_components(self._class_weights(label), n, generator, device)

    def _sample_components(self, w, n, generator, device):
        K, d, r = self.bases.shape
        comp = torch.multinomial(w.cpu(), n, replacement=True, generator=generator)
        z_sub = torch.randn(n, r, dtype=torch.float64, generator=generator)
        z_iso = torch.randn(n, d, dtype=torch.float64, generator=generator)
        U, lam, s2 = self.bases.cpu()[comp], self.eigvals.cpu()[comp], self.iso_vars.cpu()[comp]
        x = self.means.cpu()[comp] + torch.einsum('ndr,nr->nd', U, lam.sqrt() * z_sub) + s2.sqrt()[:, None] * z_iso
        return x.reshape(n, *self.sample_shape).to(device)


class ConditionalMixture(GaussianMixture):
    """A class-conditional Gaussian mixture: component k belongs to class labels[k]. Exact for every condition:

    - cond: [B, L] class weights per sample (one-hot for a class; None: the unconditional model). The component
      prior becomes w_k / W_{y_k} * cond[y_k] (W_y the class's total weight), so a one-hot row gives
      p(x | y) and the class prior W gives p(x).
    - guidance_type 'cfg': D_u + w (D_c - D_u), one batched call on [x; x] as for real models; w = 1 is the
      conditional model, w = 0 the unconditional one.
    - guidance_type 'cg': D_c + w sigma^2 grad_x log p(y | x_sigma), the gradient of the exact class posterior
      taken by autograd (as a noise-aware classifier's would be).
    - guidance_type 'uncond' (or None without labels): the unconditional model.
    """
    GUIDANCE_TYPES = (None, 'cfg', 'cg', 'uncond')

    def __init__(self, means, bases, eigvals, iso_vars, weights, labels, sample_shape, guidance_type=None,
                 guidance_rate=1.0, class_names=None, **kwargs):
        super().__init__(means, bases, eigvals, iso_vars, weights, sample_shape, **kwargs)
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.label_dim = int(labels.max()) + 1
        self.register_buffer('labels', labels)                                          # [K]
        self.register_buffer('class_onehot', torch.nn.functional.one_hot(labels, self.label_dim).to(torch.float64))
        self.register_buffer('log_class_weights', torch.logsumexp(                     # [L]
            self.log_weights[:, None] + torch.log(self.class_onehot), dim=0))
        if guidance_type in ('none', 'None', ''):
            guidance_type = None
        if guidance_type not in self.GUIDANCE_TYPES:
            from models import ModelError
            raise ModelError(f"guidance_type={guidance_type!r} is not supported by {self.name}; use cfg, cg, "
                             "uncond or none")
        self.guidance_type = guidance_type
        self.guidance_rate = 1.0 if guidance_rate is None else float(guidance_rate)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.label_dim)]

    @property
    def rows_per_eval(self):
        return 2 if self.guidance_type == 'cfg' and self.guidance_rate != 1 else 1

    @property
    def forward_ad(self):
        # classifier guidance calls torch.autograd.grad inside forward, which forward-mode AD cannot go through
        return not (self.guidance_type == 'cg' and self.guidance_rate != 0)

    def class_prior(self):
        """p(y), [L] float64."""
        return self.log_class_weights.exp()

    def _component_log_prior(self, cond, batch):
        """log prior of each component per sample [B, K] for class weights cond [B, L] (None: unconditional)."""
        if cond is None:
            return self.log_weights.expand(batch, -1)
        cond = torch.as_tensor(cond, device=self.means.device).to(torch.float64).reshape(batch, self.label_dim)
        within = self.log_weights - self.log_class_weights[self.labels]               # log w_k / W_{y_k}
        return within + torch.log(cond @ self.class_onehot.T)

    def _denoise_given(self, x, sigma, cond):
        flat = x.reshape(x.shape[0], -1)
        return self._posterior_mean(flat, sigma, self._component_log_prior(cond, x.shape[0])).reshape(x.shape)

    def denoise(self, x, sigma, cond=None):
        kind = self.guidance_type if cond is not None else 'uncond'
        w = self.guidance_rate
        if kind == 'cfg' and w != 1:
            B = x.shape[0]
            prior = self.class_prior().to(x.device).expand(B, -1)
            both = self._denoise_given(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([
                torch.as_tensor(cond, device=x.device).to(torch.float64).reshape(B, -1), prior]))
            d_c, d_u = both[:B], both[B:]
            denoised = d_u + w * (d_c - d_u)
        elif kind == 'uncond':
            denoised = self._denoise_given(x, sigma, None)
        else:
            denoised = self._denoise_given(x, sigma, cond)
            if kind == 'cg' and w != 0:
                denoised = denoised + w * broadcast_sigma(sigma, x).reshape(-1, *[1] * (x.ndim - 1)) ** 2 * \
                    self.class_log_posterior_grad(x, sigma, cond)
        return denoised, self._feature(denoised)

    # -- exact class posterior, log-density, statistics and samples per class ----------------------------------
    def class_log_posterior(self, x, sigma=0.0):
        """log p(y | x_sigma) for every class, [B, L] float64: the exact (noise-aware) classifier."""
        flat = x.reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        joint = self._loglik(flat, sigma)[0] + self.log_weights                        # [B, K]
        per_class = torch.logsumexp(joint[:, :, None] + torch.log(self.class_onehot), dim=1)   # [B, L]
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def class_log_posterior_grad(self, x, sigma, cond):
        """grad_x sum_y cond[y] log p(y | x_sigma), by autograd (differentiable itself when x requires grad)."""
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            cond64 = torch.as_tensor(cond, device=x.device).to(torch.float64).reshape(x.shape[0], -1)
            objective = (self.class_log_posterior(xr, sigma) * cond64).sum()
            grad, = torch.autograd.grad(objective, xr, create_graph=x.requires_grad)
        return grad.to(x.dtype)

    def _class_weights(self, label):
        if label is None:
            return self.log_weights.exp()
        return self.log_weights.exp() * self.class_onehot[:, label] / self.log_class_weights[label].exp()

    def sample_labels(self, generator, device):
        """One label per sample from its own generator, drawn from the class prior."""
        idx = torch.multinomial(self.class_prior().to(device), 1, generator=generator)
        return torch.nn.functional.one_hot(idx, self.label_dim)[0].float()


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


def _glyph(text, size, stroke, dx, dy, res, supersample=4):
    """A white-on-black rendering of `text` with Pillow's built-in font, centred and shifted by (dx, dy) pixels,
    antialiased by supersampling; [res, res] float64 in [0, 1]."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont
    big = res * supersample
    image = PIL.Image.new('L', (big, big), 0)
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default(size=size * supersample)
    box = draw.textbbox((0, 0), text, font=font, stroke_width=stroke * supersample)
    x = (big - (box[2] - box[0])) / 2 - box[0] + dx * supersample
    y = (big - (box[3] - box[1])) / 2 - box[1] + dy * supersample
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke * supersample, stroke_fill=255)
    return np.asarray(image.resize((res, res), PIL.Image.LANCZOS), dtype=np.float64) / 255


def digit_mixture(components_per_class=4, rank=8, size=32, seed=7, sigma_min=0.002, sigma_max=80.0,
                  guidance_type=None, guidance_rate=1.0):
    """Class-conditional 3 x size x size mixture of the digits 0-9 (ten equally likely classes). Each class has
    components_per_class styles (glyph size, stroke width, position, glyph and background colour), drawn with
    Pillow's built-in font. Each component's covariance spans, besides an isotropic floor, the directions a
    person would call the same digit: sub-pixel shifts (the mean's spatial derivatives, std ~0.7 px), glyph
    brightness, a background tint, and smooth colour fields."""
    rng = np.random.default_rng(seed)
    d = 3 * size * size
    means, bases, eigvals, labels = [], [], [], []
    for digit in range(10):
        for _ in range(components_per_class):
            glyph_px = rng.uniform(0.62, 0.82) * size
            stroke = int(rng.integers(0, 2))
            dx, dy = rng.uniform(-0.12, 0.12, 2) * size
            mask = _glyph(str(digit), round(glyph_px), stroke, dx, dy, size)
            hue = rng.uniform(0, 2 * np.pi)
            fg = 0.55 + 0.4 * np.cos(hue + np.array([0, 2.1, 4.2]))             # a bright colour, in [0.15, 0.95]
            bg = -0.85 + 0.12 * rng.uniform(-1, 1, 3)                            # a dark tint
            mean = bg[:, None, None] + mask[None] * (fg - bg)[:, None, None]    # [3, size, size] in [-1, 1]
            gy, gx = np.gradient(mean, axis=(1, 2))
            dirs, stds = [gx, gy], [0.7, 0.7]                                   # sub-pixel shifts
            dirs.append(mask[None] * (fg - bg)[:, None, None]); stds.append(0.12)   # glyph brightness
            dirs.append((1 - mask)[None] * np.ones((3, 1, 1))); stds.append(0.08)   # background brightness
            for f in _smooth_fields(rng, max(rank - len(dirs), 0), 3, size, cutoff=3):
                dirs.append(f / np.sqrt((f ** 2).mean())); stds.append(0.04)     # per-pixel std 0.04
            dirs, stds = dirs[:rank], stds[:rank]
            raw = np.stack([v.reshape(d) for v in dirs], 1)                      # [d, rank]
            q, _ = np.linalg.qr(raw)
            bases.append(q)
            eigvals.append((np.array(stds) * np.linalg.norm(raw, axis=0)) ** 2)
            means.append(mean.reshape(d))
            labels.append(digit)
    K = len(means)
    iso_vars = rng.uniform(0.5, 1.5, K) * 1e-3
    weights = np.concatenate([rng.dirichlet(np.full(components_per_class, 5.0)) for _ in range(10)]) / 10
    return ConditionalMixture(np.stack(means), np.stack(bases), np.stack(eigvals), iso_vars, weights, labels,
                              (3, size, size), guidance_type=guidance_type, guidance_rate=guidance_rate,
                              sigma_min=sigma_min, sigma_max=sigma_max, name='gmm_digits')


PRESETS = {'gmm_image': image_mixture, 'gmm_2d': planar_mixture, 'gmm_digits': digit_mixture}


def load(model_path=None, preset='gmm_image', **options):
    """Family loader for 'analytic': the model is built from code, so model_path names the preset if given."""
    import inspect
    from models import ModelError
    name = model_path or preset
    if name not in PRESETS:
        raise ModelError(f"unknown analytic model {name!r}; known: {', '.join(PRESETS)}")
    accepted = inspect.signature(PRESETS[name]).parameters
    guidance = {k: v for k, v in options.items() if k.startswith('guidance_') and v not in (None, 'none', 'None')}
    if guidance and 'guidance_type' not in accepted:
        raise ModelError(f"{name} is unconditional: it takes no guidance ({', '.join(sorted(guidance))}); drop the "
                         "guidance options or use the conditional gmm_digits")
    options = {k: v for k, v in options.items() if k in accepted or k not in ('guidance_type', 'guidance_rate')}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelError(f"unknown option(s) {', '.join(unknown)} for the analytic model {name}; allowed: "
                         f"{', '.join(accepted)}")
    return PRESETS[name](**options)
