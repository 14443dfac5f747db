"""The model family of a --model_path given without --dataset_name, told from the file or folder itself.

Only unambiguous cases are decided: a diffusers folder (its model_index.json names the pipeline), our converted
.safetensors + .json, an EDM pickle, a CompVis checkpoint with its yaml beside it, a DiT or guided-diffusion
PyTorch state dict (by its parameter names; read with weights-only loading, nothing from the file runs). Anything
else is one line naming the --dataset_name to add.
"""
import glob
import json
import os

from models import ModelError
from models.pipeline_folder import PIPELINE_FAMILIES

# configs whose model section fits each family, for the "add --dataset_name" hint
EXAMPLE_CONFIGS = {'edm': 'cifar10', 'adm': 'imagenet64', 'sd': 'ms_coco', 'sd3': 'sd3_512', 'flux': 'flux',
                   'dit': 'dit', 'ldm': 'lsun_bedroom_ldm'}
HINT = ('add --dataset_name=<a config of its family> (e.g. cifar10 for EDM pickles, imagenet64 for guided-diffusion, '
        'ms_coco for Stable Diffusion 1.x, or a YAML of your own with a model section)')


def _state_dict_keys(path):
    import torch
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:          # not a weights-only readable file: the family loaders give the precise reason
        raise ModelError(f"--model_path={path}: cannot read it as a PyTorch state dict ({type(e).__name__}) to tell "
                         f"its family; {HINT}") from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    return set(state) if isinstance(state, dict) else set()


def detect_family(model_path):
    """The family of a local model file or folder; raises ModelError (one line, with the fix) otherwise."""
    path = str(model_path)
    if os.path.isdir(path):
        index = os.path.join(path, 'model_index.json')
        if os.path.isfile(index):
            with open(index) as f:
                pipeline = json.load(f).get('_class_name', '?')
            if pipeline in PIPELINE_FAMILIES:
                return PIPELINE_FAMILIES[pipeline]
            raise ModelError(f"--model_path={path} is a diffusers {pipeline}, which no family here loads "
                             f"(known: {', '.join(sorted(PIPELINE_FAMILIES))})")
        raise ModelError(f"--model_path={path} is a folder without model_index.json (not a diffusers pipeline); "
                         f"{HINT}")
    if not os.path.exists(path):
        raise ModelError(f"--model_path={path} does not exist here (URLs and hub ids need their config to tell the "
                         f"family); {HINT}")
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext in ('.safetensors', '.json') and os.path.isfile(stem + '.json') and os.path.isfile(stem + '.safetensors'):
        return 'safetensors'
    if ext == '.pkl':
        return 'edm'
    if ext == '.ckpt':
        if glob.glob(os.path.join(os.path.dirname(path), '*.yaml')):
            return 'ldm'
        raise ModelError(f"--model_path={path} is a .ckpt without its yaml beside it (a CompVis LDM has config.yaml; "
                         f"a Stable Diffusion single file needs its config): {HINT}")
    if ext in ('.pt', '.pth'):
        keys = _state_dict_keys(path)
        if any(k.startswith('x_embedder.') for k in keys):
            return 'dit'
        if 'input_blocks.0.0.weight' in keys:
            raise ModelError(f"--model_path={path} is a guided-diffusion (ADM) state dict, whose architecture flags "
                             f"are not in the file; add --dataset_name=imagenet64 (or imagenet256, lsun_bedroom, "
                             f"lsun_cat) or a YAML with family adm and its flags")
    raise ModelError(f"--model_path={path}: cannot tell the model family from the file; {HINT}")


def config_for_model(model_path):
    """A run's config made from the model alone: its family, an empty sample and train section."""
    family = detect_family(model_path)
    name = os.path.basename(os.path.normpath(str(model_path))) or 'model'
    return dict(dataset_name=os.path.splitext(name)[0], model=dict(family=family, model_path=str(model_path)),
                sample={}, train={})
