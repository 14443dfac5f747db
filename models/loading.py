"""The model of a dataset config, as the scripts (sample.py, train.py, the benches) load it."""
import models


def load_model(cfg, model_path, device, guidance_type=None, guidance_rate=None):
    """The denoiser of config `cfg`'s model section, with --model_path and the guidance options overriding it;
    on `device`, in eval mode, frozen. A python: model path replaces the whole section."""
    kwargs = dict(cfg['model'])
    if model_path is not None:
        kwargs['model_path'] = model_path
        if str(model_path).startswith('python:'):
            kwargs = {'model_path': model_path}
    if guidance_type is not None:
        kwargs['guidance_type'] = guidance_type
    if guidance_rate is not None:
        kwargs['guidance_rate'] = guidance_rate
    return models.load_denoiser(**kwargs).to(device).eval().requires_grad_(False)
