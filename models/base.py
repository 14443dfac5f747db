"""The denoiser protocol every model family is adapted to.

A denoiser works in the VE ("sigma") parametrization: x_sigma = x0 + sigma * n, and
``forward(x, sigma, cond=None)`` returns D(x; sigma) = E[x0 | x_sigma], the estimate of the clean sample
in the model's sample space (pixels, or latents for latent models). Solvers see nothing else.
"""
import torch
import torch.nn.functional as F


class Denoiser(torch.nn.Module):
    """Base class: subclasses implement ``denoise(x, sigma, cond) -> (D, bottleneck or None)``.

    Attributes read by solvers and scripts:
      sigma_min, sigma_max  native noise range (floats)
      sample_shape          (C, H, W) of one sample in the solver's space
      label_dim             0 for unconditional models, else the number of classes
      sigma_table           increasing tensor of the model's discrete sigmas (discrete-time models), else None
      flow_shift            timestep shift of flow-matching models (for the ``flowmatch`` schedule), else None
      image_channels        channels of decode()'s images if not sample_shape[0] (latent models: 3)
      forward_ad            whether forward-mode AD (torch.func.jvp) runs through forward(); False where the
                            forward differentiates internally (classifier guidance)
    """
    sigma_min = 0.002
    sigma_max = 80.0
    sample_shape = (3, 32, 32)
    label_dim = 0
    sigma_table = None
    flow_shift = None
    image_channels = None    # channels of decode()'s images when they differ from sample_shape (latent models)
    forward_ad = True

    @property
    def rows_per_eval(self):
        """Network rows one evaluation of one sample costs: 2 under classifier-free guidance (the conditional and
        unconditional halves of one batched call), else 1. NFE counts evaluations; rows count network work."""
        return 1

    def denoise(self, x, sigma, cond=None):
        raise NotImplementedError

    def forward(self, x, sigma, cond=None, return_bottleneck=False):
        sigma = broadcast_sigma(sigma, x)
        denoised, feature = self.denoise(x, sigma, cond)
        if not return_bottleneck:
            return denoised
        if feature is None:
            feature = pooled_feature(denoised)
        return denoised, feature

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def decode(self, x):
        """Map solver-space samples to images in [-1, 1] (identity for pixel models)."""
        return x

    def sample_labels(self, generator, device):
        """Draw one label for one sample from its own generator; None for unconditional models."""
        if not self.label_dim:
            return None
        idx = torch.randint(self.label_dim, (1,), generator=generator, device=device)
        return F.one_hot(idx, self.label_dim)[0].float()


def broadcast_sigma(sigma, x):
    """sigma as a tensor of shape [B] in x's dtype and device (accepts python floats, 0-d or [B] tensors)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def pooled_feature(images, size=8):
    """Channel mean of an image-shaped tensor, average-pooled to size x size and flattened: [B, size*size].

    The stand-in for a U-Net bottleneck activation on models that have none (the analytic mixtures): a
    coarse summary of the current denoised estimate, which is what the bottleneck encodes.
    """
    x = images.mean(dim=1, keepdim=True)
    if x.ndim == 4:
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)
