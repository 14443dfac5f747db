"""The model of a dataset config, as the scripts (sample.py, train.py, the benches) load it."""
import inspect

import models


def _family_takes(kwargs, option):
    family = kwargs.get('family')
    return family in models.FAMILIES and option in inspect.signature(
        models.import_callable(models.FAMILIES[family])).parameters


def load_model(cfg, model_path, device, guidance_type=None, guidance_rate=None, classifier_path=None,
               resolution=None):
    """The denoiser of config `cfg`'s model section, with --model_path, --classifier_path, --resolution and the
    guidance options overriding it; on `device`, in eval mode, frozen. A python: model path replaces the whole
    section. A --model_path other than the config's renders at its own native size unless --resolution is given
    (the config's resolution belongs to the config's model)."""
    kwargs = dict(cfg['model'])
    if model_path is not None:
        if str(model_path) != str(kwargs.get('model_path')):
            kwargs.pop('resolution', None)
        kwargs['model_path'] = model_path
        if str(model_path).startswith('python:'):
            kwargs = {'model_path': model_path}
    for option, value, who in (('classifier_path', classifier_path, 'take no separate classifier (family adm does)'),
                               ('resolution', resolution, 'have a fixed size (the latent families take one)')):
        if value is None:
            continue
        if not _family_takes(kwargs, option):
            family = kwargs.get('family')
            raise models.ModelError(f"--{option} given, but {'family ' + family if family else 'these'} models "
                                    f"{who}; drop --{option}")
        kwargs[option] = value
    if guidance_type is not None:
        kwargs['guidance_type'] = guidance_type
    if guidance_rate is not None:
        kwargs['guidance_rate'] = guidance_rate
    net = models.load_denoiser(**kwargs).to(device).eval().requires_grad_(False)
    given = [f'--{k}={v}' for k, v in (('guidance_type', guidance_type), ('guidance_rate', guidance_rate))
             if v is not None and v not in ('none', 'None', 'uncond')]
    if given and not net.label_dim and not getattr(net, 'prompt_keys', None):
        raise models.ModelError(f"{' '.join(given)} given, but the model of {cfg['dataset_name']} has no conditions "
                                "(no classes, no prompts), so guidance would change nothing; drop the guidance options")
    return net
