"""ImageReward: a tiny random-weight instance of the real architecture (BLIP ViT + med BERT with cross-attention +
MLP head), saved as the real files (a torch state dict under the checkpoint's own key names, med_config.json, a
bert-base-uncased style tokenizer folder), loaded through load_scorer, equals a forward written out here in plain
torch from those key names (hand tokenisation, PIL resize, the ViT, the BERT layers, the head); bad files are one
clear line."""
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from scorers import ScorerError, load_scorer
from torch_utils.image_io import to_uint8

WORDS = ['a', 'red', 'digit', 'seven', 'two', 'cats', 'on', 'sofa', 'photo', 'of', 'blue', 'sky']
VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS
PROMPTS = ['a red digit seven', 'Two cats on a sofa', 'a photo of a zebra', ' '.join(['blue sky'] * 30)]
WIDTH, DEPTH, PATCH, SIZE = 128, 2, 8, 32          # ViT: two 64-wide heads, 4x4 patches
HIDDEN, LAYERS, TEXT_HEADS, FFN, POSITIONS = 32, 2, 2, 64, 40
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def checkpoint_state(seed=0, hidden=HIDDEN, width=WIDTH):
    """Random tensors under ImageReward.pt's key names and shapes (BLIP's ViT, med BERT, projections, MLP)."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def lin(name, o, i, bias=True):
        state[name + '.weight'] = torch.randn(o, i, generator=g) / math.sqrt(i)
        if bias:
            state[name + '.bias'] = 0.1 * torch.randn(o, generator=g)

    def norm(name, d):
        state[name + '.weight'] = 1 + 0.1 * torch.randn(d, generator=g)
        state[name + '.bias'] = 0.1 * torch.randn(d, generator=g)

    v = 'blip.visual_encoder.'
    state[v + 'cls_token'] = 0.5 * torch.randn(1, 1, width, generator=g)
    state[v + 'pos_embed'] = 0.5 * torch.randn(1, (SIZE // PATCH) ** 2 + 1, width, generator=g)
    state[v + 'patch_embed.proj.weight'] = torch.randn(width, 3, PATCH, PATCH, generator=g) / PATCH / 3
    state[v + 'patch_embed.proj.bias'] = 0.1 * torch.randn(width, generator=g)
    for i in range(DEPTH):
        b = f'{v}blocks.{i}.'
        norm(b + 'norm1', width)
        lin(b + 'attn.qkv', 3 * width, width)
        lin(b + 'attn.proj', width, width)
        norm(b + 'norm2', width)
        lin(b + 'mlp.fc1', 4 * width, width)
        lin(b + 'mlp.fc2', width, 4 * width)
    norm(v + 'norm', width)
    t = 'blip.text_encoder.'
    state[t + 'embeddings.word_embeddings.weight'] = torch.randn(len(VOCAB) + 2, hidden, generator=g)
    state[t + 'embeddings.position_embeddings.weight'] = 0.5 * torch.randn(POSITIONS, hidden, generator=g)
    state[t + 'embeddings.position_ids'] = torch.arange(POSITIONS)[None]
    norm(t + 'embeddings.LayerNorm', hidden)
    for i in range(LAYERS):
        b = f'{t}encoder.layer.{i}.'
        for part, kv_width in (('attention', hidden), ('crossattention', width)):
            lin(b + part + '.self.query', hidden, hidden)
            lin(b + part + '.self.key', hidden, kv_width)
            lin(b + part + '.self.value', hidden, kv_width)
            lin(b + part + '.output.dense', hidden, hidden)
            norm(b + part + '.output.LayerNorm', hidden)
        lin(b + 'intermediate.dense', FFN, hidden)
        lin(b + 'output.dense', hidden, FFN)
        norm(b + 'output.LayerNorm', hidden)
    lin('blip.vision_proj', 16, width)
    lin('blip.text_proj', 16, hidden)
    for idx, (o, i) in zip((0, 2, 4, 6, 7), ((1024, hidden), (128, 1024), (64, 128), (16, 64), (1, 16))):
        lin(f'mlp.layers.{idx}', o, i)
    return state


def med_config(hidden=HIDDEN, vocab=len(VOCAB) + 2):
    # encoder_width stays at the release's 768: BLIP replaces it by the ViT's width.
    return dict(architectures=['BertModel'], attention_probs_dropout_prob=0.1, hidden_act='gelu',
                hidden_dropout_prob=0.1, hidden_size=hidden, initializer_range=0.02, intermediate_size=FFN,
                layer_norm_eps=1e-12, max_position_embeddings=POSITIONS, model_type='bert',
                num_attention_heads=TEXT_HEADS, num_hidden_layers=LAYERS, pad_token_id=0, type_vocab_size=2,
                vocab_size=vocab, encoder_width=768, add_cross_attention=True)


def write_files(folder, state=None, config=None, vocab=VOCAB):
    paths = dict(checkpoint=folder / 'ImageReward.pt', med_config=folder / 'med_config.json',
                 tokenizer=folder / 'bert-base-uncased')
    torch.save(checkpoint_state() if state is None else state, paths['checkpoint'])
    paths['med_config'].write_text(json.dumps(config or med_config()))
    paths['tokenizer'].mkdir(exist_ok=True)
    (paths['tokenizer'] / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    (paths['tokenizer'] / 'tokenizer_config.json').write_text(json.dumps(dict(do_lower_case=True)))
    return {k: str(v) for k, v in paths.items()}


# ---- the independent path -----------------------------------------------------------------------------------------

def hand_tokens(prompts, length=35):
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, p in enumerate(prompts):
        words = [VOCAB.index(w) if w in VOCAB else VOCAB.index('[UNK]') for w in p.lower().split()]
        seq = [VOCAB.index('[CLS]')] + words[:length - 2] + [VOCAB.index('[SEP]')]
        ids[row, :len(seq)] = torch.tensor(seq)
    return ids, (ids != 0).to(torch.float64)


def hand_pixels(images, size=SIZE):
    out = []
    for a in to_uint8(images).permute(0, 2, 3, 1).numpy():
        pil = PIL.Image.fromarray(a, 'RGB')
        if pil.size != (size, size):                     # square inputs: the centre crop keeps everything
            pil = pil.resize((size, size), PIL.Image.BICUBIC)
        x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).to(torch.float64) / 255
        out.append((x - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) /
                   torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None])
    return torch.stack(out)


def attention(q, k, v, heads, add_mask=None):
    B, N, D = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, D // heads).transpose(1, 2)
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
    if add_mask is not None:
        logits = logits + add_mask
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, N, D)


def hand_score(state, images, prompts):
    s = {k: v.to(torch.float64) for k, v in state.items()}
    lin = lambda x, name: x @ s[name + '.weight'].T + s[name + '.bias']
    ln = lambda x, name, eps: F.layer_norm(x, x.shape[-1:], s[name + '.weight'], s[name + '.bias'], eps)
    # BLIP's ViT: patches + [CLS] + positions, pre-norm blocks (fused qkv), final norm on every token.
    v = 'blip.visual_encoder.'
    x = F.conv2d(hand_pixels(images), s[v + 'patch_embed.proj.weight'], s[v + 'patch_embed.proj.bias'],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + 'cls_token'].expand(x.shape[0], -1, -1), x], 1) + s[v + 'pos_embed']
    for i in range(DEPTH):
        b = f'{v}blocks.{i}.'
        q, k, val = lin(ln(x, b + 'norm1', 1e-6), b + 'attn.qkv').chunk(3, dim=-1)
        x = x + lin(attention(q, k, val, WIDTH // 64), b + 'attn.proj')
        x = x + lin(F.gelu(lin(ln(x, b + 'norm2', 1e-6), b + 'mlp.fc1')), b + 'mlp.fc2')
    image_tokens = ln(x, v + 'norm', 1e-6)
    # The med BERT as an encoder: bidirectional self-attention over the prompt (padding masked), cross-attention
    # on all image tokens, post-norm residuals.
    t = 'blip.text_encoder.'
    ids, mask = hand_tokens(prompts)
    h = s[t + 'embeddings.word_embeddings.weight'][ids] + s[t + 'embeddings.position_embeddings.weight'][:35]
    h = ln(h, t + 'embeddings.LayerNorm', 1e-12)
    pad = (1 - mask)[:, None, None, :] * -1e30
    for i in range(LAYERS):
        b = f'{t}encoder.layer.{i}.'
        for part, context, m in (('attention', None, pad), ('crossattention', image_tokens, None)):
            c = h if context is None else context
            a = attention(lin(h, b + part + '.self.query'), lin(c, b + part + '.self.key'),
                          lin(c, b + part + '.self.value'), TEXT_HEADS, m)
            h = ln(lin(a, b + part + '.output.dense') + h, b + part + '.output.LayerNorm', 1e-12)
        f = lin(F.gelu(lin(h, b + 'intermediate.dense')), b + 'output.dense')
        h = ln(f + h, b + 'output.LayerNorm', 1e-12)
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f'mlp.layers.{idx}')
    return (r[:, 0] - MEAN) / STD


def images(n=4, size=SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2.2 - 1.1


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_imagereward_equals_the_forward_by_hand(tmp_path):
    paths = write_files(tmp_path)
    state = checkpoint_state()
    scorer = load_scorer('imagereward', batch_size=3, **paths)
    x = images()
    got = scorer(x, PROMPTS)
    want = hand_score(state, x, PROMPTS)
    assert got.shape == (4,) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got, want)
    assert want.std() > 0.05                                     # the scores depend on the image and prompt
    # In float64 the two paths agree to rounding: every epsilon and activation is the checkpoint's.
    assert torch.allclose(scorer.to(torch.float64)(x, PROMPTS), want, rtol=0, atol=1e-10)
    scorer.to(torch.float32)
    # Images of another size go through the bicubic resize first.
    big = images(size=48, seed=2)
    assert torch.allclose(scorer(big, PROMPTS), hand_score(state, big, PROMPTS), rtol=1e-4, atol=1e-4)
    # The reference's +3 std shift moves the raw score; multi's normalised value is the same either way.
    shifted = load_scorer('imagereward', reference_shift=True, **paths)
    s = shifted(x, PROMPTS)
    assert torch.allclose(s, got + 3 * STD, atol=1e-9)
    assert torch.allclose(shifted.normalise(s), ((got + 3 * STD) / 10).clamp(0, 1))
    assert torch.allclose(scorer.normalise(got), shifted.normalise(s))
    assert torch.equal(scorer.normalise(torch.tensor([-4.0, 6.9 - 3 * STD, 99.0])).round(decimals=6),
                       torch.tensor([0.0, 0.69, 1.0]))
    with pytest.raises(ScorerError, match='one prompt'):
        scorer(x, PROMPTS[:2])


def test_cache_dir_and_the_rl_config_reach_the_same_scorer(tmp_path):
    from training.rl import load_rl_config, reward_options
    paths = write_files(tmp_path)
    x = images(n=2)
    want = hand_score(checkpoint_state(), x, PROMPTS[:2])
    assert torch.allclose(load_scorer('imagereward', cache_dir=str(tmp_path))(x, PROMPTS[:2]), want,
                          rtol=1e-4, atol=1e-4)
    base = ['data.predictor_snapshot=1'] + [f'reward.multi.imagereward.{k}={v}' for k, v in paths.items()]
    name, opts = reward_options(load_rl_config(overrides=base + ['reward.type=imagereward']), None)
    assert torch.allclose(load_scorer(name, **opts)(x, PROMPTS[:2]), want, rtol=1e-4, atol=1e-4)
    cfg = load_rl_config(overrides=base + ['reward.type=multi', 'reward.multi.weights.imagereward=2'])
    name, opts = reward_options(cfg, None)
    multi = load_scorer(name, **opts)
    assert set(multi.heads) == {'imagereward'}
    assert torch.allclose(multi(x, PROMPTS[:2]), ((want + 3 * STD) / 10).clamp(0, 1), atol=1e-5)
    # The reference's top-level reward.cache_dir serves as well.
    cfg = load_rl_config(overrides=['data.predictor_snapshot=1', 'reward.type=imagereward',
                                    f'reward.cache_dir={tmp_path}'])
    name, opts = reward_options(cfg, None)
    assert torch.allclose(load_scorer(name, **opts)(x, PROMPTS[:2]), want, rtol=1e-4, atol=1e-4)


def one_line(excinfo):
    assert '\n' not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_files_name_the_file_its_source_and_the_option(tmp_path):
    paths = write_files(tmp_path)
    for key, source in (('checkpoint', 'huggingface.co/THUDM/ImageReward'),
                        ('med_config', 'huggingface.co/THUDM/ImageReward'),
                        ('tokenizer', 'bert-base-uncased')):
        absent = str(tmp_path / f'absent-{key}')
        with pytest.raises(ScorerError) as e:
            load_scorer('imagereward', option_prefix='reward.multi.imagereward', **dict(paths, **{key: absent}))
        msg = one_line(e)
        assert absent in msg and source in msg and f'reward.multi.imagereward.{key}' in msg, msg
    with pytest.raises(ScorerError, match='no path given.*reward.checkpoint'):
        load_scorer('imagereward')


def test_wrong_files_are_one_clear_line(tmp_path):
    paths = write_files(tmp_path)
    other = tmp_path / 'other.pt'
    # The aesthetic predictor's MLP alone: not an ImageReward checkpoint.
    torch.save({k[4:]: v for k, v in checkpoint_state().items() if k.startswith('mlp.')}, other)
    with pytest.raises(ScorerError, match=r'is not an ImageReward state dict.*reward.checkpoint') as e:
        load_scorer('imagereward', **dict(paths, checkpoint=str(other)))
    one_line(e)
    # A checkpoint whose text encoder is not the one the med config describes.
    torch.save(checkpoint_state(hidden=48), other)
    with pytest.raises(ScorerError, match=r'not an ImageReward state dict of this med config.*'
                                          r'blip\.text_encoder\.') as e:
        load_scorer('imagereward', **dict(paths, checkpoint=str(other)))
    one_line(e)
    # A whole pickled module is refused without running it.
    torch.save(torch.nn.Linear(2, 2), other)
    with pytest.raises(ScorerError, match='not a plain state-dict file') as e:
        load_scorer('imagereward', **dict(paths, checkpoint=str(other)))
    one_line(e)
    # A med config that is not one, and a tokenizer of another vocabulary.
    (tmp_path / 'bad.json').write_text(json.dumps(dict(hidden_size=32)))
    with pytest.raises(ScorerError, match="not BLIP's med config.*reward.med_config") as e:
        load_scorer('imagereward', **dict(paths, med_config=str(tmp_path / 'bad.json')))
    one_line(e)
    small = tmp_path / 'small'
    write_files(small.mkdir() or small, vocab=VOCAB[:-3])
    with pytest.raises(ScorerError, match='tokens with .DEC. and .ENC.*reward.tokenizer') as e:
        load_scorer('imagereward', **dict(paths, tokenizer=str(small / 'bert-base-uncased')))
    one_line(e)
    with pytest.raises(ScorerError, match='is not a folder'):
        load_scorer('imagereward', **dict(paths, tokenizer=str(tmp_path / 'med_config.json')))
