"""Convert a supported checkpoint to safetensors weights + a JSON description, loadable without pickle.

    python -m models.convert --src=edm-cifar10-32x32-uncond-vp.pkl --family=edm --dest=out/cifar10
    python -m models.convert --config=configs/imagenet256.yaml --dest=out/imagenet256

writes <dest>.safetensors and <dest>.json. Family 'safetensors' loads either file (or <dest> itself):
the JSON names the original family and every constructor argument, the safetensors file holds the tensors.
"""
import json
import os

import click
import torch

from models import ModelError, load_family

FORMAT = 'diffusion-denoiser-safetensors'
FORMAT_VERSION = 1
FROM_SPEC = {'edm': 'models.edm:from_spec', 'adm': 'models.adm:from_spec', 'cm': 'models.adm:from_spec'}


def _paths(path):
    path = str(path)
    for ext in ('.safetensors', '.json'):
        if path.endswith(ext):
            path = path[:-len(ext)]
    return path + '.safetensors', path + '.json'


def save_converted(denoiser, dest):
    """Write `denoiser` (any family with export_spec) as <dest>.safetensors + <dest>.json."""
    from safetensors.torch import save_file
    if not hasattr(denoiser, 'export_spec'):
        raise ModelError(f'{type(denoiser).__name__} cannot be converted (no export_spec)')
    spec, state = denoiser.export_spec()
    weights_path, json_path = _paths(dest)
    os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, weights_path, metadata={'format': FORMAT, 'family': spec['family']})
    with open(json_path, 'w') as f:
        json.dump(dict(format=FORMAT, version=FORMAT_VERSION, **spec), f, indent=2)
    return weights_path, json_path


def load(model_path, cache_dir=None, **config):
    """Family 'safetensors': a converted model (<name>.safetensors beside <name>.json)."""
    from safetensors.torch import load_file
    from models import check_model_options, import_callable
    weights_path, json_path = _paths(model_path)
    for path in (weights_path, json_path):
        if not os.path.isfile(path):
            raise ModelError(f'converted model file {path} is missing; convert with '
                             f'python -m models.convert --src=... --dest={_paths(model_path)[0][:-12]}')
    try:
        with open(json_path) as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f'{json_path} is not valid JSON ({e}); convert the model again')
    if not isinstance(spec, dict) or spec.get('format') != FORMAT or spec.get('version') != FORMAT_VERSION:
        raise ModelError(f'{json_path} is not a {FORMAT} v{FORMAT_VERSION} description')
    if spec.get('family') not in FROM_SPEC:
        raise ModelError(f"{json_path} names family {spec.get('family')!r}; convertible: {', '.join(FROM_SPEC)}")
    allowed = {'sigma_min', 'sigma_max'} | ({'guidance_rate'} if spec['family'] == 'adm' else set())
    guided = spec['family'] == 'adm' and spec.get('guidance_type')
    check_model_options(f"safetensors ({spec['family']})", config, allowed, guided=bool(guided))
    config.pop('guidance_type', None)
    try:
        state = load_file(weights_path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a truncated or foreign file
        raise ModelError(f'{weights_path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be '
                         f'truncated: convert the model again')
    return import_callable(FROM_SPEC[spec['family']])(spec, state, **config)


def _read_config(path):
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return dict(cfg.get('model') or {})


@click.command()
@click.option('--src', help='Checkpoint to convert (path or URL)', metavar='PATH|URL', type=str, default=None)
@click.option('--family', help='Family of --src', metavar='STR', type=click.Choice(sorted(FROM_SPEC)), default=None)
@click.option('--config', 'config_path', help='Dataset config whose model: section describes --src',
              metavar='YAML', type=str, default=None)
@click.option('--dest', help='Output name (writes DEST.safetensors and DEST.json)', metavar='PATH', type=str,
              required=True)
@click.option('--cache_dir', help='Download cache for URLs', metavar='DIR', type=str, default=None)
def main(src, family, config_path, dest, cache_dir):
    """Convert a checkpoint (EDM pickle, ADM/CM state dict) to safetensors + JSON."""
    config = _read_config(config_path) if config_path else {}
    src = src or config.pop('model_path', None)
    config.pop('model_path', None)
    family = family or config.pop('family', None)
    config.pop('family', None)
    if src is None or family is None:
        raise click.ClickException('give --src and --family, or a --config with model.model_path and model.family')
    try:
        denoiser = load_family(family, src, cache_dir=cache_dir, **config)
        weights_path, json_path = save_converted(denoiser, dest)
    except ModelError as e:
        raise click.ClickException(str(e))
    print(f'Wrote {weights_path} and {json_path}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
