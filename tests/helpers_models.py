"""Models for tests, loaded through --model_path=python:tests.helpers_models:NAME like any user model."""
import torch

from models.analytic import image_mixture
from models.base import Denoiser


def small_mixture():
    return image_mixture(num_components=2, rank=2, size=8)


class NaNBelowOne(Denoiser):
    """A broken model: NaN once sigma drops below 1."""
    sample_shape = (3, 8, 8)

    def denoise(self, x, sigma, cond=None):
        out = torch.zeros_like(x)
        bad = (sigma < 1).reshape(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(x, float('nan')), out), None


def nan_model():
    return NaNBelowOne()
