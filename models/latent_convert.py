"""Original-layout checkpoints of the LDM and DiT families as diffusers models, with our own key mappings.

  ldm  a CompVis LatentDiffusion .ckpt with its config.yaml: the openaimodel UNetModel becomes a UNet2DModel,
       the taming VQ (or KL) first stage a VQModel (or AutoencoderKL), LDM's beta schedule a DDIM scheduler config.
  dit  a facebookresearch DiT .pt state dict: a DiTTransformer2DModel (the VAE and scheduler come from a diffusers
       DiT folder).

`load_ldm` and `load_dit` (models/latent.py) read these files directly. This command writes one as a diffusers
pipeline folder, which then loads without the yaml and without converting again:

    python -m models.latent_convert --src=lsun_bedrooms/model.ckpt --dest=ldm-lsun-bedroom-256
    python -m models.latent_convert --src=DiT-XL-2-256x256.pt --dest=dit-xl-2-256

Pickled checkpoints are read with torch.load(weights_only=True). The only other objects allowed in them are the
metadata classes in PLACEHOLDER_GLOBALS, and those are replaced by empty stand-ins, so nothing in the file runs.
"""
import math
import os
import re
import shutil
import tempfile

import click
import torch

from models import ModelError

# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints.

# Classes that training checkpoints hold beside their tensors, as metadata we never use: PyTorch Lightning keys
# its callback states by the callback class (the CompVis LDM checkpoints), DiT's training checkpoints keep their
# argparse arguments. Each is allowed by its full name and unpickled as an empty stand-in class.
PLACEHOLDER_GLOBALS = (
    'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint',
    'pytorch_lightning.callbacks.early_stopping.EarlyStopping',
    'argparse.Namespace',
)


class _Placeholder:
    """Stand-in for a metadata class named in a checkpoint; it holds whatever state was pickled, nothing runs."""


def _stand_in(name):
    return type(name.rsplit('.', 1)[-1], (_Placeholder,), {})


def read_checkpoint(path):
    """The top-level object of a .safetensors file or a torch pickle, loaded without running code."""
    if not os.path.isfile(path):
        raise ModelError(f"{path} does not exist")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise ModelError(f"cannot read {path} as safetensors ({type(e).__name__}: {_first_line(e)})")
    try:  # the zip format can be inspected first, for a short message
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        unsafe = []  # the legacy format: torch.load(weights_only=True) below refuses the same things
    refused = [name for name in unsafe if name not in PLACEHOLDER_GLOBALS]
    if refused:
        raise ModelError(f"{path} holds objects other than weights ({', '.join(refused[:3])}); it is only read "
                         f"with torch.load(weights_only=True): save its state_dict alone, or as safetensors")
    try:
        with torch.serialization.safe_globals([(_stand_in(name), name) for name in PLACEHOLDER_GLOBALS]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        reason = f"it holds objects other than weights ({found[1]})" if found else \
            f"{type(e).__name__}: {_first_line(e)}"
        raise ModelError(f"cannot read {path} with torch.load(weights_only=True): {reason}")


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else ''


def checkpoint_state(obj, path):
    """The flat name -> tensor dict of a checkpoint: a Lightning 'state_dict', DiT's 'ema' (what DiT samples
    with) or 'model', or the dict itself."""
    for key in ('state_dict', 'ema', 'model'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds no state dict of tensors")
    return obj


def guess_family(keys):
    """The model family whose original layout these checkpoint keys have, or None."""
    keys = list(keys)
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if has('joint_blocks.'):
        return 'sd3'
    if has('double_blocks.') or has('single_transformer_blocks.'):
        return 'flux'
    if has('context_embedder.') and has('transformer_blocks.'):
        return 'sd3'  # diffusers names
    if has('y_embedder.embedding_table.') and has('x_embedder.proj.'):
        return 'dit'
    if any(k.startswith('model.diffusion_model.input_blocks.') for k in keys):
        conditional = has('cond_stage_model.') or has('.transformer_blocks.')
        return 'sd' if conditional else 'ldm'
    return None


# ----------------------------------------------------------------------------------------------------------------
# Key maps. An entry (src, dsts, heads, trailing) fills the diffusers tensors `dsts` from the original tensor
# `src`: heads None copies it into each of dsts (reshaped: 1x1 convolutions become linears), heads h splits a
# fused qkv projection into (q, k, v) with the openaimodel "legacy" order, where rows run over heads first
# ([q_0 k_0 v_0 q_1 k_1 v_1 ...]); h = 1 is a plain split into thirds. `trailing` is the number of singleton
# kernel dimensions the original weight has beyond the diffusers one.

def _module(entries, src, dsts, heads=None, trailing=0, params=('weight', 'bias')):
    dsts = [dsts] if isinstance(dsts, str) else list(dsts)
    for p in params:
        entries.append((f'{src}.{p}', tuple(f'{d}.{p}' for d in dsts), heads, trailing if p == 'weight' else 0))


def _openai_resblock(entries, src, dst, shortcut):
    pairs = [('in_layers.0', 'norm1'), ('in_layers.2', 'conv1'), ('emb_layers.1', 'time_emb_proj'),
             ('out_layers.0', 'norm2'), ('out_layers.3', 'conv2')]
    for s, d in pairs + ([('skip_connection', 'conv_shortcut')] if shortcut else []):
        _module(entries, f'{src}.{s}', f'{dst}.{d}')


def _openai_attention(entries, src, dst, heads):
    _module(entries, f'{src}.norm', f'{dst}.group_norm')
    _module(entries, f'{src}.qkv', [f'{dst}.to_q', f'{dst}.to_k', f'{dst}.to_v'], heads=heads, trailing=1)
    _module(entries, f'{src}.proj_out', f'{dst}.to_out.0', trailing=1)


def unet_key_map(arch, prefix='model.diffusion_model.'):
    """Entries for an openaimodel UNetModel (`arch` from ldm_layout) -> UNet2DModel.

    The walk follows openaimodel's construction: input_blocks.0 is the stem, then per level `num_res_blocks`
    blocks [ResBlock, AttentionBlock?] and (except at the last level) a Downsample block; the middle block is
    ResBlock, AttentionBlock, ResBlock; output blocks run over the levels in reverse with num_res_blocks + 1
    blocks [ResBlock on the concatenated skip, AttentionBlock?, Upsample on the last block of each level but
    level 0]. A ResBlock has a 1x1 skip convolution exactly when its input and output widths differ."""
    e, P = [], prefix
    widths = [arch['model_channels'] * m for m in arch['channel_mult']]
    nrb, attn, heads = arch['num_res_blocks'], arch['attention_levels'], arch['heads']
    _module(e, P + 'input_blocks.0.0', 'conv_in')
    _module(e, P + 'time_embed.0', 'time_embedding.linear_1')
    _module(e, P + 'time_embed.2', 'time_embedding.linear_2')
    ch, skips, idx = arch['model_channels'], [arch['model_channels']], 1
    for level, width in enumerate(widths):
        for j in range(nrb):
            _openai_resblock(e, f'{P}input_blocks.{idx}.0', f'down_blocks.{level}.resnets.{j}', ch != width)
            ch = width
            if attn[level]:
                _openai_attention(e, f'{P}input_blocks.{idx}.1', f'down_blocks.{level}.attentions.{j}', heads(ch))
            skips.append(ch)
            idx += 1
        if level != len(widths) - 1:
            _module(e, f'{P}input_blocks.{idx}.0.op', f'down_blocks.{level}.downsamplers.0.conv')
            skips.append(ch)
            idx += 1
    _openai_resblock(e, P + 'middle_block.0', 'mid_block.resnets.0', False)
    _openai_attention(e, P + 'middle_block.1', 'mid_block.attentions.0', heads(ch))
    _openai_resblock(e, P + 'middle_block.2', 'mid_block.resnets.1', False)
    idx = 0
    for up, level in enumerate(reversed(range(len(widths)))):
        for j in range(nrb + 1):
            width = widths[level]
            _openai_resblock(e, f'{P}output_blocks.{idx}.0', f'up_blocks.{up}.resnets.{j}', ch + skips.pop() != width)
            ch, sub = width, 1
            if attn[level]:
                _openai_attention(e, f'{P}output_blocks.{idx}.1', f'up_blocks.{up}.attentions.{j}', heads(ch))
                sub = 2
            if level and j == nrb:
                _module(e, f'{P}output_blocks.{idx}.{sub}.conv', f'up_blocks.{up}.upsamplers.0.conv')
            idx += 1
    _module(e, P + 'out.0', 'conv_norm_out')
    _module(e, P + 'out.2', 'conv_out')
    return e


def _taming_resblock(entries, src, dst, shortcut):
    for name in ('norm1', 'conv1', 'norm2', 'conv2'):
        _module(entries, f'{src}.{name}', f'{dst}.{name}')
    if shortcut:
        _module(entries, f'{src}.nin_shortcut', f'{dst}.conv_shortcut')


def _taming_mid(entries, src, dst):
    _taming_resblock(entries, f'{src}.block_1', f'{dst}.resnets.0', False)
    _module(entries, f'{src}.attn_1.norm', f'{dst}.attentions.0.group_norm')
    for s, d in (('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'), ('proj_out', 'to_out.0')):
        _module(entries, f'{src}.attn_1.{s}', f'{dst}.attentions.0.{d}', trailing=2)  # 1x1 conv2d -> linear
    _taming_resblock(entries, f'{src}.block_2', f'{dst}.resnets.1', False)


def first_stage_key_map(arch, prefix='first_stage_model.'):
    """Entries for a taming Encoder/Decoder autoencoder (VQ or KL; `arch` from ldm_layout) -> VQModel or
    AutoencoderKL. The decoder's levels are stored by resolution (up.0 is the full-resolution level) while
    diffusers orders up_blocks in the order they run, so up_blocks.k is up.(n - 1 - k)."""
    e, P = [], prefix
    widths = [arch['ch'] * m for m in arch['ch_mult']]
    n, nrb = len(widths), arch['num_res_blocks']
    _module(e, P + 'encoder.conv_in', 'encoder.conv_in')
    ch = arch['ch']
    for i, width in enumerate(widths):
        for j in range(nrb):
            _taming_resblock(e, f'{P}encoder.down.{i}.block.{j}', f'encoder.down_blocks.{i}.resnets.{j}', ch != width)
            ch = width
        if i != n - 1:
            _module(e, f'{P}encoder.down.{i}.downsample.conv', f'encoder.down_blocks.{i}.downsamplers.0.conv')
    _taming_mid(e, P + 'encoder.mid', 'encoder.mid_block')
    _module(e, P + 'encoder.norm_out', 'encoder.conv_norm_out')
    _module(e, P + 'encoder.conv_out', 'encoder.conv_out')
    _module(e, P + 'decoder.conv_in', 'decoder.conv_in')
    _taming_mid(e, P + 'decoder.mid', 'decoder.mid_block')
    ch = widths[-1]
    for k, i in enumerate(reversed(range(n))):
        for j in range(nrb + 1):
            _taming_resblock(e, f'{P}decoder.up.{i}.block.{j}', f'decoder.up_blocks.{k}.resnets.{j}', ch != widths[i])
            ch = widths[i]
        if i != 0:
            _module(e, f'{P}decoder.up.{i}.upsample.conv', f'decoder.up_blocks.{k}.upsamplers.0.conv')
    _module(e, P + 'decoder.norm_out', 'decoder.conv_norm_out')
    _module(e, P + 'decoder.conv_out', 'decoder.conv_out')
    _module(e, P + 'quant_conv', 'quant_conv')
    _module(e, P + 'post_quant_conv', 'post_quant_conv')
    if arch['kind'] == 'vq':
        _module(e, P + 'quantize.embedding', 'quantize.embedding', params=('weight',))
    return e


def dit_key_map(num_layers):
    """Entries for a facebookresearch DiT state dict -> DiTTransformer2DModel. DiT has one timestep and one
    class embedder; diffusers keeps a copy in every block's AdaLayerNormZero (and uses block 0's for the final
    modulation), so those tensors go to every block. The fixed sin-cos `pos_embed` is not a diffusers weight: it
    is checked against diffusers' table instead (convert_dit)."""
    e = []
    _module(e, 'x_embedder.proj', 'pos_embed.proj')
    blocks = [f'transformer_blocks.{i}' for i in range(num_layers)]
    _module(e, 't_embedder.mlp.0', [f'{b}.norm1.emb.timestep_embedder.linear_1' for b in blocks])
    _module(e, 't_embedder.mlp.2', [f'{b}.norm1.emb.timestep_embedder.linear_2' for b in blocks])
    _module(e, 'y_embedder.embedding_table', [f'{b}.norm1.emb.class_embedder.embedding_table' for b in blocks],
            params=('weight',))
    for i, b in enumerate(blocks):
        # adaLN rows are (shift, scale, gate) for attention then MLP in both layouts
        _module(e, f'blocks.{i}.adaLN_modulation.1', f'{b}.norm1.linear')
        _module(e, f'blocks.{i}.attn.qkv', [f'{b}.attn1.to_q', f'{b}.attn1.to_k', f'{b}.attn1.to_v'], heads=1)
        _module(e, f'blocks.{i}.attn.proj', f'{b}.attn1.to_out.0')
        _module(e, f'blocks.{i}.mlp.fc1', f'{b}.ff.net.0.proj')
        _module(e, f'blocks.{i}.mlp.fc2', f'{b}.ff.net.2')
    _module(e, 'final_layer.adaLN_modulation.1', 'proj_out_1')  # (shift, scale) in both
    _module(e, 'final_layer.linear', 'proj_out_2')
    return e


def source_shapes(entries, target_shapes):
    """Original key -> the shape it must have, given the diffusers model's shapes."""
    shapes = {}
    for src, dsts, heads, trailing in entries:
        shape = tuple(target_shapes[dsts[0]])
        if heads is not None:
            shape = (3 * shape[0],) + shape[1:]
        shapes[src] = shape + (1,) * trailing
    return shapes


def apply_key_map(state, entries, target_shapes, name, config_name, scope='', ignore=()):
    """Diffusers tensors from the original `state`, after checking every key and shape; errors name the first
    problem. Keys starting with `scope` that no entry uses are errors too, except those starting with `ignore`."""
    expected = source_shapes(entries, target_shapes)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelError(f"{name} lacks {len(missing)} weight(s) that {config_name} implies (first: {missing[0]}); "
                         f"the checkpoint and its config do not belong together")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ModelError(f"{name}: {key} has shape {list(state[key].shape)} where {config_name} implies "
                             f"{list(shape)}; the checkpoint and its config do not belong together")
    extra = [k for k in state if k.startswith(scope) and k not in expected and not k.startswith(tuple(ignore))]
    if extra:
        raise ModelError(f"{name} has {len(extra)} weight(s) that {config_name} does not describe (first: "
                         f"{extra[0]}); the checkpoint and its config do not belong together")
    out = {}
    for src, dsts, heads, _ in entries:
        tensor = state[src]
        if heads is None:
            for d in dsts:
                out[d] = tensor.reshape(target_shapes[d]).clone()
        else:
            parts = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
            for i, d in enumerate(dsts):
                out[d] = parts[:, i].reshape(target_shapes[d]).clone()
    return out


def _empty(cls, config):
    """The diffusers model of `config` with parameters on the meta device (no time spent on random init)."""
    with torch.device('meta'):
        return cls.from_config(config)


def _filled(model, tensors):
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def filled_model(cls, config, tensors, name, config_name):
    """cls(config) holding exactly `tensors`: every weight present, none left over, shapes equal."""
    model = _empty(cls, config)
    shapes = _shapes(model)
    missing = [k for k in shapes if k not in tensors]
    extra = [k for k in tensors if k not in shapes]
    wrong = [k for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    for keys, what in ((missing, 'lacks'), (extra, 'has extra'), (wrong, 'has wrongly shaped')):
        if keys:
            raise ModelError(f"{name} {what} {cls.__name__} weights for the config of {config_name} (first: "
                             f"{keys[0]}); the file and the config are not the same model")
    return _filled(model, tensors)


def transformer_from_original(cls, state, config, name, config_name):
    """An SD3/FLUX transformer from a single file: diffusers' own key conversion of the original layout (SD3's
    MMDiT names, Black Forest Labs' FLUX names), or the tensors as they are when the file has diffusers names.

    This is what `from_single_file` does, minus two things that matter here: it loads with strict=False (a
    weight the conversion did not produce would stay random without a word) and, without accelerate, it runs
    the random initialisation of the full model first (minutes for FLUX's 12B parameters)."""
    from diffusers.loaders import single_file_utils
    convert = {'SD3Transformer2DModel': single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers,
               'FluxTransformer2DModel': single_file_utils.convert_flux_transformer_checkpoint_to_diffusers}
    keys = set(_shapes(_empty(cls, config)))
    if keys <= set(state):
        tensors = {k: state[k] for k in keys}
    else:
        try:
            tensors = convert[cls.__name__](dict(state), config=config)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise ModelError(f"{name}: diffusers' conversion to {cls.__name__} failed ({type(e).__name__}: "
                             f"{_first_line(e)}); the file is not an original-layout checkpoint of the model in "
                             f"{config_name}")
    return filled_model(cls, config, tensors, name, config_name)


# ----------------------------------------------------------------------------------------------------------------
# CompVis LDM.

def read_ldm_config(path):
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ModelError(f"cannot read the LDM config {path} ({type(e).__name__}: {_first_line(e)})")


def ldm_config_path(ckpt_path, original_config=None):
    """The yaml of a CompVis checkpoint: `original_config`, else config.yaml or <name>.yaml beside it."""
    if original_config is not None:
        if not os.path.isfile(original_config):
            raise ModelError(f"original_config {original_config} does not exist")
        return str(original_config)
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    candidates = [os.path.join(folder, 'config.yaml'), os.path.splitext(os.path.abspath(ckpt_path))[0] + '.yaml']
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ModelError(f"{ckpt_path} needs its LDM config: put it beside the checkpoint as config.yaml (for LSUN "
                     f"bedrooms: latent-diffusion's models/ldm/lsun_beds256/config.yaml) or pass original_config")


def _unet_layout(unet, config_name):
    """UNet2DModel config and key-map architecture of openaimodel UNetModel params."""
    for key, ok in (('dims', 2), ('conv_resample', True), ('resblock_updown', False)):
        if unet.get(key, ok) != ok:
            raise ModelError(f"{config_name}: unet_config {key}={unet[key]} is not supported (UNet2DModel has no "
                             f"equivalent)")
    mc, mult, nrb = unet['model_channels'], list(unet['channel_mult']), unet['num_res_blocks']
    if not isinstance(nrb, int):
        raise ModelError(f"{config_name}: per-level num_res_blocks {nrb} is not supported")
    widths = [mc * m for m in mult]
    attention_levels = [2 ** level in set(unet.get('attention_resolutions') or ()) for level in range(len(mult))]
    head_channels = unet.get('num_head_channels', -1)
    num_heads, num_heads_up = unet.get('num_heads', -1), unet.get('num_heads_upsample', -1)
    num_heads_up = num_heads if num_heads_up == -1 else num_heads_up
    # (channels, heads) of every attention block; UNet2DModel takes one head width for all of them
    blocks = [(w, num_heads) for w, a in zip(widths, attention_levels) if a] + [(widths[-1], num_heads)] + \
             [(w, num_heads_up) for w, a in zip(widths, attention_levels) if a]
    if head_channels == -1 and num_heads == -1:
        raise ModelError(f"{config_name}: unet_config sets neither num_heads nor num_head_channels")
    if head_channels != -1:
        head_dim = head_channels
        if any(w % head_dim for w, _ in blocks):
            raise ModelError(f"{config_name}: num_head_channels {head_dim} does not divide every attention width")
    elif all(h == 1 for _, h in blocks):
        head_dim = None  # one head per block, whatever its width (UNet2DModel's attention_head_dim=None)
    else:
        dims = {w // h for w, h in blocks}
        if len(dims) != 1 or any(w % h for w, h in blocks):
            raise ModelError(f"{config_name}: num_heads={num_heads} gives attention heads of different widths "
                             f"{sorted(dims)}; UNet2DModel needs one head width")
        head_dim = dims.pop()
    legacy = not unet.get('use_new_attention_order', False)
    # the legacy qkv interleaves heads; the new order is three contiguous thirds (a split with one "head")
    heads = (lambda ch: (ch // head_dim if head_dim else 1)) if legacy else (lambda ch: 1)
    unet_config = dict(
        sample_size=unet.get('image_size'), in_channels=unet['in_channels'], out_channels=unet['out_channels'],
        block_out_channels=widths, layers_per_block=nrb,
        down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attention_levels],
        up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention_levels)],
        attention_head_dim=head_dim, norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift='scale_shift' if unet.get('use_scale_shift_norm') else 'default',
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn='silu', time_embedding_type='positional')
    unet_arch = dict(model_channels=mc, channel_mult=mult, num_res_blocks=nrb, attention_levels=attention_levels,
                     heads=heads)
    return unet_config, unet_arch


def _first_stage_layout(first, config_name):
    """VQModel/AutoencoderKL class and config, and key-map architecture, of a taming first_stage_config."""
    target = str(first.get('target', ''))
    fp = first.get('params') or {}
    dd = fp.get('ddconfig') or {}
    kind = 'vq' if 'VQ' in target.rsplit('.', 1)[-1] else 'kl' if 'KL' in target.rsplit('.', 1)[-1] else None
    if kind is None or not dd:
        raise ModelError(f"{config_name}: first stage {target or '?'} is not a taming VQ or KL autoencoder")
    if dd.get('attn_resolutions'):
        raise ModelError(f"{config_name}: a first stage with attention at resolutions {dd['attn_resolutions']} is "
                         f"not supported")
    if list(dd['ch_mult'])[0] != 1:
        raise ModelError(f"{config_name}: first-stage ch_mult must start with 1 (diffusers' encoder stem)")
    first_arch = dict(kind=kind, ch=dd['ch'], ch_mult=list(dd['ch_mult']), num_res_blocks=dd['num_res_blocks'])
    n = len(dd['ch_mult'])
    vae_config = dict(in_channels=dd.get('in_channels', 3), out_channels=dd.get('out_ch', 3),
                      down_block_types=['DownEncoderBlock2D'] * n, up_block_types=['UpDecoderBlock2D'] * n,
                      block_out_channels=[dd['ch'] * m for m in dd['ch_mult']], layers_per_block=dd['num_res_blocks'],
                      act_fn='silu', latent_channels=dd['z_channels'], norm_num_groups=32,
                      sample_size=dd.get('resolution', 256))
    embed_dim = fp.get('embed_dim', dd['z_channels'])
    if kind == 'vq':
        vae_class = 'VQModel'
        vae_config.update(num_vq_embeddings=fp['n_embed'], vq_embed_dim=embed_dim)
    else:
        vae_class = 'AutoencoderKL'
        if embed_dim != dd['z_channels'] or not dd.get('double_z', True):
            raise ModelError(f"{config_name}: a KL first stage needs embed_dim == z_channels and double_z")
    return vae_class, vae_config, first_arch, embed_dim


def ldm_layout(original, config_name):
    """Diffusers configs and key-map architecture of a CompVis LatentDiffusion config (the parsed yaml)."""
    model = (original or {}).get('model') or {}
    params = model.get('params') or {}
    unet = ((params.get('unet_config') or {}).get('params')) or {}
    first = params.get('first_stage_config') or {}
    if not unet or not first:
        raise ModelError(f"{config_name} is not a CompVis LatentDiffusion config (no model.params.unet_config and "
                         f"first_stage_config)")
    conditional = [k for k in ('context_dim', 'num_classes', 'use_spatial_transformer') if unet.get(k)]
    cond_stage = params.get('cond_stage_config', '__is_unconditional__')
    if conditional or params.get('conditioning_key') or cond_stage not in (None, '__is_unconditional__'):
        raise ModelError(f"{config_name} describes a conditional LDM; family ldm loads unconditional ones (text-"
                         f"conditional SD-layout checkpoints load with family sd)")
    try:
        unet_config, unet_arch = _unet_layout(unet, config_name)
        vae_class, vae_config, first_arch, embed_dim = _first_stage_layout(first, config_name)
    except KeyError as e:
        raise ModelError(f"{config_name}: the unet or first-stage params lack {e}")
    if embed_dim != unet['in_channels']:
        raise ModelError(f"{config_name}: the UNet takes {unet['in_channels']} channels, the first stage gives "
                         f"{embed_dim}")

    prediction = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}.get(params.get('parameterization', 'eps'))
    if prediction is None:
        raise ModelError(f"{config_name}: parameterization {params.get('parameterization')} is not supported")
    schedule = params.get('beta_schedule', 'linear')
    if schedule != 'linear' or params.get('given_betas') is not None:
        raise ModelError(f"{config_name}: beta_schedule {schedule} is not supported (LDM's 'linear' only)")
    # LDM's "linear" schedule is linear in sqrt(beta): diffusers' scaled_linear
    scheduler = dict(num_train_timesteps=int(params.get('timesteps', 1000)),
                     beta_start=float(params.get('linear_start', 1e-4)), beta_end=float(params.get('linear_end', 2e-2)),
                     beta_schedule='scaled_linear', prediction_type=prediction, clip_sample=False)
    return dict(unet_config=unet_config, unet_arch=unet_arch, vae_class=vae_class, vae_config=vae_config,
                first_arch=first_arch, scheduler=scheduler, scale_factor=float(params.get('scale_factor', 1.0)))


def _ema_substituted(state, name, prefix='model.diffusion_model.'):
    """The state with the UNet weights replaced by their EMA (LDM's LitEma keeps them as model_ema.<parameter
    name without dots>), as LDM's sampling script runs under ema_scope. Unchanged when there is no EMA."""
    ema = {k[len('model_ema.'):]: v for k, v in state.items() if k.startswith('model_ema.')}
    if not ema:
        return state
    names = {}
    for key in state:
        if key.startswith(prefix):
            names.setdefault(('diffusion_model.' + key[len(prefix):]).replace('.', ''), []).append(key)
    out = dict(state)
    for short, keys in names.items():
        if len(keys) > 1:
            raise ModelError(f"{name}: the EMA names of {keys[0]} and {keys[1]} coincide once dots are dropped; "
                             f"load it with use_ema=False")
        if short not in ema:
            raise ModelError(f"{name} has EMA weights (model_ema.*) but none for {keys[0]}; load it with "
                             f"use_ema=False")
        out[keys[0]] = ema[short]
    return out


def check_ldm_state(state, name):
    kind = guess_family(state)
    if kind != 'ldm':
        hint = f"; its keys are those of family {kind}" if kind else ''
        raise ModelError(f"{name} is not a CompVis LDM checkpoint (no model.diffusion_model.input_blocks.* without "
                         f"cond_stage_model.*){hint}")
    if not any(k.startswith('first_stage_model.') for k in state):
        raise ModelError(f"{name} has no first_stage_model.* weights; a LatentDiffusion checkpoint saved with its "
                         f"autoencoder is needed")


def convert_ldm(state, original, name='checkpoint', config_name='config', use_ema=True):
    """CompVis LatentDiffusion state dict + parsed yaml -> dict(unet, vae, scheduler, latent_scale, ema)."""
    import diffusers
    from diffusers import DDPMScheduler
    check_ldm_state(state, name)
    layout = ldm_layout(original, config_name)
    has_ema = any(k.startswith('model_ema.') for k in state)
    if use_ema:
        state = _ema_substituted(state, name)
    unet = _empty(diffusers.UNet2DModel, layout['unet_config'])
    vae = _empty(getattr(diffusers, layout['vae_class']), layout['vae_config'])
    unet_tensors = apply_key_map(state, unet_key_map(layout['unet_arch']), _shapes(unet), name, config_name,
                                 scope='model.diffusion_model.')
    vae_tensors = apply_key_map(state, first_stage_key_map(layout['first_arch']), _shapes(vae), name, config_name,
                                scope='first_stage_model.',
                                ignore=('first_stage_model.loss.', 'first_stage_model.quantize.used'))
    sched = layout['scheduler']
    if 'alphas_cumprod' in state:  # the checkpoint's own schedule buffer must be the one the yaml describes
        ours = DDPMScheduler(**{k: v for k, v in sched.items() if k != 'prediction_type'}).alphas_cumprod
        theirs = state['alphas_cumprod'].to(torch.float64)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours.to(torch.float64), rtol=1e-4, atol=1e-7):
            raise ModelError(f"{name}: its alphas_cumprod buffer differs from the schedule of {config_name} "
                             f"(linear_start/linear_end/timesteps)")
    # LDM keeps a scale_factor buffer when it was set from the data (scale_by_std); it wins over the yaml's
    scale = float(state['scale_factor']) if 'scale_factor' in state else layout['scale_factor']
    vae.register_to_config(scaling_factor=scale)
    return dict(unet=_filled(unet, unet_tensors), vae=_filled(vae, vae_tensors), scheduler=dict(sched),
                latent_scale=scale, ema=use_ema and has_ema)


def load_ldm_checkpoint(path, original_config=None, use_ema=True):
    """A CompVis LDM .ckpt (its yaml: `original_config`, else beside it) -> convert_ldm's dict."""
    state = checkpoint_state(read_checkpoint(path), path)
    check_ldm_state(state, path)  # before asking for a yaml: the file may be of another family
    config_path = ldm_config_path(path, original_config)
    original = read_ldm_config(config_path)
    return convert_ldm(state, original, name=path, config_name=config_path, use_ema=use_ema)


# ----------------------------------------------------------------------------------------------------------------
# DiT.

DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, -B, -L, -XL


def dit_config(state, name='checkpoint', num_attention_heads=None):
    """DiTTransformer2DModel config from the shapes of a DiT state dict (heads: the DiT size table, or given)."""
    for key in ('x_embedder.proj.weight', 'y_embedder.embedding_table.weight', 'final_layer.linear.weight',
                'pos_embed', 'blocks.0.attn.qkv.weight'):
        if key not in state:
            kind = guess_family(state)
            hint = f"; its keys are those of family {kind}" if kind and kind != 'dit' else ''
            raise ModelError(f"{name} is not a DiT checkpoint (no {key}){hint}")
    hidden, channels, patch = state['x_embedder.proj.weight'].shape[:3]
    heads = num_attention_heads or DIT_HEADS.get(hidden)
    if not heads or hidden % heads:
        raise ModelError(f"{name}: hidden size {hidden} is not a DiT-S/B/L/XL width; pass num_attention_heads")
    tokens = state['pos_embed'].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ModelError(f"{name}: pos_embed has {tokens} tokens, not a square grid")
    if state['blocks.0.mlp.fc1.weight'].shape[0] != 4 * hidden:
        raise ModelError(f"{name}: MLP width {state['blocks.0.mlp.fc1.weight'].shape[0]} is not 4 x {hidden}")
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    return dict(num_attention_heads=int(heads), attention_head_dim=int(hidden // heads), in_channels=int(channels),
                out_channels=int(state['final_layer.linear.weight'].shape[0] // (patch * patch)), num_layers=depth,
                sample_size=int(grid * patch), patch_size=int(patch),
                num_embeds_ada_norm=int(state['y_embedder.embedding_table.weight'].shape[0] - 1),  # + the null class
                norm_eps=1e-6)  # DiT's LayerNorms use 1e-6 (diffusers' default is 1e-5)


def convert_dit(state, name='checkpoint', num_attention_heads=None):
    """facebookresearch DiT state dict -> DiTTransformer2DModel (fp32)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    config = dit_config(state, name, num_attention_heads)
    model = _empty(DiTTransformer2DModel, config)
    tensors = apply_key_map(state, dit_key_map(config['num_layers']), _shapes(model), name,
                            f"the shapes of {name}", ignore=('pos_embed',))
    _filled(model, tensors)
    # the sin-cos table is a non-persistent buffer in diffusers: recompute it as DiT's PatchEmbed does and check
    # that it is the table the checkpoint was trained with
    embed = model.pos_embed
    grid = config['sample_size'] // config['patch_size']
    table = get_2d_sincos_pos_embed(model.inner_dim, grid, base_size=embed.base_size,
                                    interpolation_scale=embed.interpolation_scale, output_type='pt')
    table = table.float().unsqueeze(0)
    if table.shape != state['pos_embed'].shape or not torch.allclose(table, state['pos_embed'].float(), atol=1e-5):
        raise ModelError(f"{name}: pos_embed is not the fixed sin-cos table diffusers' DiT uses")
    embed.register_buffer('pos_embed', table, persistent=False)
    return model


def load_dit_checkpoint(path, num_attention_heads=None):
    state = checkpoint_state(read_checkpoint(path), path)
    return convert_dit(state, name=path, num_attention_heads=num_attention_heads)


# ----------------------------------------------------------------------------------------------------------------
# Writing a diffusers folder.

def write_folder(pipeline, dest):
    """save_pretrained into a temporary folder beside `dest`, renamed to `dest` once complete."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        raise ModelError(f"{dest} exists; remove it or choose another --dest")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dest) + '.tmp-', dir=parent)
    try:
        pipeline.save_pretrained(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ldm_pipeline(parts):
    from diffusers import DDIMScheduler
    from diffusers.pipelines import LDMPipeline
    return LDMPipeline(vqvae=parts['vae'], unet=parts['unet'], scheduler=DDIMScheduler(**parts['scheduler']))


def dit_pipeline(transformer, single_file_config):
    from diffusers import DDIMScheduler, DiTPipeline
    from models.pipeline_folder import single_file_folder
    folder = single_file_folder(single_file_config, 'dit', 'a DiT checkpoint', ('vae', 'scheduler'))
    scheduler = DDIMScheduler.from_config(folder.scheduler_config())
    return DiTPipeline(transformer=transformer, vae=folder.component('vae'), scheduler=scheduler)


@click.command()
@click.option('--src', help='Original checkpoint: CompVis LDM .ckpt or DiT .pt', metavar='PATH', type=str,
              required=True)
@click.option('--dest', help='Diffusers pipeline folder to write (must not exist)', metavar='DIR', type=str,
              required=True)
@click.option('--family', help='Family of --src (default: from its keys)', metavar='ldm|dit',
              type=click.Choice(['ldm', 'dit']), default=None)
@click.option('--original_config', help='LDM: its config yaml (default: config.yaml beside --src)', metavar='YAML',
              type=str, default=None)
@click.option('--use_ema', help='LDM: use the EMA weights when the checkpoint has them', metavar='BOOL', type=bool,
              default=True, show_default=True)
@click.option('--single_file_config', help='DiT: diffusers DiT folder or hub id for the VAE and scheduler',
              metavar='DIR|ID', type=str, default='facebook/DiT-XL-2-256', show_default=True)
@click.option('--num_attention_heads', help='DiT: heads, if not a DiT-S/B/L/XL width', metavar='INT', type=int,
              default=None)
def main(src, dest, family, original_config, use_ema, single_file_config, num_attention_heads):
    """Convert a CompVis LDM or facebookresearch DiT checkpoint to a diffusers pipeline folder."""
    try:
        if os.path.exists(dest):  # before the conversion, which takes a while on the real models
            raise ModelError(f"{dest} exists; remove it or choose another --dest")
        state = checkpoint_state(read_checkpoint(src), src)
        family = family or guess_family(state)
        if family == 'ldm':
            check_ldm_state(state, src)
            config_path = ldm_config_path(src, original_config)
            parts = convert_ldm(state, read_ldm_config(config_path), src, config_path, use_ema)
            pipeline, note = ldm_pipeline(parts), ' (EMA weights)' if parts['ema'] else ''
        elif family == 'dit':
            pipeline, note = dit_pipeline(convert_dit(state, src, num_attention_heads), single_file_config), ''
        else:
            hint = f" (it looks like family {family}, which loads the single file directly)" if family else ''
            raise ModelError(f"{src} is neither a CompVis LDM nor a DiT checkpoint{hint}")
        written = write_folder(pipeline, dest)
    except ModelError as e:
        raise click.ClickException(str(e))
    print(f'Wrote {written}{note}; load it with family {family} and model_path={written}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
