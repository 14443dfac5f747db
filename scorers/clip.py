"""CLIP-based scorers on open_clip models: HPSv2.1, CLIP score and the LAION aesthetic predictor.

The architecture comes from open_clip's own config (by name, `arch`), the weights from a local state dict
(safetensors, or a torch file read with weights_only=True); open_clip never downloads anything here. Images go
through the model's own evaluation transform on uint8 PIL images (as the reference scores them, and as the PNGs
sample.py writes would be scored).
"""
import logging
import os

import numpy as np
import PIL.Image
import torch

from scorers import ScorerError, require_file
from torch_utils.image_io import to_uint8

HPS_SOURCE = 'https://huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt)'
CLIP_L14_SOURCE = ('https://huggingface.co/timm/vit_large_patch14_clip_224.openai (open_clip_model.safetensors, '
                   "OpenAI's CLIP ViT-L/14)")
AESTHETIC_SOURCE = ('https://github.com/christophschuhmann/improved-aesthetic-predictor '
                    '(sac+logos+ava1-l14-linearMSE.pth)')


def read_state_dict(path, what):
    """Tensors of a safetensors or torch state-dict file; a {'state_dict': ...} wrapper and DDP's 'module.'
    prefixes are taken off. A file holding anything but tensors and containers is refused (nothing executes)."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:      # UnpicklingError for pickled code, RuntimeError for a file of another kind
            raise ScorerError(f"{path} is not a plain state-dict file for {what} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); use the weights file itself")
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ScorerError(f"{path} does not hold a state dict of tensors for {what}")
    return {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}


def load_into(module, state, path, what, option):
    """Strict load with one line on a mismatch (a file of another architecture)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise ScorerError(f"{path} is not a {what} state dict ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, {len(shapes)} mis-shaped tensors, e.g. {example}); set {option} to a "
                          f"{what} file")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_open_clip(arch, path, what, source, option):
    """(model, eval transform, tokenizer) of open_clip architecture `arch` with the weights of `path`. `arch` is
    an architecture open_clip ships, or the path of a JSON model config of one it does not (named by its file)."""
    import open_clip
    require_file(path, what, source, option)
    if arch.endswith('.json'):
        if not os.path.isfile(arch):
            raise ScorerError(f"{arch}: no such open_clip model config (JSON) for {what}")
        open_clip.add_model_config(arch)
        arch = os.path.splitext(os.path.basename(arch))[0]
    if arch not in open_clip.list_models():
        raise ScorerError(f"unknown open_clip architecture {arch!r} for {what}; give a name open_clip ships or "
                          "the path of a JSON model config")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)        # "no pretrained weights loaded": we load them next
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.getLogger().setLevel(level)
    load_into(model, read_state_dict(path, what), path, what, option)
    cfg = model.visual.preprocess_cfg
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, mean=cfg['mean'],
                                          std=cfg['std'], interpolation=cfg['interpolation'],
                                          resize_mode=cfg['resize_mode'])
    return model.eval().requires_grad_(False), transform, open_clip.get_tokenizer(arch)


def to_pil(images):
    """[-1, 1] float images -> uint8 RGB PIL images (the PNG quantisation of sample.py)."""
    arrays = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray(np.repeat(a, 3, 2) if a.shape[2] == 1 else a, 'RGB') for a in arrays]


def check_prompts(prompts, batch, name):
    if prompts is None or isinstance(prompts, str) or len(prompts) != batch or \
            not all(isinstance(p, str) for p in prompts):
        raise ScorerError(f"the {name} reward needs one prompt (a string) per image")
    return list(prompts)


class OpenCLIPScorer(torch.nn.Module):
    what, source, default_arch = None, None, None

    def __init__(self, weights_path=None, arch=None, batch_size=16, option_prefix='reward', option=None, **_):
        super().__init__()
        self.arch = arch or self.default_arch
        self.model, self.transform, self.tokenizer = load_open_clip(
            self.arch, weights_path, self.what, self.source, option or f'{option_prefix}.weights_path')
        self.batch_size = int(batch_size)

    def features(self, images, prompts=None):
        """L2-normalised image (and text) features, float64, in chunks of batch_size."""
        device = next(self.model.parameters()).device
        img, txt = [], []
        pil = to_pil(images)
        for lo in range(0, len(pil), self.batch_size):
            pixels = torch.stack([self.transform(p) for p in pil[lo:lo + self.batch_size]]).to(device)
            img.append(self.model.encode_image(pixels).to(torch.float64))
            if prompts is not None:
                tokens = self.tokenizer(prompts[lo:lo + self.batch_size]).to(device)
                txt.append(self.model.encode_text(tokens).to(torch.float64))
        norm = torch.nn.functional.normalize
        return norm(torch.cat(img), dim=-1), (norm(torch.cat(txt), dim=-1) if prompts is not None else None)


class HPSv2(OpenCLIPScorer):
    """HPSv2.1: the cosine of image and prompt features of a fine-tuned open_clip ViT-H-14 (no logit scale,
    ~0.2-0.3)."""
    what, source, default_arch = 'HPSv2.1 (open_clip ViT-H-14)', HPS_SOURCE, 'ViT-H-14'

    @torch.no_grad()
    def forward(self, images, targets=None):
        f_img, f_txt = self.features(images, check_prompts(targets, images.shape[0], 'hps'))
        return (f_img * f_txt).sum(-1)

    def normalise(self, scores):
        return scores.clamp(0, 1)


class CLIPScore(HPSv2):
    """The cosine of image and prompt features of OpenAI's CLIP ViT-L/14 (QuickGELU)."""
    what, source, default_arch = "CLIP ViT-L/14 (open_clip ViT-L-14-quickgelu)", CLIP_L14_SOURCE, \
        'ViT-L-14-quickgelu'


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor's head: linear layers 768-1024-128-64-16-1 with dropout between
    the first ones and no nonlinearity (its state dict keys layers.{0,2,4,6,7})."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class Aesthetic(OpenCLIPScorer):
    """LAION aesthetic score (~5 for typical photos): the MLP on the L2-normalised CLIP ViT-L/14 image
    embedding. Needs two files: the MLP (`predictor_path`) and CLIP (`clip_path`)."""
    what, source, default_arch = CLIPScore.what, CLIP_L14_SOURCE, 'ViT-L-14-quickgelu'

    def __init__(self, predictor_path=None, clip_path=None, arch=None, batch_size=16, option_prefix='reward', **_):
        super().__init__(clip_path, arch, batch_size, option_prefix, option=f'{option_prefix}.clip_path')
        what = 'LAION aesthetic predictor MLP'
        require_file(predictor_path, what, AESTHETIC_SOURCE, f'{option_prefix}.predictor_path')
        state = read_state_dict(predictor_path, what)
        first = state.get('layers.0.weight')
        self.head = AestheticMLP(first.shape[1] if first is not None else 768).to(torch.float64)
        load_into(self.head, state, predictor_path, what, f'{option_prefix}.predictor_path')
        dim = self.model.text_projection.shape[1] if self.model.text_projection is not None else None
        if dim is not None and first.shape[1] != dim:
            raise ScorerError(f"{predictor_path} takes {first.shape[1]}-d embeddings but the CLIP model makes "
                              f"{dim}-d ones; pair it with CLIP ViT-L/14")
        self.head.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images, targets=None):
        f_img, _ = self.features(images)
        return self.head(f_img)[:, 0]

    def normalise(self, scores):
        return (scores / 10).clamp(0, 1)
