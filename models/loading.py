"""The model of a dataset config, as the scripts (sample.py, train.py, the benches) load it."""
import inspect

import models


def load_model(cfg, model_path, device, guidance_type=None, guidance_rate=None, classifier_path=None):
    """The denoiser of config `cfg`'s model section, with --model_path, --classifier_path and the guidance options
    overriding it; on `device`, in eval mode, frozen. A python: model path replaces the whole section."""
    kwargs = dict(cfg['model'])
    if model_path is not None:
        kwargs['model_path'] = model_path
        if str(model_path).startswith('python:'):
            kwargs = {'model_path': model_path}
    if classifier_path is not None:
        family = kwargs.get('family')
        takes = (family in models.FAMILIES and 'classifier_path' in
                 inspect.signature(models.import_callable(models.FAMILIES[family])).parameters)
        if not takes:
            raise models.ModelError(f"--classifier_path given, but {'family ' + family if family else 'this'} models "
                                    "take no separate classifier (family adm does); drop --classifier_path")
        kwargs['classifier_path'] = classifier_path
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
