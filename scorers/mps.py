"""MPS (Kwai-Kolors' Multi-dimensional Preference Score), overall checkpoint; an evaluation score, not a reward.

The model: a CLIP ViT-H/14 (transformers' CLIPModel, `model.*`) and a 4-layer "cross model" (`cross_model.*`) in
which the image tokens attend to the prompt tokens that resemble a fixed condition text. For one (image, prompt):
  text_f = text_projection(every prompt token), image_f = visual_projection(every ViT token, before the final norm),
  cond_f = text_projection(every token of the condition text);
  a prompt token is kept if max_j(cond_f_j . text_f_i), divided by its maximum over the prompt's tokens, exceeds
  `mask_threshold` (0.3);
  score = logit_scale.exp() * cos(text_projection(EOS token), cross_model(image_f, text_f, kept)[:, 0]).
The reference divides by the maximum over the whole batch it is handed; its scripts hand it one prompt at a time,
which is the per-prompt maximum used here, so a score does not depend on the rest of the batch.

The released MPS_overall_checkpoint.pth is a whole pickled model (torch.save of the module), which a plain unpickler
can only read by importing and running the reference's classes. It is read here through the inert-record unpickler
(torch_utils.restricted_pickle): every class in it becomes a record that runs nothing, and only the tensors are
kept, under their state-dict names. A state dict with the same names (safetensors, or torch.save's archive, read
the same way) is accepted as well; a legacy (pre-zip) pickle is not. The architecture comes from the config.json of
the laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder (the model MPS was fine-tuned from), which also gives the image
processor and tokenizer; the cross model's sizes come from its tensor shapes.
"""
import os
import zipfile

import torch
import torch.nn.functional as F

from scorers import ScorerError, require_file
from scorers.clip import check_prompts, read_state_dict, to_pil

CHECKPOINT_SOURCE = ('https://github.com/Kwai-Kolors/MPS (MPS_overall_checkpoint.pth, the Google Drive link in its '
                     'README)')
PROCESSOR_SOURCE = ('https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (config.json and its processor '
                    'and tokenizer files)')
OVERALL_CONDITION = ('light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, '
                     'structure, instance, texture, quantity, attributes, position, number, location, word, things.')
WHAT = 'MPS'
# Buffers that older transformers versions saved and newer ones rebuild (arange tables).
REBUILT_BUFFERS = ('model.text_model.embeddings.position_ids', 'model.vision_model.embeddings.position_ids')


# ---- the cross model ------------------------------------------------------------------------------------------------

class FixedBiasLayerNorm(torch.nn.Module):
    """LayerNorm with a learned scale and a bias held at zero (kept as a buffer, as in the checkpoint)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.register_buffer('bias', torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


def swiglu(x):
    value, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class SwiGLU(torch.nn.Module):
    def forward(self, x):
        return swiglu(x)


class Residual(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return x + self.fn(x, *args)


def single_head_attention(q, k, v, bias=None):
    """q: [B, H, N, d] (already scaled); k, v: [B, M, d], one key/value head shared by all query heads."""
    logits = q @ k[:, None].transpose(-1, -2)
    if bias is not None:
        logits = logits + bias[:, None]
    return logits.softmax(-1) @ v[:, None]


class CrossAttention(torch.nn.Module):
    """Queries from the image tokens, one key/value head from the prompt tokens, and a SwiGLU feed-forward in
    parallel on the same normalised input."""

    def __init__(self, dim, heads, dim_head, ff_inner):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = FixedBiasLayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, 2 * ff_inner, bias=False), SwiGLU(),
                                      torch.nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x, context, bias):
        h = self.norm(x)
        B, N, _ = h.shape
        q = self.to_q(h).view(B, N, self.heads, self.dim_head).transpose(1, 2) * self.dim_head ** -0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)
        out = single_head_attention(q, k, v, bias).transpose(1, 2).reshape(B, N, -1)
        return self.to_out(out) + self.ff(h)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer('inv_freq', 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))

    def forward(self, n, device):
        angles = torch.arange(n, device=device, dtype=self.inv_freq.dtype)[:, None] * self.inv_freq[None]
        return torch.cat([angles, angles], dim=-1)


def rotate(t, angles):
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


class ParallelBlock(torch.nn.Module):
    """Self-attention (rotary positions, one key/value head) and a SwiGLU feed-forward from one fused projection
    of the normalised input, summed."""

    def __init__(self, dim, heads, dim_head, ff_inner):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = FixedBiasLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = torch.nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = torch.nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = torch.nn.Sequential(SwiGLU(), torch.nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x):
        h = self.norm(x)
        B, N, _ = h.shape
        q, k, v, ff = self.fused_attn_ff_proj(h).split(self.split, dim=-1)
        angles = self.rotary_emb(N, h.device).to(h.dtype)
        q = rotate(q.view(B, N, self.heads, self.dim_head).transpose(1, 2), angles) * self.dim_head ** -0.5
        out = single_head_attention(q, rotate(k, angles), v).transpose(1, 2).reshape(B, N, -1)
        return self.attn_out(out) + self.ff_out(ff)


class CrossModel(torch.nn.Module):
    def __init__(self, dim, depth, heads, dim_head, ff_inner):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleList([
            Residual(CrossAttention(dim, heads, dim_head, ff_inner)),
            Residual(ParallelBlock(dim, heads, dim_head, ff_inner))]) for _ in range(depth)])

    def forward(self, query_tokens, context_tokens, bias):
        for cross, block in self.layers:
            query_tokens = block(cross(query_tokens, context_tokens, bias))
        return query_tokens


def cross_model_from_state(state, path, option):
    """A CrossModel sized from the checkpoint's `cross_model.*` tensor shapes."""
    try:
        to_q = state['cross_model.layers.0.0.fn.to_q.weight']
        to_kv = state['cross_model.layers.0.0.fn.to_kv.weight']
        ff_in = state['cross_model.layers.0.0.fn.ff.0.weight']
    except KeyError as e:
        raise ScorerError(f"{path} is not an MPS checkpoint (no cross model tensor {e.args[0]}); set {option} to "
                          "MPS_overall_checkpoint.pth") from None
    depth = len({k.split('.')[2] for k in state if k.startswith('cross_model.layers.')})
    dim_head = to_kv.shape[0] // 2
    return CrossModel(dim=to_q.shape[1], depth=depth, heads=to_q.shape[0] // dim_head, dim_head=dim_head,
                      ff_inner=ff_in.shape[0] // 2)


# ---- reading the checkpoint -----------------------------------------------------------------------------------------

def read_checkpoint(path, option):
    """{state-dict name: tensor} of the released whole-model pickle (read as inert records), of a torch.save'd
    state dict (read the same way) or of a safetensors file."""
    from torch_utils.restricted_pickle import UnsafePickleError, collect_tensors, read_zip_records
    if str(path).endswith('.safetensors'):
        state = read_state_dict(path, WHAT)
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                tree = read_zip_records(archive, source=f'MPS checkpoint {path}')
        except (UnsafePickleError, zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError) as e:
            raise ScorerError(f"{path} is not a readable MPS checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); set {option} to MPS_overall_checkpoint.pth") \
                from None
        if isinstance(tree, dict) and isinstance(tree.get('state_dict'), dict):
            tree = tree['state_dict']
        if isinstance(tree, dict) and tree and all(torch.is_tensor(v) for v in tree.values()):
            state = dict(tree)                      # a state dict
        else:
            state = collect_tensors(tree)           # the whole pickled model: its parameters and buffers
    else:
        raise ScorerError(f"{path} is neither a torch.save archive nor a safetensors file; set {option} to "
                          "MPS_overall_checkpoint.pth or a state dict of it (.pt or .safetensors)")
    if not state:
        raise ScorerError(f"{path} holds no model tensors; set {option} to MPS_overall_checkpoint.pth")
    state = {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in REBUILT_BUFFERS}


def load_strict(module, state, path, prefix, option):
    own = module.state_dict()
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in mine]
    unexpected = [k for k in mine if k not in own]
    shapes = [k for k in own if k in mine and tuple(mine[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = prefix + (missing or unexpected or shapes)[0]
        raise ScorerError(f"{path} is not an MPS checkpoint of this CLIP config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped tensors, e.g. {example}); set "
                          f"{option} to MPS_overall_checkpoint.pth with the laion/CLIP-ViT-H-14 processor folder")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in mine.items()})


class MPS(torch.nn.Module):
    """MPS score of (image, prompt) pairs (~10-15 with the released checkpoint's logit scale). Two local files:
    `checkpoint` (MPS_overall_checkpoint.pth or a state dict of it) and `processor` (the
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder: config.json, processor and tokenizer files)."""
    training_reward = False

    def __init__(self, checkpoint=None, processor=None, condition=OVERALL_CONDITION, mask_threshold=0.3,
                 batch_size=16, option_prefix='reward', **_):
        super().__init__()
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
        opt = {k: f'{option_prefix}.{k}' for k in ('checkpoint', 'processor')}
        require_file(checkpoint, WHAT, CHECKPOINT_SOURCE, opt['checkpoint'])
        require_file(processor, 'CLIP ViT-H-14 processor', PROCESSOR_SOURCE, opt['processor'])
        if not os.path.isfile(os.path.join(processor, 'config.json')):
            raise ScorerError(f"{processor} has no config.json: the architecture of MPS's CLIP comes from the "
                              f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder ({PROCESSOR_SOURCE}); set "
                              f"{opt['processor']} to it")
        try:
            config = CLIPConfig.from_pretrained(processor, local_files_only=True)
            self.image_processor = CLIPImageProcessor.from_pretrained(processor, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(processor, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ScorerError(f"cannot read the CLIP processor folder {processor} ({str(e).splitlines()[0][:160]});"
                              f" set {opt['processor']} to the laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder")
        state = read_checkpoint(checkpoint, opt['checkpoint'])
        self.clip = CLIPModel(config)
        load_strict(self.clip, state, checkpoint, 'model.', opt['checkpoint'])
        self.cross_model = cross_model_from_state(state, checkpoint, opt['checkpoint'])
        load_strict(self.cross_model, state, checkpoint, 'cross_model.', opt['checkpoint'])
        if self.cross_model.layers[0][0].fn.to_q.in_features != config.projection_dim:
            raise ScorerError(f"{checkpoint}: the cross model is {self.cross_model.layers[0][0].fn.to_q.in_features}"
                              f" wide but the CLIP projections {config.projection_dim}; set {opt['processor']} to "
                              "the folder of the CLIP model MPS was trained from")
        self.eval().requires_grad_(False)
        self.condition = str(condition)
        self.mask_threshold = float(mask_threshold)
        self.max_length = min(int(self.tokenizer.model_max_length), config.text_config.max_position_embeddings)
        self.batch_size = int(batch_size)

    def tokens(self, texts, device):
        return self.tokenizer(texts, max_length=self.max_length, padding='max_length', truncation=True,
                              return_tensors='pt').input_ids.to(device)

    def text_tokens(self, ids):
        """(projection of every token, projection of the EOS token); no attention mask, as the reference."""
        out = self.clip.text_model(input_ids=ids)
        return self.clip.text_projection(out.last_hidden_state), self.clip.text_projection(out.pooler_output)

    @torch.no_grad()
    def forward(self, images, targets=None):
        prompts = check_prompts(targets, images.shape[0], 'mps')
        param = next(self.clip.parameters())
        cond_f, _ = self.text_tokens(self.tokens([self.condition], param.device))
        pil, scores = to_pil(images), []
        for lo in range(0, len(pil), self.batch_size):
            pixels = self.image_processor(images=pil[lo:lo + self.batch_size], return_tensors='pt')['pixel_values']
            image_f = self.clip.visual_projection(
                self.clip.vision_model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state)
            text_f, text_eos = self.text_tokens(self.tokens(prompts[lo:lo + self.batch_size], param.device))
            # Per prompt token: its best match among the condition's tokens, relative to the prompt's best.
            match = torch.einsum('bid,jd->bij', text_f, cond_f[0]).amax(dim=2)
            match = match / match.amax(dim=1, keepdim=True)
            bias = torch.zeros_like(match).masked_fill(match <= self.mask_threshold, float('-inf'))
            fused = self.cross_model(image_f, text_f, bias[:, None, :].expand(-1, image_f.shape[1], -1))[:, 0]
            cos = (F.normalize(text_eos.to(torch.float64), dim=-1) * F.normalize(fused.to(torch.float64), dim=-1))
            scores.append(self.clip.logit_scale.exp().to(torch.float64) * cos.sum(-1))
        return torch.cat(scores)

    def normalise(self, scores):
        raise ScorerError("mps is an evaluation score: it is not a training reward and has no multi weight")
