"""Original-layout checkpoints (CompVis LDM, facebookresearch DiT, SD3/FLUX single files) through our converters.

The original checkpoints here come from small re-implementations of the original networks written in this file
(openaimodel UNetModel, taming autoencoder, DiT), whose state_dict names follow the original module structure;
nothing is generated from the converters' key maps. Their forward passes are the references the converted
diffusers models must match. REAL_LDM_KEYS pins the names and shapes of the real LSUN-bedroom checkpoint.
"""
import argparse
import math
import os
import sys
import types

import pytest
import torch
import yaml
from torch import nn
import torch.nn.functional as F

import models
from models import ModelError
from models import latent_convert as lc

# ----------------------------------------------------------------------------------------------------------------
# A small openaimodel UNetModel and taming autoencoder (original module names, original forward passes).


class Seq(nn.Sequential):
    """openaimodel's TimestepEmbedSequential: the time embedding goes to the blocks that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttnBlock, Down, Up)) else layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttnBlock(nn.Module):
    """openaimodel AttentionBlock; legacy order: the fused qkv rows are [q k v] per head."""

    def __init__(self, ch, heads, legacy):
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        if self.legacy:
            q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        else:
            q, k, v = [t.reshape(b * self.heads, d, -1) for t in qkv.chunk(3, dim=1)]
        weights = torch.einsum('bct,bcs->bts', q, k).div(math.sqrt(d)).softmax(dim=-1)
        a = torch.einsum('bts,bcs->bct', weights, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class OpenAIUNet(nn.Module):
    def __init__(self, p):
        super().__init__()
        mc, mult, nrb = p['model_channels'], p['channel_mult'], p['num_res_blocks']
        attn_at, hc = set(p['attention_resolutions']), p['num_head_channels']
        ss, legacy = p.get('use_scale_shift_norm', False), not p.get('use_new_attention_order', False)
        self.mc, emb = mc, 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(p['in_channels'], mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers = [ResBlock(ch, emb, m * mc, ss)]
                ch = m * mc
                if ds in attn_at:
                    layers.append(AttnBlock(ch, ch // hc, legacy))
                self.input_blocks.append(Seq(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Seq(Down(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq(ResBlock(ch, emb, ch, ss), AttnBlock(ch, ch // hc, legacy), ResBlock(ch, emb, ch, ss))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + chans.pop(), emb, m * mc, ss)]
                ch = m * mc
                if ds in attn_at:
                    layers.append(AttnBlock(ch, ch // hc, legacy))
                if level and i == nrb:
                    layers.append(Up(ch))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, p['out_channels'], 3, padding=1))

    def forward(self, x, t):
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([args.cos(), args.sin()], dim=1))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def _norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class TResnet(nn.Module):
    def __init__(self, ch, out):
        super().__init__()
        self.norm1, self.conv1 = _norm(ch), nn.Conv2d(ch, out, 3, padding=1)
        self.norm2, self.conv2 = _norm(out), nn.Conv2d(out, out, 3, padding=1)
        if ch != out:
            self.nin_shortcut = nn.Conv2d(ch, out, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class TAttn(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = [nn.Conv2d(ch, ch, 1) for _ in range(4)]

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = [m(h).reshape(b, c, -1) for m in (self.q, self.k, self.v)]
        w = torch.bmm(q.permute(0, 2, 1), k).mul(c ** -0.5).softmax(dim=2)
        return x + self.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww))


class TMid(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = TResnet(ch, ch), TAttn(ch), TResnet(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class TLevel(nn.Module):
    def __init__(self, blocks, resample=None):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList()
        if resample is not None:
            setattr(self, resample[0], resample[1])


class TResample(nn.Module):
    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class TAutoencoder(nn.Module):
    """taming VQModel (kind vq) or LDM's AutoencoderKL (kind kl): encoder, decoder, quant convs, codebook."""

    def __init__(self, dd, embed_dim, n_embed, kind):
        super().__init__()
        ch, mult, nrb, z = dd['ch'], dd['ch_mult'], dd['num_res_blocks'], dd['z_channels']
        widths = [ch * m for m in mult]
        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(dd['in_channels'], ch, 3, padding=1)
        self.encoder.down, c = nn.ModuleList(), ch
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(nrb):
                blocks.append(TResnet(c, w))
                c = w
            down = ('downsample', TResample(c, True)) if i != len(widths) - 1 else None
            self.encoder.down.append(TLevel(blocks, down))
        self.encoder.mid, self.encoder.norm_out = TMid(c), _norm(c)
        z_out = 2 * z if kind == 'kl' else z
        self.encoder.conv_out = nn.Conv2d(c, z_out, 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(z, widths[-1], 3, padding=1)
        self.decoder.mid = TMid(widths[-1])
        levels, c = [], widths[-1]
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(nrb + 1):
                blocks.append(TResnet(c, widths[i]))
                c = widths[i]
            levels.insert(0, TLevel(blocks, ('upsample', TResample(c, False)) if i != 0 else None))
        self.decoder.up = nn.ModuleList(levels)
        self.decoder.norm_out, self.decoder.conv_out = _norm(c), nn.Conv2d(c, dd['out_ch'], 3, padding=1)
        self.quant_conv = nn.Conv2d(z_out, 2 * embed_dim if kind == 'kl' else embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        if kind == 'vq':
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(n_embed, embed_dim)

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for level in e.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        return self.quant_conv(e.conv_out(F.silu(e.norm_out(e.mid(h)))))

    def decode(self, z):
        if hasattr(self, 'quantize'):  # nearest codebook vector per position
            b, c, hh, ww = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, c)
            codes = self.quantize.embedding.weight
            idx = ((flat[:, None, :] - codes[None]) ** 2).sum(-1).argmin(dim=1)
            z = codes[idx].reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        d = self.decoder
        h = d.mid(d.conv_in(self.post_quant_conv(z)))
        for level in reversed(d.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, 'upsample'):
                h = level.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


class CompVisLDM(nn.Module):
    """The LatentDiffusion module tree, for its state_dict names."""

    def __init__(self, cfg):
        super().__init__()
        params = cfg['model']['params']
        fp = params['first_stage_config']['params']
        kind = 'vq' if 'VQ' in params['first_stage_config']['target'] else 'kl'
        self.model = nn.Module()
        self.model.diffusion_model = OpenAIUNet(params['unet_config']['params'])
        self.first_stage_model = TAutoencoder(fp['ddconfig'], fp['embed_dim'], fp.get('n_embed'), kind)


def tiny_ldm_config(kind='vq', use_scale_shift_norm=False, use_new_attention_order=False):
    """A LatentDiffusion yaml in the CompVis layout: 8x8x3 latents (VQ) of 16x16 images."""
    first = dict(embed_dim=3, ddconfig=dict(double_z=kind == 'kl', z_channels=3, resolution=16, in_channels=3,
                                            out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                            dropout=0.0), lossconfig=dict(target='torch.nn.Identity'))
    if kind == 'vq':
        first['n_embed'] = 16
    target = 'ldm.models.autoencoder.VQModelInterface' if kind == 'vq' else 'ldm.models.autoencoder.AutoencoderKL'
    unet = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[4, 2],
                num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=8)
    if use_scale_shift_norm:
        unet['use_scale_shift_norm'] = True
    if use_new_attention_order:
        unet['use_new_attention_order'] = True
    return {'model': {'base_learning_rate': 2.0e-06, 'target': 'ldm.models.diffusion.ddpm.LatentDiffusion',
                      'params': {'linear_start': 0.0015, 'linear_end': 0.0195, 'timesteps': 1000,
                                 'first_stage_key': 'image', 'image_size': 8, 'channels': 3,
                                 'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel',
                                                 'params': unet},
                                 'first_stage_config': {'target': target, 'params': first},
                                 'cond_stage_config': '__is_unconditional__'}}}


def ldm_schedule_buffers(cfg):
    """LDM's registered schedule buffers: betas linear in sqrt(beta), computed in float64, stored float32."""
    p = cfg['model']['params']
    betas = torch.linspace(p['linear_start'] ** 0.5, p['linear_end'] ** 0.5, p['timesteps'], dtype=torch.float64) ** 2
    return {'betas': betas.float(), 'alphas_cumprod': torch.cumprod(1 - betas, 0).float()}


def build_compvis_ldm(folder, seed=0, ema=False, **config_options):
    """folder/model.ckpt + folder/config.yaml in the layout of the CompVis LDM releases. Returns the reference
    module (its weights are the checkpoint's model.* / first_stage_model.* weights)."""
    os.makedirs(folder, exist_ok=True)
    cfg = tiny_ldm_config(**config_options)
    torch.manual_seed(seed)
    ref = CompVisLDM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no exactly-zero or exactly-one parameters: swaps would show
    state = dict(ref.state_dict())
    state.update(ldm_schedule_buffers(cfg))
    if ema:  # LitEma: one buffer per UNet parameter, named without dots; here different from the raw weights
        for key, value in list(state.items()):
            if key.startswith('model.diffusion_model.'):
                state['model_ema.' + key[len('model.'):].replace('.', '')] = value + 0.01
        state['model_ema.decay'] = torch.tensor(0.9999)
        state['model_ema.num_updates'] = torch.tensor(100, dtype=torch.int)
    torch.save({'state_dict': state, 'global_step': 12, 'epoch': 3}, os.path.join(folder, 'model.ckpt'))
    with open(os.path.join(folder, 'config.yaml'), 'w') as f:
        yaml.safe_dump(cfg, f)
    return ref


@pytest.fixture(scope='module')
def compvis(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('compvis') / 'lsun_tiny')
    ref = build_compvis_ldm(folder)
    return dict(folder=folder, ckpt=os.path.join(folder, 'model.ckpt'), ref=ref)


# ----------------------------------------------------------------------------------------------------------------
# LDM: key coverage, numerical equality with the original networks.

@pytest.mark.parametrize('options', [{}, {'use_scale_shift_norm': True, 'use_new_attention_order': True},
                                     {'kind': 'kl'}])
def test_ldm_conversion_matches_the_original_networks(tmp_path, options):
    ref = build_compvis_ldm(str(tmp_path), seed=1, **options)
    state = torch.load(tmp_path / 'model.ckpt', weights_only=True)['state_dict']
    layout = lc.ldm_layout(tiny_ldm_config(**options), 'config.yaml')
    parts = lc.convert_ldm(dict(state), tiny_ldm_config(**options))
    # every original weight is used exactly where the map says, and the map covers every diffusers weight
    entries = lc.unet_key_map(layout['unet_arch']) + lc.first_stage_key_map(layout['first_arch'])
    targets = {**lc._shapes(parts['unet']), **lc._shapes(parts['vae'])}
    expected = lc.source_shapes(entries, targets)
    ours = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert expected == ours
    assert sorted(d for _, dsts, _, _ in entries for d in dsts) == sorted(targets)
    # the same function: UNet at integer and fractional timesteps, autoencoder both ways
    torch.manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 517.25])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(parts['unet'](x, t).sample, ref.model.diffusion_model(x, t), atol=1e-5, rtol=1e-4)
        fs = ref.first_stage_model
        if options.get('kind') == 'kl':
            moments = parts['vae'].quant_conv(parts['vae'].encoder(images))
            torch.testing.assert_close(moments, fs.encode(images), atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(parts['vae'].encode(images).latents, fs.encode(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(parts['vae'].decode(x).sample, fs.decode(x), atol=1e-5, rtol=1e-4)
    assert parts['scheduler']['beta_schedule'] == 'scaled_linear' and parts['latent_scale'] == 1.0


# Names and shapes of the released LSUN-bedroom LDM-4 (lsun_bedrooms.zip model.ckpt), from its architecture:
# model_channels 224, channel_mult 1,2,3,4 (widths 224/448/672/896), 2 res blocks, attention at downsampling 2/4/8
# with 32-channel heads, time embedding 4 x 224; VQ-f4 first stage with ch 128, ch_mult 1,2,4, 8192 x 3 codebook.
REAL_LDM_KEYS = {
    'model.diffusion_model.time_embed.0.weight': [896, 224],
    'model.diffusion_model.time_embed.2.weight': [896, 896],
    'model.diffusion_model.input_blocks.0.0.weight': [224, 3, 3, 3],
    'model.diffusion_model.input_blocks.1.0.in_layers.0.weight': [224],
    'model.diffusion_model.input_blocks.1.0.emb_layers.1.weight': [224, 896],
    'model.diffusion_model.input_blocks.2.0.out_layers.3.weight': [224, 224, 3, 3],
    'model.diffusion_model.input_blocks.3.0.op.weight': [224, 224, 3, 3],
    'model.diffusion_model.input_blocks.4.0.in_layers.2.weight': [448, 224, 3, 3],
    'model.diffusion_model.input_blocks.4.0.skip_connection.weight': [448, 224, 1, 1],
    'model.diffusion_model.input_blocks.4.1.norm.weight': [448],
    'model.diffusion_model.input_blocks.4.1.qkv.weight': [1344, 448, 1],
    'model.diffusion_model.input_blocks.7.1.proj_out.weight': [672, 672, 1],
    'model.diffusion_model.input_blocks.9.0.op.weight': [672, 672, 3, 3],
    'model.diffusion_model.input_blocks.11.1.qkv.bias': [2688],
    'model.diffusion_model.middle_block.0.in_layers.2.weight': [896, 896, 3, 3],
    'model.diffusion_model.middle_block.1.qkv.weight': [2688, 896, 1],
    'model.diffusion_model.middle_block.1.proj_out.weight': [896, 896, 1],
    'model.diffusion_model.middle_block.2.out_layers.3.weight': [896, 896, 3, 3],
    'model.diffusion_model.output_blocks.0.0.skip_connection.weight': [896, 1792, 1, 1],
    'model.diffusion_model.output_blocks.2.2.conv.weight': [896, 896, 3, 3],
    'model.diffusion_model.output_blocks.3.0.in_layers.2.weight': [672, 1568, 3, 3],
    'model.diffusion_model.output_blocks.8.2.conv.weight': [448, 448, 3, 3],
    'model.diffusion_model.output_blocks.9.0.skip_connection.weight': [224, 672, 1, 1],
    'model.diffusion_model.output_blocks.11.0.in_layers.0.weight': [448],
    'model.diffusion_model.out.0.weight': [224],
    'model.diffusion_model.out.2.weight': [3, 224, 3, 3],
    'first_stage_model.encoder.conv_in.weight': [128, 3, 3, 3],
    'first_stage_model.encoder.down.0.downsample.conv.weight': [128, 128, 3, 3],
    'first_stage_model.encoder.down.1.block.0.nin_shortcut.weight': [256, 128, 1, 1],
    'first_stage_model.encoder.down.2.block.1.conv2.weight': [512, 512, 3, 3],
    'first_stage_model.encoder.mid.attn_1.q.weight': [512, 512, 1, 1],
    'first_stage_model.encoder.conv_out.weight': [3, 512, 3, 3],
    'first_stage_model.quant_conv.weight': [3, 3, 1, 1],
    'first_stage_model.quantize.embedding.weight': [8192, 3],
    'first_stage_model.post_quant_conv.weight': [3, 3, 1, 1],
    'first_stage_model.decoder.conv_in.weight': [512, 3, 3, 3],
    'first_stage_model.decoder.mid.attn_1.proj_out.weight': [512, 512, 1, 1],
    'first_stage_model.decoder.up.2.upsample.conv.weight': [512, 512, 3, 3],
    'first_stage_model.decoder.up.1.block.0.nin_shortcut.weight': [256, 512, 1, 1],
    'first_stage_model.decoder.up.0.block.2.conv2.weight': [128, 128, 3, 3],
    'first_stage_model.decoder.conv_out.weight': [3, 128, 3, 3],
}
ABSENT_LDM_KEYS = ['model.diffusion_model.input_blocks.1.1.qkv.weight',      # no attention at full resolution
                   'model.diffusion_model.input_blocks.12.0.op.weight',       # no downsampling after the last level
                   'model.diffusion_model.output_blocks.9.1.qkv.weight',
                   'model.diffusion_model.output_blocks.11.1.conv.weight',
                   'first_stage_model.encoder.down.2.downsample.conv.weight',
                   'first_stage_model.decoder.up.0.upsample.conv.weight']

BEDROOM_YAML = {'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': {
    'linear_start': 0.0015, 'linear_end': 0.0195, 'timesteps': 1000, 'image_size': 64, 'channels': 3,
    'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': {
        'image_size': 64, 'in_channels': 3, 'out_channels': 3, 'model_channels': 224,
        'attention_resolutions': [8, 4, 2], 'num_res_blocks': 2, 'channel_mult': [1, 2, 3, 4],
        'num_head_channels': 32}},
    'first_stage_config': {'target': 'ldm.models.autoencoder.VQModelInterface', 'params': {
        'embed_dim': 3, 'n_embed': 8192, 'ddconfig': {
            'double_z': False, 'z_channels': 3, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
            'ch_mult': [1, 2, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}}},
    'cond_stage_config': '__is_unconditional__'}}}


def test_ldm_key_map_has_the_real_bedroom_names():
    import diffusers
    layout = lc.ldm_layout(BEDROOM_YAML, 'lsun_beds256/config.yaml')
    unet = lc._empty(diffusers.UNet2DModel, layout['unet_config'])       # meta tensors: shapes only
    vae = lc._empty(diffusers.VQModel, layout['vae_config'])
    expected = {**lc.source_shapes(lc.unet_key_map(layout['unet_arch']), lc._shapes(unet)),
                **lc.source_shapes(lc.first_stage_key_map(layout['first_arch']), lc._shapes(vae))}
    assert {k: list(expected.get(k, ())) for k in REAL_LDM_KEYS} == REAL_LDM_KEYS
    assert not [k for k in ABSENT_LDM_KEYS if k in expected]
    with torch.device('meta'):  # the full-size original module tree names exactly the same weights
        original = {k: tuple(v.shape) for k, v in CompVisLDM(BEDROOM_YAML).state_dict().items()}
    assert original == expected
    unet_params = sum(math.prod(s) for k, s in expected.items() if k.startswith('model.'))
    assert round(unet_params / 1e6) == 274  # LDM-4 on LSUN bedrooms: 274M parameters (LDM paper)
    assert layout['unet_config']['attention_head_dim'] == 32 and layout['vae_config']['num_vq_embeddings'] == 8192
    assert layout['scheduler'] == dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                                       beta_schedule='scaled_linear', prediction_type='epsilon', clip_sample=False)


# ----------------------------------------------------------------------------------------------------------------
# LDM: the loader and the command.

def test_load_ldm_from_compvis_checkpoint(compvis, tmp_path):
    net = models.load_denoiser(model_path=compvis['ckpt'], family='ldm')
    assert net.sample_shape == (3, 8, 8) and net.resolution == 16 and net.latent_scale == 1.0
    assert net.sigma_min == pytest.approx(0.0388, abs=1e-4) and net.sigma_max == pytest.approx(83.82, abs=0.01)
    # the denoiser evaluates the original UNet: D = x - sigma eps at the matching timestep
    ref = compvis['ref'].model.diffusion_model
    sigma = float(net.sigma_table[400])
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        eps = ref(x / math.sqrt(1 + sigma ** 2), torch.tensor([400.0]))
        torch.testing.assert_close(net(x, sigma), x - sigma * eps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(net.decode(x), compvis['ref'].first_stage_model.decode(x).clamp(-1, 1),
                                   atol=1e-5, rtol=1e-4)
    # the command writes the same model as a diffusers folder
    from click.testing import CliRunner
    dest = tmp_path / 'ldm-diffusers'
    result = CliRunner().invoke(lc.main, [f'--src={compvis["ckpt"]}', f'--dest={dest}'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ['ldm-diffusers']  # no temporary folder left behind
    folder_net = models.load_denoiser(model_path=str(dest), family='ldm')
    assert folder_net.latent_scale == 1.0
    # the weights are the same bits; the outputs agree to float rounding (a reloaded tensor's memory layout
    # can select a different convolution kernel, so bitwise equality of outputs is not a property of the file)
    ours, theirs = folder_net.network.state_dict(), net.network.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(folder_net(x, sigma), net(x, sigma), atol=1e-5, rtol=1e-5)
    result = CliRunner().invoke(lc.main, [f'--src={compvis["ckpt"]}', f'--dest={dest}'])
    assert result.exit_code != 0 and 'exists' in result.output


def test_ldm_ema_weights_are_used(tmp_path):
    build_compvis_ldm(str(tmp_path), ema=True)
    state = torch.load(tmp_path / 'model.ckpt', weights_only=True)['state_dict']
    cfg = tiny_ldm_config()
    with_ema = lc.convert_ldm(dict(state), cfg)
    without = lc.convert_ldm(dict(state), cfg, use_ema=False)
    assert with_ema['ema'] and not without['ema']
    key = 'model.diffusion_model.input_blocks.4.1.proj_out.weight'
    torch.testing.assert_close(without['unet'].down_blocks[1].attentions[0].to_out[0].weight, state[key][:, :, 0])
    torch.testing.assert_close(with_ema['unet'].down_blocks[1].attentions[0].to_out[0].weight,
                               state['model_ema.diffusion_modelinput_blocks41proj_outweight'][:, :, 0])
    net = models.load_denoiser(model_path=str(tmp_path / 'model.ckpt'), family='ldm', use_ema=False)
    torch.testing.assert_close(net.network.conv_in.weight, state['model.diffusion_model.input_blocks.0.0.weight'])


def test_ldm_checkpoint_errors(compvis, tmp_path):
    import shutil
    state = torch.load(compvis['ckpt'], weights_only=True)['state_dict']
    # no yaml beside it
    lone = tmp_path / 'lone'
    lone.mkdir()
    shutil.copy(compvis['ckpt'], lone / 'model.ckpt')
    with pytest.raises(ModelError, match='needs its LDM config.*config.yaml.*original_config'):
        models.load_denoiser(model_path=str(lone / 'model.ckpt'), family='ldm')
    # ... which original_config supplies
    net = models.load_denoiser(model_path=str(lone / 'model.ckpt'), family='ldm',
                               original_config=os.path.join(compvis['folder'], 'config.yaml'))
    assert net.sample_shape == (3, 8, 8)
    # a yaml of another architecture, a missing weight, a stray weight, another schedule
    wide = tiny_ldm_config()
    wide['model']['params']['unet_config']['params']['model_channels'] = 64
    with pytest.raises(ModelError, match=r'input_blocks.0.0.weight has shape \[32, 3, 3, 3\] where cfg implies '
                                         r'\[64, 3, 3, 3\]'):
        lc.convert_ldm(dict(state), wide, name='ckpt', config_name='cfg')
    short = {k: v for k, v in state.items() if k != 'first_stage_model.decoder.up.1.upsample.conv.bias'}
    with pytest.raises(ModelError, match='lacks 1 weight.*decoder.up.1.upsample.conv.bias'):
        lc.convert_ldm(short, tiny_ldm_config())
    with pytest.raises(ModelError, match='does not describe.*input_blocks.1.1.qkv.weight'):
        lc.convert_ldm({**state, 'model.diffusion_model.input_blocks.1.1.qkv.weight': torch.zeros(96, 32, 1)},
                       tiny_ldm_config())
    other = tiny_ldm_config()
    other['model']['params']['linear_end'] = 0.012
    with pytest.raises(ModelError, match='alphas_cumprod buffer differs'):
        lc.convert_ldm(dict(state), other)
    # checkpoints of other families
    with pytest.raises(ModelError, match='not a CompVis LDM checkpoint.*its keys are those of family sd'):
        lc.convert_ldm({**state, 'cond_stage_model.transformer.x': torch.zeros(1)}, tiny_ldm_config())
    conditional = tiny_ldm_config()
    conditional['model']['params']['cond_stage_config'] = {'target': 'ldm.modules.encoders.modules.ClassEmbedder'}
    with pytest.raises(ModelError, match='conditional LDM'):
        lc.convert_ldm(dict(state), conditional)
    with pytest.raises(ModelError, match='original_config is the yaml of a CompVis'):
        models.load_denoiser(model_path=str(tmp_path), family='ldm', original_config='x.yaml')


class NotWeights:
    """An object a checkpoint must not make us construct."""


def test_weights_only_allowlist(tmp_path, monkeypatch):
    """Lightning checkpoints key callback states by the callback class: allowed by name, as an empty stand-in."""
    module = types.ModuleType('pytorch_lightning.callbacks.model_checkpoint')
    ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    for name in ('pytorch_lightning', 'pytorch_lightning.callbacks', module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    content = {'state_dict': {'w': torch.ones(2)}, 'callbacks': {ModelCheckpoint: {'best_model_score': None}},
               'args': argparse.Namespace(lr=1e-4)}
    for zipped in (True, False):  # torch.save's format since 1.6, and the legacy one
        torch.save(content, tmp_path / f'pl-{zipped}.ckpt', _use_new_zipfile_serialization=zipped)
        torch.save({**content, 'x': NotWeights()}, tmp_path / f'other-{zipped}.ckpt',
                   _use_new_zipfile_serialization=zipped)
    monkeypatch.delitem(sys.modules, module.__name__)  # the class cannot be imported when loading
    for zipped in (True, False):
        obj = lc.read_checkpoint(str(tmp_path / f'pl-{zipped}.ckpt'))
        assert torch.equal(obj['state_dict']['w'], torch.ones(2))
        assert all(isinstance(k, type) and issubclass(k, lc._Placeholder) for k in obj['callbacks'])
        assert isinstance(obj['args'], lc._Placeholder)
        with pytest.raises(ModelError, match=r"objects other than weights \(tests.test_models_convert.NotWeights\)"):
            lc.read_checkpoint(str(tmp_path / f'other-{zipped}.ckpt'))


# ----------------------------------------------------------------------------------------------------------------
# DiT: facebookresearch layout.

def dit_sincos(dim, grid):
    """DiT's fixed 2-D table: per token (row i, column j) the 1-D sin|cos embedding of j, then of i."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    return torch.cat([one_d(dim // 2, cols), one_d(dim // 2, rows)], dim=1).float()


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale1) + shift1
        q, k, v = self.attn.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)).softmax(-1) @ v
        x = x + gate1 * self.attn.proj(a.transpose(1, 2).reshape(b, n, d))
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale2) + shift2
        return x + gate2 * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate='tanh'))


class FacebookDiT(nn.Module):
    def __init__(self, hidden=32, heads=2, depth=2, patch=2, channels=4, classes=10, grid=4, learn_sigma=True):
        super().__init__()
        self.patch, self.out_channels = patch, 2 * channels if learn_sigma else channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(channels, hidden, patch, stride=patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, hidden)  # + the null class (CFG dropout)
        self.pos_embed = nn.Parameter(dit_sincos(hidden, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden, patch * patch * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, t, y, freq_denominator_shift=0):
        """freq_denominator_shift=0 is DiT's timestep embedding (frequencies 10000^(-i/128)); diffusers' DiT uses
        10000^(-i/127), i.e. shift 1."""
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - freq_denominator_shift))
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([args.cos(), args.sin()], dim=1)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        h = self.final_layer.linear(F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale) + shift)
        n, g, p, co = h.shape[0], int(h.shape[1] ** 0.5), self.patch, self.out_channels
        h = h.reshape(n, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(n, co, g * p, g * p)


def build_facebook_dit(path, seed=0, wrapped=False):
    """A DiT .pt in the facebookresearch layout (4x8x8 latents, 10 classes); `wrapped`: a training checkpoint
    with model/ema/opt/args, of which DiT samples with 'ema'."""
    torch.manual_seed(seed)
    ref = FacebookDiT().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name != 'pos_embed':
                p.add_(0.05 * torch.randn_like(p))
    state = dict(ref.state_dict())
    if wrapped:
        noise = {k: v + 1.0 for k, v in state.items()}
        torch.save({'model': noise, 'ema': state, 'opt': {}, 'args': argparse.Namespace(model='DiT-XL/2')}, path)
    else:
        torch.save(state, path)
    return ref


def test_dit_conversion_matches_the_original_network(tmp_path):
    path = str(tmp_path / 'DiT-tiny.pt')
    ref = build_facebook_dit(path, wrapped=True)
    transformer = lc.load_dit_checkpoint(path, num_attention_heads=2)
    assert transformer.config.sample_size == 8 and transformer.config.num_embeds_ada_norm == 10
    entries = lc.dit_key_map(2)
    expected = lc.source_shapes(entries, lc._shapes(transformer))
    assert expected == {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != 'pos_embed'}
    assert sorted(d for _, dsts, _, _ in entries for d in dsts) == sorted(lc._shapes(transformer))
    torch.manual_seed(3)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 250.5, 999.0]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        out = transformer(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(out, ref(x, t, y, freq_denominator_shift=1), atol=1e-5, rtol=1e-4)
        # diffusers' DiT differs from the original only in its timestep frequencies (see docs/models_latent.md)
        assert (out - ref(x, t, y)).abs().max() > 1e-4
    with pytest.raises(ModelError, match='hidden size 32 is not a DiT-S/B/L/XL width; pass num_attention_heads'):
        lc.load_dit_checkpoint(path)


@pytest.fixture(scope='module')
def tiny_folders(tmp_path_factory):
    from tests.test_models_latent import build_tiny_dit, build_tiny_flux, build_tiny_sd3
    root = tmp_path_factory.mktemp('folders')
    return {'dit': build_tiny_dit(str(root / 'dit')), 'sd3': build_tiny_sd3(str(root / 'sd3'), with_t5=False),
            'flux': build_tiny_flux(str(root / 'flux'))}


def test_load_dit_from_pt_and_convert_command(tiny_folders, tmp_path):
    path = str(tmp_path / 'DiT-tiny.pt')
    ref = build_facebook_dit(path)
    net = models.load_denoiser(model_path=path, family='dit', single_file_config=tiny_folders['dit'],
                               num_attention_heads=2, guidance_rate=1.0)
    assert net.sample_shape == (4, 8, 8) and net.label_dim == 10
    sigma = float(net.sigma_table[300])
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([2, 9])
    with torch.no_grad():
        eps = ref(x / math.sqrt(1 + sigma ** 2), torch.tensor([300.0, 300.0]), labels, freq_denominator_shift=1)[:, :4]
        torch.testing.assert_close(net(x, sigma, labels), x - sigma * eps, atol=1e-4, rtol=1e-4)
    from click.testing import CliRunner
    dest = tmp_path / 'dit-diffusers'
    result = CliRunner().invoke(lc.main, [f'--src={path}', f'--dest={dest}', '--num_attention_heads=2',
                                          f'--single_file_config={tiny_folders["dit"]}'])
    assert result.exit_code == 0, result.output
    folder_net = models.load_denoiser(model_path=str(dest), family='dit', guidance_rate=1.0)
    with torch.no_grad():
        torch.testing.assert_close(folder_net(x, sigma, labels), net(x, sigma, labels), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# SD3 and FLUX single files: diffusers' key conversion, the rest from single_file_config.

def sd3_original_state(transformer):
    """The tiny SD3 transformer's weights under the original MMDiT names (model.diffusion_model.*): fused qkv,
    x_block/context_block, and (shift, scale) order where diffusers' continuous AdaLN has (scale, shift)."""
    sd = transformer.state_dict()
    last = transformer.config.num_layers - 1
    swap = lambda w: torch.cat(w.chunk(2)[::-1])  # noqa: E731
    out = {'pos_embed': sd['pos_embed.pos_embed'], 'context_embedder.weight': sd['context_embedder.weight'],
           'context_embedder.bias': sd['context_embedder.bias']}
    renames = {'pos_embed.proj': 'x_embedder.proj', 'time_text_embed.timestep_embedder.linear_1': 't_embedder.mlp.0',
               'time_text_embed.timestep_embedder.linear_2': 't_embedder.mlp.2',
               'time_text_embed.text_embedder.linear_1': 'y_embedder.mlp.0',
               'time_text_embed.text_embedder.linear_2': 'y_embedder.mlp.2', 'proj_out': 'final_layer.linear'}
    for p in ('weight', 'bias'):
        for a, b in renames.items():
            out[f'{b}.{p}'] = sd[f'{a}.{p}']
        out[f'final_layer.adaLN_modulation.1.{p}'] = swap(sd[f'norm_out.linear.{p}'])
        for i in range(last + 1):
            d, o = f'transformer_blocks.{i}.', f'joint_blocks.{i}.'
            out[f'{o}x_block.attn.qkv.{p}'] = torch.cat([sd[f'{d}attn.to_{c}.{p}'] for c in 'qkv'])
            out[f'{o}context_block.attn.qkv.{p}'] = torch.cat([sd[f'{d}attn.add_{c}_proj.{p}'] for c in 'qkv'])
            out[f'{o}x_block.attn.proj.{p}'] = sd[f'{d}attn.to_out.0.{p}']
            out[f'{o}x_block.adaLN_modulation.1.{p}'] = sd[f'{d}norm1.linear.{p}']
            context_mod = sd[f'{d}norm1_context.linear.{p}']
            out[f'{o}context_block.adaLN_modulation.1.{p}'] = swap(context_mod) if i == last else context_mod
            out[f'{o}x_block.mlp.fc1.{p}'] = sd[f'{d}ff.net.0.proj.{p}']
            out[f'{o}x_block.mlp.fc2.{p}'] = sd[f'{d}ff.net.2.{p}']
            if i != last:
                out[f'{o}context_block.attn.proj.{p}'] = sd[f'{d}attn.to_add_out.{p}']
                out[f'{o}context_block.mlp.fc1.{p}'] = sd[f'{d}ff_context.net.0.proj.{p}']
                out[f'{o}context_block.mlp.fc2.{p}'] = sd[f'{d}ff_context.net.2.{p}']
    return {'model.diffusion_model.' + k: v.clone() for k, v in out.items()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sd3_single_original_file(tiny_folders, tmp_path):
    from safetensors.torch import save_file
    folder_net = models.load_denoiser(model_path=tiny_folders['sd3'], family='sd3', max_sequence_length=6)
    state = sd3_original_state(folder_net.network)
    state['first_stage_model.decoder.conv_in.weight'] = torch.zeros(1)  # other parts of the file are not used
    path = str(tmp_path / 'sd3_tiny.safetensors')
    save_file(state, path)
    net = models.load_denoiser(model_path=path, family='sd3', single_file_config=tiny_folders['sd3'],
                               max_sequence_length=6)
    _same_weights(net.network, folder_net.network)
    x = torch.randn(1, *net.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 2.0, net.encode_prompts(['a cat'])),
                                   folder_net(x, 2.0, folder_net.encode_prompts(['a cat'])), atol=0, rtol=0)
    # a weight missing from the file, and the file given to another family
    del state['model.diffusion_model.joint_blocks.0.x_block.mlp.fc2.bias']
    save_file(state, path)
    with pytest.raises(ModelError, match="conversion to SD3Transformer2DModel failed.*mlp.fc2.bias"):
        models.load_denoiser(model_path=path, family='sd3', single_file_config=tiny_folders['sd3'])
    with pytest.raises(ModelError, match=r'not a FLUX checkpoint; its keys are those of family sd3 \(Stable Diff'):
        models.load_denoiser(model_path=path, family='flux', single_file_config=tiny_folders['flux'])


def test_flux_single_diffusers_named_file(tiny_folders, tmp_path):
    """FLUX.1 files in diffusers naming load as they are. (The original Black Forest Labs layout goes through
    diffusers' conversion, which assumes FLUX.1's width 3072, so it cannot be exercised on a tiny model.)"""
    from safetensors.torch import save_file
    folder_net = models.load_denoiser(model_path=tiny_folders['flux'], family='flux', resolution=16,
                                      max_sequence_length=12)
    path = str(tmp_path / 'flux1-tiny.safetensors')
    save_file({k: v.contiguous() for k, v in folder_net.network.state_dict().items()}, path)
    net = models.load_denoiser(model_path=path, family='flux', single_file_config=tiny_folders['flux'],
                               resolution=16, max_sequence_length=12)
    _same_weights(net.network, folder_net.network)
    assert not [n for n, t in net.network.state_dict().items() if t.is_meta]
    with pytest.raises(ModelError, match='not a DiT checkpoint; its keys are those of family flux'):
        models.load_denoiser(model_path=path, family='dit', single_file_config=tiny_folders['dit'])


def test_single_file_without_local_config_is_one_clear_error(tiny_folders, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    path = str(tmp_path / 'sd3_medium.safetensors')
    net = models.load_denoiser(model_path=tiny_folders['sd3'], family='sd3')
    save_file(sd3_original_state(net.network), path)
    with pytest.raises(ModelError) as info:
        models.load_denoiser(model_path=path, family='sd3')
    message = str(info.value)
    assert '\n' not in message and "single_file_config='stabilityai/stable-diffusion-3-medium-diffusers'" in message
    assert 'set single_file_config to a local diffusers Stable Diffusion 3 folder' in message
