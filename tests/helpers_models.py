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


# -- tiny models in the real file formats (for loader, bad-input and family-detection tests) -------------------

def tiny_edm_network(label_dim=0, resolution=8):
    """A small VPPrecond + SongUNet (DDPM++), the architecture of EDM's CIFAR-10 pickle, with random weights."""
    from models import edm_networks as en
    torch.manual_seed(0)
    net = en.VPPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                       model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return net.eval()


def write_edm_pickle(path, **kwargs):
    """An EDM persistence pickle of tiny_edm_network (the layout of NVIDIA's released .pkl files)."""
    from models import edm
    edm.save_persistence_pickle(str(path), tiny_edm_network(**kwargs))
    return str(path)


def write_converted_model(dest, **kwargs):
    """The tiny EDM network converted to our safetensors + JSON (dest.safetensors, dest.json)."""
    import models
    from models import convert
    src = write_edm_pickle(str(dest) + '-src.pkl', **kwargs)
    weights, _ = convert.save_converted(models.load_denoiser(model_path=src, family='edm'), str(dest))
    return weights


def write_predictor(folder, **settings):
    """An (untrained) EPD predictor folder for the default analytic model gmm_image."""
    import training
    from training.predictors import EPDPredictor
    base = dict(dataset_name='gmm_image', sampler_stu='epd', sampler_tea='euler', num_steps=4, M=1, num_points=2,
                afs=False, scale_dir=0.05, scale_time=0.05, fcn=False, loss='l2', alpha=10, schedule_type='polynomial',
                schedule_rho=7, sigma_min=0.002, sigma_max=80.0, max_order=3, sample_shape=[3, 32, 32])
    base.update(settings)
    training.save_predictor(EPDPredictor(base), str(folder))
    return str(folder)
