"""Reading diffusers pipeline folders (or hub ids) without running code from them: model_index.json names the
pipeline and its components, each loaded by a class from a fixed list. Used by the latent-model loaders
(models/latent.py) and the checkpoint converters (models/latent_convert.py)."""
import json
import os

from models import ModelError

# pipeline class in model_index.json -> the family that loads it (for "wrong family" messages)
PIPELINE_FAMILIES = {
    'StableDiffusionPipeline': 'sd', 'StableDiffusionImg2ImgPipeline': 'sd', 'LDMPipeline': 'ldm',
    'StableDiffusion3Pipeline': 'sd3', 'FluxPipeline': 'flux', 'DiTPipeline': 'dit',
}
FAMILY_NAMES = {'sd': 'Stable Diffusion 1.x/2.x', 'ldm': 'unconditional LDM', 'sd3': 'Stable Diffusion 3',
                'flux': 'FLUX', 'dit': 'DiT'}
# component name -> allowed classes; the library is fixed per class so that nothing named in a file is imported
DIFFUSERS_CLASSES = {'UNet2DConditionModel', 'UNet2DModel', 'AutoencoderKL', 'VQModel', 'SD3Transformer2DModel',
                     'FluxTransformer2DModel', 'DiTTransformer2DModel', 'Transformer2DModel'}
TRANSFORMERS_CLASSES = {'CLIPTextModel', 'CLIPTextModelWithProjection', 'T5EncoderModel'}


class PipelineFolder:
    """A diffusers pipeline (local folder or hub id): model_index.json plus one subfolder per component."""

    def __init__(self, model_path, family):
        if model_path is None:
            raise ModelError(f"family {family} needs --model_path (a diffusers folder or hub id)")
        self.path, self.family = str(model_path), family
        self.local = os.path.isdir(self.path)
        if self.local:
            index_file = os.path.join(self.path, 'model_index.json')
            if not os.path.isfile(index_file):
                raise ModelError(f"{self.path} has no model_index.json: not a diffusers pipeline folder "
                                 f"(save one with save_pretrained or download it from the Hugging Face hub)")
            with open(index_file) as f:
                self.index = json.load(f)
        elif os.path.exists(self.path):
            raise ModelError(f"{self.path} is a file; family {family} loads a diffusers pipeline folder")
        else:
            try:
                from diffusers import DiffusionPipeline
                self.index = DiffusionPipeline.load_config(self.path)
            except Exception as e:
                raise ModelError(f"cannot read the diffusers pipeline {self.path!r} (not a folder; as a hub id: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        pipeline = self.index.get('_class_name', '?')
        other = PIPELINE_FAMILIES.get(pipeline)
        if other is not None and other != family:
            raise ModelError(f"{self.path} is a {pipeline} ({FAMILY_NAMES[other]}), not a {FAMILY_NAMES[family]} "
                             f"model; load it with family {other}")

    def has(self, name):
        entry = self.index.get(name)
        return isinstance(entry, (list, tuple)) and entry[0] is not None and entry[1] is not None

    def require(self, *names):
        for name in names:
            if not self.has(name):
                pipeline = self.index.get('_class_name', '?')
                hint = PIPELINE_FAMILIES.get(pipeline)
                hint = f"; it looks like a {FAMILY_NAMES[hint]} pipeline (family {hint})" if hint else ''
                raise ModelError(f"{self.path} has no {name!r} component in model_index.json, which a "
                                 f"{FAMILY_NAMES[self.family]} model needs{hint}")

    def first(self, *names):
        for name in names:
            if self.has(name):
                return name
        self.require(names[0])

    def component(self, name, dtype=None):
        if self.local and not os.path.isdir(os.path.join(self.path, name)):
            raise ModelError(f"{self.path} lacks the {name}/ component listed in its model_index.json; "
                             f"download the complete pipeline folder")
        library, class_name = self.index[name]
        try:
            if class_name in DIFFUSERS_CLASSES:
                import diffusers
                cls = getattr(diffusers, class_name)
            elif class_name in TRANSFORMERS_CLASSES or class_name.endswith('Tokenizer') or \
                    class_name.endswith('TokenizerFast'):
                import transformers
                cls = transformers.AutoTokenizer if 'Tokenizer' in class_name else getattr(transformers, class_name)
            else:
                raise ModelError(f"{self.path}: component {name} has class {class_name}, which family "
                                 f"{self.family} does not load")
            kwargs = {'torch_dtype': dtype} if dtype is not None and 'Tokenizer' not in class_name else {}
            return cls.from_pretrained(self.path, subfolder=name, **kwargs)
        except OSError as e:
            raise ModelError(f"{self.path}: cannot load component {name} ({class_name}): "
                             f"{str(e).splitlines()[0]}")

    def scheduler_config(self):
        name = 'scheduler'
        self.require(name)
        if self.local:
            file = os.path.join(self.path, name, 'scheduler_config.json')
            if not os.path.isfile(file):
                raise ModelError(f"{self.path} lacks {name}/scheduler_config.json; download the complete folder")
            with open(file) as f:
                return json.load(f)
        from diffusers import DDPMScheduler
        return dict(DDPMScheduler.load_config(self.path, subfolder=name))


def single_file_folder(config, family, what, needs):
    """The diffusers folder (or hub id) that supplies the components a single checkpoint file lacks."""
    try:
        folder = PipelineFolder(config, family)
        folder.require(*needs)
    except ModelError as e:
        raise ModelError(f"{what} takes its {', '.join(needs)} from single_file_config={config!r}: {e}; set "
                         f"single_file_config to a local diffusers {FAMILY_NAMES[family]} folder")
    return folder
