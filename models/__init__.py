"""Model families adapted to the denoiser protocol (see models/base.py), and the one loader over them."""
import importlib
import inspect

from models.base import Denoiser, broadcast_sigma, pooled_feature  # noqa: F401

# family name -> "module:function"; each function takes (model_path, **config) and returns a Denoiser.
# Imported lazily so that a family's heavy dependencies load only when that family is used.
FAMILIES = {
    'analytic': 'models.analytic:load',
    'edm': 'models.edm:load',
    'adm': 'models.adm:load',
    'cm': 'models.adm:load_cm',
    'ldm': 'models.latent:load_ldm',
    'sd': 'models.latent:load_sd',
    'sd3': 'models.latent:load_sd3',
    'flux': 'models.latent:load_flux',
    'dit': 'models.latent:load_dit',
    'safetensors': 'models.convert:load',
}


class ModelError(Exception):
    """A model cannot be loaded; the message names the problem and the fix."""


def import_callable(spec):
    """'package.module:callable' -> the callable (the python: model path form)."""
    module_name, _, attr = spec.partition(':')
    if not module_name or not attr:
        raise ModelError(f"--model_path=python:{spec} must look like python:package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"--model_path=python:{spec}: cannot import {module_name} ({e}); is it on PYTHONPATH?")
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError(f"--model_path=python:{spec}: module {module_name} has no attribute {attr!r}")


def check_model_options(family, config, allowed, guided=False):
    """Refuse, naming them, model options a family's loader does not take (e.g. a typo in a config's model
    section), and guidance options for a model without guidance. guidance_type None/'uncond'/'none' and
    guidance_rate None always pass; cache_dir is every loader's."""
    config = dict(config)
    if not guided:
        gtype, rate = config.pop('guidance_type', None), config.pop('guidance_rate', None)
        if gtype not in (None, 'uncond', 'none', 'None', '') or rate is not None:
            given = f'guidance_type={gtype}' if gtype not in (None, 'uncond', 'none', 'None', '') else \
                f'guidance_rate={rate}'
            raise ModelError(f"{given}: family {family} models take no guidance; drop the guidance options "
                             f"(--guidance_type/--guidance_rate, or guidance_* in the config's model section)")
    unknown = set(config) - set(allowed) - {'cache_dir', 'guidance_type', 'guidance_rate'}
    if unknown:
        raise ModelError(f"unknown model option(s) {', '.join(sorted(unknown))} for family {family} (a typo in "
                         f"the config's model section?); allowed: {', '.join(sorted(set(allowed) | {'cache_dir'}))}")


def load_family(family, model_path, **config):
    """Load a denoiser of a known family."""
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    loader = import_callable(FAMILIES[family])
    return loader(model_path, **config)


def load_denoiser(model_path=None, family=None, **config):
    """The single entry point: a `python:` callable spec, or a file/folder of a known family."""
    if model_path is not None and str(model_path).startswith('python:'):
        factory = import_callable(str(model_path)[len('python:'):])
        try:
            inspect.signature(factory).bind(**config)
        except TypeError as e:
            raise ModelError(f"--model_path={model_path} cannot take the option(s) {', '.join(sorted(config))} "
                             f"({e}); drop them or accept them in the factory") from None
        except ValueError:      # no signature to inspect (a builtin): let the call decide
            pass
        net = factory(**config) if config else factory()
        if not isinstance(net, Denoiser):
            raise ModelError(f"--model_path={model_path} returned {type(net).__name__}, not a models.Denoiser")
        return net
    if family is None:
        raise ModelError(f"cannot tell the model family of {model_path!r}; give the dataset's config a 'family'")
    return load_family(family, model_path, **config)


def from_pipeline(pipe, family=None, **options):
    """A diffusers pipeline object in memory (SD 1.x/2.x, SD3, FLUX, DiT, LDM) as a denoiser sharing its modules:
    `solvers.sample(models.from_pipeline(pipe), latents, predictor=pred, cond=...)`. See models/latent.py."""
    from models.latent import from_pipeline as adapt
    return adapt(pipe, family, **options)
