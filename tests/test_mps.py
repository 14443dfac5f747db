"""MPS: a tiny random-weight instance of the reference's model (its classes rebuilt here under their own module
names: an XCLIPModel on transformers' CLIPModel and the cross model), pickled whole by torch.save as the release
is, then read by our scorer without those classes (nothing from the file runs), scores as the reference's own
evaluation function computes on the same model; state-dict files load the same; bad files are one line."""
import json
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scorers import ScorerError, load_scorer
from scorers.clip import to_pil

PROMPTS = ['a red digit seven', 'two cats on a sofa in the light', 'a photo of a blue sky', 'x']
CONDITION = ('light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, '
             'instance, texture, quantity, attributes, position, number, location, word, things.')
PROJ, HEADS, DIM_HEAD, DEPTH = 32, 2, 16, 2


# ---- the reference's classes, with the reference's module names and structure -------------------------------------

def reference_classes():
    """{name: class} of trainer.models.cross_modeling / clip_model, written after the reference's layout."""
    from transformers import CLIPModel as HFCLIPModel

    class LayerNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.register_buffer('bias', torch.zeros(dim))

        def forward(self, x):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x, *args):
            return self.fn(x, *args) + x

    class RotaryEmbedding(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer('inv_freq', 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

        def forward(self, n, device):
            seq = torch.arange(n, device=device, dtype=self.inv_freq.dtype)
            freqs = torch.einsum('i,j->ij', seq, self.inv_freq)
            return torch.cat((freqs, freqs), dim=-1)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class SwiGLU(nn.Module):
        def forward(self, x):
            x, gate = x.chunk(2, dim=-1)
            return F.silu(gate) * x

    class ParallelTransformerBlock(nn.Module):
        def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
            super().__init__()
            self.norm = LayerNorm(dim)
            self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
            self.heads, self.scale = heads, dim_head ** -0.5
            self.rotary_emb = RotaryEmbedding(dim_head)
            self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
            self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
            self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))
            self.register_buffer('pos_emb', None, persistent=False)

        def forward(self, x):
            n = x.shape[1]
            x = self.norm(x)
            q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
            q = q.reshape(q.shape[0], n, self.heads, -1).permute(0, 2, 1, 3)
            pos = self.rotary_emb(n, x.device)
            self.register_buffer('pos_emb', pos, persistent=False)      # the reference caches it this way
            q, k = [t * pos.cos() + rotate_half(t) * pos.sin() for t in (q, k)]
            sim = torch.einsum('bhid,bjd->bhij', q * self.scale, k)
            attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
            out = torch.einsum('bhij,bjd->bhid', attn, v).permute(0, 2, 1, 3).reshape(x.shape[0], n, -1)
            return self.attn_out(out) + self.ff_out(ff)

    class CrossAttention(nn.Module):
        def __init__(self, dim, *, dim_head=64, heads=12, ff_mult=4):
            super().__init__()
            self.heads, self.scale = heads, dim_head ** -0.5
            self.norm = LayerNorm(dim)
            self.context_norm = nn.Identity()
            self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
            self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
            self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), SwiGLU(),
                                    nn.Linear(ff_mult * dim, dim, bias=False))

        def forward(self, x, context, mask):
            x = self.norm(x)
            context = self.context_norm(context)
            q = self.to_q(x)
            q = q.reshape(q.shape[0], q.shape[1], self.heads, -1).permute(0, 2, 1, 3) * self.scale
            k, v = self.to_kv(context).chunk(2, dim=-1)
            sim = torch.einsum('bhid,bjd->bhij', q, k) + mask.unsqueeze(1).repeat(1, self.heads, 1, 1)
            attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
            out = torch.einsum('bhij,bjd->bhid', attn, v).permute(0, 2, 1, 3)
            return self.to_out(out.reshape(out.shape[0], out.shape[1], -1)) + self.ff(x)

    class Cross_model(nn.Module):
        def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleList([
                Residual(CrossAttention(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)),
                Residual(ParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult))])
                for _ in range(layer_num)])

        def forward(self, query_tokens, context_tokens, mask):
            for cross_attn, self_attn_ff in self.layers:
                query_tokens = self_attn_ff(cross_attn(query_tokens, context_tokens, mask))
            return query_tokens

    class XCLIPModel(HFCLIPModel):
        def get_text_features(self, input_ids=None):
            out = self.text_model(input_ids=input_ids)
            return self.text_projection(out.last_hidden_state), self.text_projection(out.pooler_output)

        def get_image_features(self, pixel_values=None):
            return self.visual_projection(self.vision_model(pixel_values=pixel_values).last_hidden_state)

    class CLIPModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.model = XCLIPModel(config)
            self.cross_model = Cross_model(dim=PROJ, layer_num=DEPTH, dim_head=DIM_HEAD, heads=HEADS)

        @property
        def logit_scale(self):
            return self.model.logit_scale

    return dict(locals())


@pytest.fixture
def reference_module_names(monkeypatch):
    """Install the reference's classes under their module names for torch.save; returns a function that removes
    them again (so the loader cannot reach them)."""
    classes = {k: v for k, v in reference_classes().items() if isinstance(v, type)}
    mods = {name: types.ModuleType(name) for name in
            ('trainer', 'trainer.models', 'trainer.models.clip_model', 'trainer.models.cross_modeling')}
    for name, cls in classes.items():
        where = 'trainer.models.clip_model' if name in ('XCLIPModel', 'CLIPModel') else \
            'trainer.models.cross_modeling'
        cls.__module__, cls.__qualname__ = where, name
        setattr(mods[where], name, cls)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def remove():
        for name in mods:
            monkeypatch.delitem(sys.modules, name)
    return classes, remove


def write_processor(folder):
    """The laion/CLIP-ViT-H-14 folder's layout, tiny: config.json, image processor, CLIP BPE tokenizer."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    tok = open_clip.tokenizer.SimpleTokenizer()
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    names = {'<start_of_text>': '<|startoftext|>', '<end_of_text>': '<|endoftext|>'}
    folder.mkdir(exist_ok=True)
    (folder / 'vocab.json').write_text(json.dumps({names.get(k, k): v for k, v in tok.encoder.items()}))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n')
    tokenizer = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'), model_max_length=77)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}),
                  tokenizer=tokenizer).save_pretrained(str(folder))
    config = CLIPConfig(text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=PROJ)
    config.save_pretrained(str(folder))
    return config


def build_reference(classes, config, seed=0):
    torch.manual_seed(seed)
    model = classes['CLIPModel'](config)
    with torch.no_grad():                       # non-trivial norms, scale and cross model
        for name, p in model.named_parameters():
            p.add_((0.3 if 'cross_model' in name else 0.02) * torch.randn_like(p))
        model.model.logit_scale.fill_(math.log(20.0))
    return model.eval()


@torch.no_grad()
def reference_scores(model, folder, images, prompts, threshold=0.85):
    """The reference's evaluation of one (image, prompt) at a time, in the model's dtype. Its threshold is 0.3;
    the tiny model's token features share more, so the test masks at 0.85 to keep some tokens only."""
    from transformers import AutoTokenizer, CLIPImageProcessor
    processor = CLIPImageProcessor.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    dtype = next(model.parameters()).dtype

    def tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding='max_length', truncation=True,
                         return_tensors='pt').input_ids

    out, kept = [], []
    for pil, prompt in zip(to_pil(images), prompts):
        text_f, text_features = model.model.get_text_features(tokenize(prompt))
        image_f = model.model.get_image_features(processor(pil, return_tensors='pt')['pixel_values'].to(dtype))
        condition_f, _ = model.model.get_text_features(tokenize(CONDITION))
        sim = torch.einsum('bid,bjd->bji', text_f, condition_f)
        sim = torch.max(sim, dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0, float('-inf')).to(dtype)
        kept.append(int((mask == 0).sum()))
        image_features = model.cross_model(image_f, text_f, mask.repeat(1, image_f.shape[1], 1))[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        out.append((model.logit_scale.exp() * text_features @ image_features.T)[0, 0].item())
    return torch.tensor(out, dtype=torch.float64), kept


def images(n=4, size=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2.2 - 1.1


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_the_whole_pickled_model_scores_as_the_reference(tmp_path, reference_module_names):
    classes, remove = reference_module_names
    config = write_processor(tmp_path / 'processor')
    model = build_reference(classes, config)
    x = images()
    want, kept = reference_scores(model, tmp_path / 'processor', x, PROMPTS)
    assert all(0 < k < 77 for k in kept), kept                   # the condition mask keeps some tokens only
    path = tmp_path / 'MPS_overall_checkpoint.pth'
    torch.save(model, path)                                      # the release's format: the whole module
    state = model.state_dict()
    remove()                                                     # the loader cannot import the classes
    scorer = load_scorer('mps', checkpoint=str(path), processor=str(tmp_path / 'processor'), batch_size=3,
                         mask_threshold=0.85)
    assert 'trainer.models.clip_model' not in sys.modules
    got = scorer(x, PROMPTS)
    assert got.shape == (4,) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got, want)
    assert want.std() > 0.05
    # In float64 both agree to rounding.
    want64, _ = reference_scores(model.double(), tmp_path / 'processor', x, PROMPTS)
    assert torch.allclose(scorer.to(torch.float64)(x, PROMPTS), want64, rtol=0, atol=1e-9)
    # A state dict of the same model, as torch.save's archive or safetensors, loads the same.
    from safetensors.torch import save_file
    torch.save(state, tmp_path / 'mps_state.pt')
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'mps.safetensors'))
    for name in ('mps_state.pt', 'mps.safetensors'):
        other = load_scorer('mps', checkpoint=str(tmp_path / name), processor=str(tmp_path / 'processor'),
                            mask_threshold=0.85)
        assert torch.allclose(other(x, PROMPTS), got.to(torch.float64), rtol=1e-5, atol=1e-5), name
    assert load_scorer('mps', checkpoint=str(path), processor=str(tmp_path / 'processor')).mask_threshold == 0.3
    with pytest.raises(ScorerError, match='one prompt'):
        scorer(x, PROMPTS[:1])
    with pytest.raises(ScorerError, match='evaluation score'):
        scorer.normalise(got)


def test_mps_is_no_training_reward(tmp_path):
    from training.rl import UsageError, load_rl_config, reward_options
    with pytest.raises(ScorerError, match='evaluation score'):
        load_scorer('multi', weights=dict(mps=1.0))
    cfg = load_rl_config(overrides=['data.predictor_snapshot=1', 'reward.type=mps'])
    with pytest.raises(UsageError, match='evaluation score'):
        reward_options(cfg, None)


def test_code_in_the_checkpoint_never_runs(tmp_path):
    write_processor(tmp_path / 'processor')
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    path = tmp_path / 'evil.pth'
    torch.save({'model': Payload()}, path)
    with pytest.raises(ScorerError, match='holds no model tensors') as e:
        load_scorer('mps', checkpoint=str(path), processor=str(tmp_path / 'processor'))
    assert '\n' not in str(e.value) and not marker.exists()


def test_bad_files_are_one_clear_line(tmp_path, reference_module_names):
    classes, remove = reference_module_names
    proc = tmp_path / 'processor'
    config = write_processor(proc)
    cases = []
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(tmp_path / 'absent.pth'), processor=str(proc),
                    option_prefix='eval.mps')
    cases.append((e, ['absent.pth', 'github.com/Kwai-Kolors/MPS', 'eval.mps.checkpoint']))
    path = tmp_path / 'MPS_overall_checkpoint.pth'
    model = build_reference(classes, config)
    torch.save(model, path)
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(path), processor=str(tmp_path / 'none'))
    cases.append((e, ['laion/CLIP-ViT-H-14-laion2B-s32B-b79K', 'reward.processor']))
    (tmp_path / 'no-config').mkdir()
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(path), processor=str(tmp_path / 'no-config'))
    cases.append((e, ['has no config.json', 'reward.processor']))
    # A model of another CLIP size than the folder's config.
    bigger = config.to_dict()
    bigger['text_config']['hidden_size'] = 64
    from transformers import CLIPConfig
    torch.save(build_reference(classes, CLIPConfig.from_dict(bigger)).state_dict(), tmp_path / 'big.pt')
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(tmp_path / 'big.pt'), processor=str(proc))
    cases.append((e, ['not an MPS checkpoint of this CLIP config', 'model.text_model', 'reward.checkpoint']))
    # A CLIP without the cross model, and a pre-zip pickle.
    torch.save({'model.' + k: v for k, v in model.model.state_dict().items()}, tmp_path / 'clip-only.pt')
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(tmp_path / 'clip-only.pt'), processor=str(proc))
    cases.append((e, ['no cross model tensor', 'reward.checkpoint']))
    torch.save(model.state_dict(), tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
    with pytest.raises(ScorerError) as e:
        load_scorer('mps', checkpoint=str(tmp_path / 'legacy.pt'), processor=str(proc))
    cases.append((e, ['neither a torch.save archive nor a safetensors file']))
    for e, parts in cases:
        msg = str(e.value)
        assert '\n' not in msg and all(p in msg for p in parts), (msg, parts)
