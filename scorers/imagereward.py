"""ImageReward (THUDM): a BLIP image-text encoder with an MLP head, trained on human preference rankings.

Architecture of the released `ImageReward.pt` (a plain state dict of the ImageReward module):
  - `blip.visual_encoder.*`: BLIP's ViT (pre-norm blocks, fused qkv, LayerNorm eps 1e-6, exact GELU, the final
    norm on every token); ViT-L/16 at 224 px in the release (1024 wide, 24 blocks, 16 heads of 64).
  - `blip.text_encoder.*`: BLIP's "med" BERT (`med_config.json`: bert-base sizes, vocab 30524 = bert-base-uncased
    plus [DEC] and [ENC]) with a cross-attention block on the image tokens in every layer, no token-type
    embeddings, no pooler.
  - `mlp.layers.{0,2,4,6,7}`: linear 768-1024-128-64-16-1 with dropout between and no nonlinearity (the LAION
    aesthetic head's layout) on the text encoder's [CLS] output.
  - `blip.vision_proj`, `blip.text_proj`: contrastive projections the score does not use (ignored).
score = (mlp(cls) - 0.16717) / 1.03334, the standard ImageReward (~0 on average, ~[-2, 2]).

The ViT and the med BERT are transformers' BlipVisionModel and BlipTextModel, which implement the same layers:
the text encoder's keys are BLIP's own; the ViT's are renamed (`VISION_KEYS`). transformers builds cross-attention
only in "decoder" text configs, so the config sets is_decoder=True and the forward runs as an encoder
(bidirectional self-attention), as ImageReward's does. The ViT's head count is not in the file: BLIP's ViTs use
64-wide heads, so heads = width / 64.

Images: uint8 PIL (as the PNGs sample.py writes), resized (shorter side, bicubic) to the ViT's size, centre
cropped, CLIP mean/std. Prompts: bert-base-uncased from a local folder, padded to 35 tokens and truncated.
"""
import json
import os
import re

import torch

from scorers import ScorerError, require_file
from scorers.clip import AestheticMLP, check_prompts, read_state_dict, to_pil

CHECKPOINT_SOURCE = 'https://huggingface.co/THUDM/ImageReward (ImageReward.pt)'
MED_CONFIG_SOURCE = 'https://huggingface.co/THUDM/ImageReward (med_config.json)'
TOKENIZER_SOURCE = ('https://huggingface.co/google-bert/bert-base-uncased (vocab.txt, tokenizer.json, '
                    'tokenizer_config.json into one folder)')
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_PROMPT_TOKENS = 35
HEAD_WIDTH = 64
WHAT = 'ImageReward'

# BLIP ViT key -> BlipVisionModel key ({i}: block index).
VISION_KEYS = {
    'cls_token': 'embeddings.class_embedding',
    'pos_embed': 'embeddings.position_embedding',
    'patch_embed.proj.weight': 'embeddings.patch_embedding.weight',
    'patch_embed.proj.bias': 'embeddings.patch_embedding.bias',
    'norm.weight': 'post_layernorm.weight',
    'norm.bias': 'post_layernorm.bias',
}
VISION_BLOCK_KEYS = {
    'norm1': 'layer_norm1', 'attn.qkv': 'self_attn.qkv', 'attn.proj': 'self_attn.projection',
    'norm2': 'layer_norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
}
UNUSED_PREFIXES = ('blip.vision_proj.', 'blip.text_proj.')
UNUSED_KEYS = ('blip.text_encoder.embeddings.position_ids',)      # a buffer: arange, rebuilt by transformers


def vision_key(key):
    """BlipVisionModel's name of a `blip.visual_encoder.` key (without the prefix), or None if it is not one."""
    if key in VISION_KEYS:
        return VISION_KEYS[key]
    m = re.fullmatch(r'blocks\.(\d+)\.(.+)\.(weight|bias)', key)
    if m and m.group(2) in VISION_BLOCK_KEYS:
        return f'encoder.layers.{m.group(1)}.{VISION_BLOCK_KEYS[m.group(2)]}.{m.group(3)}'
    return None


def split_state_dict(state, path, option):
    """ImageReward's state dict -> (vision, text, mlp) state dicts in transformers' / our names."""
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES):
            continue
        if key.startswith('blip.visual_encoder.') and vision_key(key[len('blip.visual_encoder.'):]):
            vision[vision_key(key[len('blip.visual_encoder.'):])] = value
        elif key.startswith('blip.text_encoder.'):
            text[key[len('blip.text_encoder.'):]] = value
        elif key.startswith('mlp.'):
            mlp[key[len('mlp.'):]] = value
        else:
            unknown.append(key)
    needed = ('pos_embed', 'patch_embed.proj.weight', 'blocks.0.mlp.fc1.weight')
    absent = [k for k in needed if vision_key(k) not in vision] + \
        [k for k in ('mlp.layers.0.weight',) if k[4:] not in mlp] + \
        ([] if text else ['blip.text_encoder.*'])
    if unknown or absent:
        example = (unknown or absent)[0]
        raise ScorerError(f"{path} is not an ImageReward state dict ({len(unknown)} unexpected, {len(absent)} "
                          f"missing tensors, e.g. {example}); set {option} to ImageReward.pt")
    return vision, text, mlp


def vision_config(vision, path, option):
    """BlipVisionConfig of the ViT in the file, from its tensor shapes."""
    from transformers import BlipVisionConfig
    width, _, patch, _ = vision['embeddings.patch_embedding.weight'].shape
    tokens = vision['embeddings.position_embedding'].shape[1] - 1
    side = round(tokens ** 0.5)
    depth = len({k.split('.')[2] for k in vision if k.startswith('encoder.layers.')})
    if side * side != tokens or width % HEAD_WIDTH:
        raise ScorerError(f"{path}: a ViT of width {width} with {tokens} patch positions is not a BLIP ViT; set "
                          f"{option} to ImageReward.pt")
    return BlipVisionConfig(hidden_size=width, intermediate_size=vision['encoder.layers.0.mlp.fc1.weight'].shape[0],
                            num_hidden_layers=depth, num_attention_heads=width // HEAD_WIDTH, image_size=side * patch,
                            patch_size=patch, hidden_act='gelu', layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config(med_path, encoder_width, option):
    """BlipTextConfig of BLIP's med_config.json (a BERT config with cross-attention on `encoder_width` tokens)."""
    from transformers import BlipTextConfig
    try:
        with open(med_path) as f:
            med = json.load(f)
    except (OSError, ValueError) as e:
        raise ScorerError(f"cannot read the med config {med_path} ({type(e).__name__}: {e}); set {option} to "
                          "ImageReward's med_config.json")
    keys = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
            'max_position_embeddings')
    if not isinstance(med, dict) or any(not isinstance(med.get(k), int) for k in keys) or \
            not med.get('add_cross_attention'):
        raise ScorerError(f"{med_path} is not BLIP's med config (a BERT config with {', '.join(keys)} and "
                          f"add_cross_attention: true); set {option} to ImageReward's med_config.json")
    if med['max_position_embeddings'] < MAX_PROMPT_TOKENS:
        raise ScorerError(f"{med_path}: max_position_embeddings={med['max_position_embeddings']} is below the "
                          f"{MAX_PROMPT_TOKENS} prompt tokens ImageReward reads")
    return BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=encoder_width,
                          hidden_act=med.get('hidden_act', 'gelu'), layer_norm_eps=med.get('layer_norm_eps', 1e-12),
                          pad_token_id=med.get('pad_token_id', 0), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True)


def load_strict(module, state, path, option, prefix):
    """Strict load; a mismatch is one line naming a tensor by its name in the ImageReward file."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        back = {v: k for k, v in VISION_KEYS.items()}
        example = (missing or unexpected or shapes)[0]
        raise ScorerError(f"{path} is not an ImageReward state dict of this med config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped tensors, e.g. "
                          f"{prefix}{back.get(example, example)}); set {option} to ImageReward.pt with its "
                          "med_config.json")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


class ImageReward(torch.nn.Module):
    """ImageReward score of (image, prompt) pairs. Three local files: the state dict (`checkpoint`), its
    `med_config` and the bert-base-uncased `tokenizer` folder; `cache_dir` names a folder holding
    ImageReward.pt, med_config.json and bert-base-uncased/ for the ones not given. `reference_shift` adds the
    +3 std the reference's scorer adds (its raw scores and evaluation numbers); `multi` weights the same
    normalised value either way."""

    def __init__(self, checkpoint=None, med_config=None, tokenizer=None, cache_dir=None, batch_size=16,
                 reference_shift=False, option_prefix='reward', **_):
        super().__init__()
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel
        if cache_dir:
            checkpoint = checkpoint or os.path.join(cache_dir, 'ImageReward.pt')
            med_config = med_config or os.path.join(cache_dir, 'med_config.json')
            tokenizer = tokenizer or os.path.join(cache_dir, 'bert-base-uncased')
        opt = {k: f'{option_prefix}.{k}' for k in ('checkpoint', 'med_config', 'tokenizer')}
        require_file(checkpoint, WHAT, CHECKPOINT_SOURCE, opt['checkpoint'])
        require_file(med_config, 'ImageReward med config', MED_CONFIG_SOURCE, opt['med_config'])
        require_file(tokenizer, 'bert-base-uncased tokenizer', TOKENIZER_SOURCE, opt['tokenizer'])
        if not os.path.isdir(tokenizer):
            raise ScorerError(f"{tokenizer} is not a folder; set {opt['tokenizer']} to the bert-base-uncased "
                              "tokenizer folder")

        vision, text, mlp = split_state_dict(read_state_dict(checkpoint, WHAT), checkpoint, opt['checkpoint'])
        vcfg = vision_config(vision, checkpoint, opt['checkpoint'])
        self.vision = BlipVisionModel(vcfg)
        load_strict(self.vision, vision, checkpoint, opt['checkpoint'], 'blip.visual_encoder.')
        self.text = BlipTextModel(text_config(med_config, vcfg.hidden_size, opt['med_config']),
                                  add_pooling_layer=False)
        load_strict(self.text, text, checkpoint, opt['checkpoint'], 'blip.text_encoder.')
        self.head = AestheticMLP(self.text.config.hidden_size).to(torch.float64)
        load_strict(self.head, mlp, checkpoint, opt['checkpoint'], 'mlp.')
        for m in (self.vision, self.text, self.head):
            m.eval().requires_grad_(False)

        try:
            self.tokenizer = BertTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ScorerError(f"cannot read the tokenizer folder {tokenizer} ({str(e).splitlines()[0][:160]}); "
                              f"set {opt['tokenizer']} to the bert-base-uncased tokenizer folder")
        # BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC]; they make its 30524 = the med vocab.
        self.tokenizer.add_special_tokens({'bos_token': '[DEC]'})
        self.tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
        if len(self.tokenizer) != self.text.config.vocab_size:
            raise ScorerError(f"the tokenizer {tokenizer} has {len(self.tokenizer)} tokens with [DEC] and [ENC], "
                              f"the med config {self.text.config.vocab_size}; set {opt['tokenizer']} to "
                              "bert-base-uncased")

        from torchvision import transforms
        size = vcfg.image_size
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
            transforms.PILToTensor()])        # uint8; scaled and normalised in the model's dtype
        self.batch_size = int(batch_size)
        self.shift = 3 * REWARD_STD if reference_shift else 0.0

    @torch.no_grad()
    def features(self, images, prompts):
        """The text encoder's [CLS] output with cross-attention on the image tokens, float64 [B, hidden]."""
        param = next(self.vision.parameters())
        device = param.device
        pil, out = to_pil(images), []
        for lo in range(0, len(pil), self.batch_size):
            pixels = torch.stack([self.transform(p) for p in pil[lo:lo + self.batch_size]]).to(device, param.dtype)
            pixels = (pixels / 255 - pixels.new_tensor(CLIP_MEAN)[:, None, None]) / \
                pixels.new_tensor(CLIP_STD)[:, None, None]
            tokens = self.tokenizer(prompts[lo:lo + self.batch_size], padding='max_length', truncation=True,
                                    max_length=MAX_PROMPT_TOKENS, return_tensors='pt')
            image_tokens = self.vision(pixel_values=pixels).last_hidden_state
            text = self.text(input_ids=tokens['input_ids'].to(device),
                             attention_mask=tokens['attention_mask'].to(device),
                             encoder_hidden_states=image_tokens,
                             encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long,
                                                               device=device))
            out.append(text.last_hidden_state[:, 0].to(torch.float64))
        return torch.cat(out)

    @torch.no_grad()
    def forward(self, images, targets=None):
        prompts = check_prompts(targets, images.shape[0], 'imagereward')
        cls = self.features(images, prompts)
        raw = self.head(cls.to(next(self.head.parameters()).dtype))[:, 0].to(torch.float64)
        return (raw - REWARD_MEAN) / REWARD_STD + self.shift

    def normalise(self, scores):
        # The reference's multi weight: clamp(s / 10, 0, 1) of its +3 std shifted score.
        return ((scores - self.shift + 3 * REWARD_STD) / 10).clamp(0, 1)
