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
