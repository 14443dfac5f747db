"""guided-diffusion (ADM) checkpoints, its noise-aware classifier, and the consistency-models EDM networks.

Families:
  'adm'  a guided-diffusion UNetModel state dict (`.pt`, read with weights-only loading), a discrete-time VP
         eps-prediction model, converted to the VE denoiser protocol; optional classifier guidance ('cg')
         with an EncoderUNetModel classifier state dict.
  'cm'   the EDM-trained networks released with consistency models (edm_bedroom256_ema.pt,
         edm_cat256_ema.pt): the same UNet family under EDM preconditioning.

Network hyperparameters use guided-diffusion's flag names (num_channels, num_res_blocks, attention_resolutions
as resolutions, ...); defaults are those of the released 256x256 checkpoints. Input/output channels, the class
count and the learned-sigma output are read from the weights.

Discrete VP -> VE: alpha_bar_n from the model's beta schedule, sigma_n = sqrt((1 - alpha_bar_n) / alpha_bar_n)
(the `sigma_table`), x_vp = x / sqrt(1 + sigma^2), D = x - sigma * eps. The timestep fed to the network for a
sigma between table entries is the fractional index n obtained by linear interpolation of
log(1 + sigma^2) = -log(alpha_bar) against n (extrapolated linearly beyond the ends); this is DPM-Solver's
'discrete' schedule (log alpha piecewise linear in t = (n + 1) / N) written in sigma.
"""
import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelError
from models.base import Denoiser
from torch_utils.download import open_model_file


# ---------------------------------------------------------------------------------------------------------
# Layers. Module and parameter names follow guided-diffusion so that its state dicts load strictly.

class GroupNorm32(nn.GroupNorm):
    """32-group normalization computed in float32."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims](*args, **kwargs)


def timestep_embedding(timesteps, dim, max_period=10000):
    """[cos | sin] of timesteps (may be fractional) at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            # Resample between the norm/activation and the convolution.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv, num_heads, split_heads_first):
    """Multi-head attention over the last axis of qkv [N, 3*H*C, T] -> [N, H*C, T].

    split_heads_first=True is guided-diffusion's legacy layout (channels ordered head, then q/k/v);
    False splits q/k/v first (guided-diffusion's new order, and the consistency-models checkpoints).
    """
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if split_heads_first:
        q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)  # scaled before the product, as in ADM
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum('bts,bcs->bct', weight, v)
    return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=1, num_head_channels=-1, split_heads_first=True, conv_dims=1):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f'{channels} attention channels not divisible by {num_head_channels} per head')
            self.num_heads = channels // num_head_channels
        self.split_heads_first = split_heads_first
        self.norm = normalization(channels)
        # guided-diffusion stores these as 1-d convolutions, consistency models as 1x1 2-d convolutions.
        self.qkv = conv_nd(conv_dims, channels, channels * 3, 1)
        self.proj_out = conv_nd(conv_dims, channels, channels, 1)
        self.conv_dims = conv_dims

    def forward(self, x):
        b, c, *spatial = x.shape
        if self.conv_dims == 1:
            x = x.reshape(b, c, -1)
            qkv = self.qkv(self.norm(x))
        else:
            qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, -1)
        h = qkv_attention(qkv, self.num_heads, self.split_heads_first)
        if self.conv_dims == 2:
            h = h.reshape(b, c, *spatial)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP style) that ends the classifier."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.qkv_proj(x)
        x = qkv_attention(x, self.num_heads, split_heads_first=False)
        x = self.c_proj(x)
        return x[:, :, 0]


def _encoder(self, in_channels, model_channels, num_res_blocks, attention_ds, dropout, channel_mult,
             conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown, attn_kwargs):
    """Input blocks and middle block shared by UNetModel and EncoderUNetModel; returns (skip channels, ch, ds)."""
    time_embed_dim = model_channels * 4
    self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                    nn.Linear(time_embed_dim, time_embed_dim))
    ch = int(channel_mult[0] * model_channels)
    self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=int(mult * model_channels),
                               use_scale_shift_norm=use_scale_shift_norm)]
            ch = int(mult * model_channels)
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                                             **attn_kwargs))
            self.input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = (ResBlock(ch, time_embed_dim, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm,
                             down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch))
            self.input_blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    self.middle_block = TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels, **attn_kwargs),
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm))
    return chans, ch, ds


class UNetModel(nn.Module):
    """guided-diffusion's U-Net (also the consistency-models EDM network with attention_layout='cm')."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_classes=None, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, attention_conv_dims=1):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        attn_kwargs = dict(split_heads_first=not use_new_attention_order, conv_dims=attention_conv_dims)
        chans, ch, ds = _encoder(self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                                 channel_mult, conv_resample, num_heads, num_head_channels, use_scale_shift_norm,
                                 resblock_updown, attn_kwargs)
        time_embed_dim = model_channels * 4
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), time_embed_dim, dropout, out_channels=int(model_channels * mult),
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample,
                                                 num_head_channels=num_head_channels, **attn_kwargs))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=ch,
                                           use_scale_shift_norm=use_scale_shift_norm, up=True)
                                  if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y=None, return_bottleneck=False):
        """y: integer labels [N] or one-hot rows [N, num_classes] (a one-hot row selects the same embedding)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError('labels must be given if and only if the model is class-conditional')
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + (self.label_emb(y) if y.ndim == 1 else y.to(emb.dtype) @ self.label_emb.weight)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        bottleneck = h
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out(h.type(x.dtype))
        return (out, bottleneck) if return_bottleneck else out


class EncoderUNetModel(nn.Module):
    """guided-diffusion's half U-Net classifier p(y | x_t, t) (attention or adaptive pooling head)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_heads=1, num_head_channels=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, pool='adaptive'):
        super().__init__()
        self.model_channels = model_channels
        attn_kwargs = dict(split_heads_first=not use_new_attention_order, conv_dims=1)
        _, ch, ds = _encoder(self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                             channel_mult, conv_resample, num_heads, num_head_channels, use_scale_shift_norm,
                             resblock_updown, attn_kwargs)
        if pool == 'adaptive':
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     nn.Conv2d(ch, out_channels, 1), nn.Flatten())
        elif pool == 'attention':
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        else:
            raise ValueError(f'classifier pool {pool!r} is not supported (adaptive, attention)')

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h.type(x.dtype))


# ---------------------------------------------------------------------------------------------------------
# Building networks from guided-diffusion flags and checking them against the weights.

def default_channel_mult(image_size):
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
             32: (1, 2, 2, 2)}
    if image_size not in table:
        raise ModelError(f'no default channel_mult for image_size {image_size}; give channel_mult')
    return table[image_size]


def _int_list(value):
    if isinstance(value, str):
        return [int(v) for v in value.split(',') if v.strip()]
    return [int(v) for v in value]


def _mult_list(value, image_size):
    if value in (None, ''):
        return default_channel_mult(image_size)
    if isinstance(value, str):
        return tuple(float(v) if '.' in v else int(v) for v in value.split(','))
    return tuple(value)


ADM_DEFAULTS = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult='',
                    attention_resolutions='32,16,8', num_heads=4, num_head_channels=64, num_heads_upsample=-1,
                    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, dropout=0.0)
CM_DEFAULTS = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult='',
                   attention_resolutions='32,16,8', num_heads=4, num_head_channels=64, num_heads_upsample=-1,
                   use_scale_shift_norm=False, resblock_updown=True, use_new_attention_order=True, dropout=0.0)
CLASSIFIER_DEFAULTS = dict(classifier_width=128, classifier_depth=2, classifier_attention_resolutions='32,16,8',
                           classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                           classifier_pool='attention', classifier_num_head_channels=64, classifier_channel_mult='')


def _read_state_dict(path, what):
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a readable weights file
        raise ModelError(f'cannot read {what} {path} as a weights-only state dict ({type(e).__name__}: '
                         f'{str(e).splitlines()[0]})') from None
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f'{what} {path} is not a state dict of tensors')
    return state


def unet_args_from_weights(state, arch):
    """UNetModel constructor arguments: architecture flags from `arch`, channel counts from the weights."""
    try:
        model_channels = state['time_embed.0.weight'].shape[1]
        in_channels = state['input_blocks.0.0.weight'].shape[1]
        out_channels = state['out.2.weight'].shape[0]
    except KeyError as e:
        raise ModelError(f'weights lack {e}; not a guided-diffusion UNetModel state dict')
    if int(arch['num_channels']) != model_channels:
        raise ModelError(f"weights have num_channels={model_channels}, the config says {arch['num_channels']}")
    qkv = [v for k, v in state.items() if k.endswith('.qkv.weight')]
    image_size = int(arch['image_size'])
    return dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                out_channels=out_channels, num_res_blocks=int(arch['num_res_blocks']),
                attention_resolutions=tuple(image_size // r for r in _int_list(arch['attention_resolutions'])),
                dropout=float(arch.get('dropout', 0.0)), channel_mult=_mult_list(arch.get('channel_mult'), image_size),
                num_classes=state['label_emb.weight'].shape[0] if 'label_emb.weight' in state else None,
                num_heads=int(arch['num_heads']), num_head_channels=int(arch['num_head_channels']),
                num_heads_upsample=int(arch['num_heads_upsample']),
                use_scale_shift_norm=bool(arch['use_scale_shift_norm']), resblock_updown=bool(arch['resblock_updown']),
                use_new_attention_order=bool(arch['use_new_attention_order']),
                attention_conv_dims=(qkv[0].ndim - 2) if qkv else 1)


def classifier_args(state, image_size, arch):
    try:
        model_channels = state['time_embed.0.weight'].shape[1]
        in_channels = state['input_blocks.0.0.weight'].shape[1]
    except KeyError as e:
        raise ModelError(f'classifier weights lack {e}; not a guided-diffusion EncoderUNetModel state dict')
    pool = arch['classifier_pool']
    out_key = 'out.2.c_proj.weight' if pool == 'attention' else 'out.3.weight'
    if out_key not in state:
        raise ModelError(f'classifier weights lack {out_key}; check classifier_pool (now {pool!r})')
    return dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                out_channels=state[out_key].shape[0], num_res_blocks=int(arch['classifier_depth']),
                attention_resolutions=tuple(image_size // r for r in
                                            _int_list(arch['classifier_attention_resolutions'])),
                channel_mult=_mult_list(arch.get('classifier_channel_mult'), image_size),
                num_head_channels=int(arch['classifier_num_head_channels']),
                use_scale_shift_norm=bool(arch['classifier_use_scale_shift_norm']),
                resblock_updown=bool(arch['classifier_resblock_updown']), pool=pool)


def _build(cls, kwargs, state, what):
    with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep the caller's RNG stream
        net = cls(**kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = str(e).replace('\n', ' ')[:600]
        raise ModelError(f'{what} weights do not fit the configured architecture ({msg}); check the architecture '
                         f'settings (num_res_blocks, channel_mult, attention_resolutions, ...)') from None
    return net.eval().requires_grad_(False)


def vp_alphas_cumprod(noise_schedule='linear', diffusion_steps=1000):
    """alpha_bar_n, n = 0..N-1, of guided-diffusion's named beta schedules (float64)."""
    if noise_schedule == 'linear':
        scale = 1000 / diffusion_steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)
    elif noise_schedule == 'cosine':
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / diffusion_steps) / f(i / diffusion_steps), 0.999)
                          for i in range(diffusion_steps)], dtype=np.float64)
    else:
        raise ModelError(f'unknown noise_schedule {noise_schedule!r} (linear, cosine)')
    return np.cumprod(1.0 - betas)


def fractional_timestep(sigma, log1p_sigma2_table):
    """Fractional index n with log(1 + sigma^2) linearly interpolated in n (linear extrapolation outside)."""
    y = torch.log1p(sigma.double() ** 2)
    table = log1p_sigma2_table.to(y.device)
    n = len(table)
    idx = torch.searchsorted(table, y).clamp(1, n - 1)  # segment [idx-1, idx], end segments extrapolate
    y0, y1 = table[idx - 1], table[idx]
    return (idx - 1).double() + (y - y0) / (y1 - y0)


# ---------------------------------------------------------------------------------------------------------
# Denoisers.

class ADMDenoiser(Denoiser):
    """A discrete-time VP eps-prediction U-Net (optionally classifier-guided) as a VE denoiser."""

    def __init__(self, unet, unet_kwargs, alphas_cumprod, classifier=None, classifier_kwargs=None,
                 guidance_type=None, guidance_rate=0.0, clip_denoised=False, sigma_min=None, sigma_max=None,
                 schedule=None):
        super().__init__()
        self.unet = unet
        self.unet_kwargs = unet_kwargs
        self.classifier = classifier
        self.classifier_kwargs = classifier_kwargs
        self.guidance_type = guidance_type
        self.guidance_rate = float(guidance_rate or 0.0)
        self.clip_denoised = bool(clip_denoised)
        self.schedule = dict(schedule or {})
        alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer('log1p_sigma2', -alphas_cumprod.log(), persistent=False)
        self.sigma_table = sigmas.float()
        self.sigma_min = float(sigmas[0] if sigma_min is None else sigma_min)
        self.sigma_max = float(sigmas[-1] if sigma_max is None else sigma_max)
        self.img_channels = unet.in_channels
        self.sample_shape = (unet.in_channels, unet_kwargs['image_size'], unet_kwargs['image_size'])
        if guidance_type == 'cg' and classifier is None:
            raise ModelError('guidance_type=cg needs a classifier: set classifier_path')
        # Labels are drawn for a conditional U-Net, and for an unconditional one guided by a classifier.
        self.unet_conditional = unet.num_classes is not None
        if self.unet_conditional:
            self.label_dim = int(unet.num_classes)
        elif guidance_type == 'cg':
            self.label_dim = int(classifier_kwargs['out_channels'])
        else:
            self.label_dim = 0

    def timestep(self, sigma):
        return fractional_timestep(sigma, self.log1p_sigma2).float()

    @property
    def forward_ad(self):
        # classifier guidance calls torch.autograd.grad inside forward, which forward-mode AD cannot go through
        return not (self.guidance_type == 'cg' and self.guidance_rate != 0)

    def denoise(self, x, sigma, cond=None):
        if self.label_dim and cond is None:
            raise ValueError('this ADM model needs labels (class-conditional or classifier-guided): pass one-hot cond')
        s = sigma.float().reshape(-1, 1, 1, 1)
        x32 = x.float()
        x_vp = x32 / (1 + s ** 2).sqrt()
        t = self.timestep(sigma.float())
        labels = cond.float() if self.unet_conditional else None
        out, bottleneck = self.unet(x_vp, t, labels, return_bottleneck=True)
        eps = out[:, :self.img_channels]  # learned-sigma models append the variance channels; not used by ODEs
        if self.guidance_type == 'cg' and self.guidance_rate != 0:
            eps = eps - (s / (1 + s ** 2).sqrt()) * self.guidance_rate * self.classifier_gradient(x_vp, t, cond)
        D = x32 - s * eps
        if self.clip_denoised:
            D = D.clamp(-1, 1)
        return D.to(x.dtype), bottleneck.float().mean(dim=1).flatten(1).to(x.dtype)

    def classifier_gradient(self, x_vp, t, cond):
        """grad_{x_vp} log p(y | x_vp, t), the label y the argmax of the one-hot cond (detached from x)."""
        if cond is None:
            raise ValueError('classifier guidance needs labels')
        y = cond.argmax(dim=1)
        with torch.enable_grad():
            x_in = x_vp.detach().requires_grad_(True)
            logits = self.classifier(x_in, t.detach())
            selected = F.log_softmax(logits.float(), dim=-1)[torch.arange(len(y), device=y.device), y]
            return torch.autograd.grad(selected.sum(), x_in)[0].detach()

    def export_spec(self):
        spec = dict(family='adm', unet_kwargs=_jsonable(self.unet_kwargs),
                    classifier_kwargs=_jsonable(self.classifier_kwargs), guidance_type=self.guidance_type,
                    guidance_rate=self.guidance_rate, clip_denoised=self.clip_denoised, schedule=self.schedule,
                    sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        state = {f'unet.{k}': v for k, v in self.unet.state_dict().items()}
        if self.classifier is not None:
            state.update({f'classifier.{k}': v for k, v in self.classifier.state_dict().items()})
        return spec, state


class CMDenoiser(Denoiser):
    """The consistency-models EDM network: EDM preconditioning (sigma_data 0.5), time input 250 log(sigma)."""

    def __init__(self, unet, unet_kwargs, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5):
        super().__init__()
        self.unet = unet
        self.unet_kwargs = unet_kwargs
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.sample_shape = (unet.in_channels, unet_kwargs['image_size'], unet_kwargs['image_size'])
        self.label_dim = int(unet.num_classes or 0)

    def denoise(self, x, sigma, cond=None):
        s = sigma.float().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        t = 1000 * 0.25 * torch.log(sigma.float() + 1e-44)
        labels = cond.float() if self.label_dim else None
        out, bottleneck = self.unet(c_in * x.float(), t, labels, return_bottleneck=True)
        D = c_skip * x.float() + c_out * out[:, :self.sample_shape[0]]
        return D.to(x.dtype), bottleneck.float().mean(dim=1).flatten(1).to(x.dtype)

    def export_spec(self):
        spec = dict(family='cm', unet_kwargs=_jsonable(self.unet_kwargs), sigma_min=self.sigma_min,
                    sigma_max=self.sigma_max, sigma_data=self.sigma_data)
        return spec, {f'unet.{k}': v for k, v in self.unet.state_dict().items()}


def _jsonable(value):
    return json.loads(json.dumps(value)) if value is not None else None


# ---------------------------------------------------------------------------------------------------------
# Loaders.

def _arch(defaults, config):
    arch = dict(defaults)
    arch.update({k: v for k, v in config.items() if k in defaults and v is not None})
    return arch


def load(model_path, classifier_path=None, guidance_type=None, guidance_rate=0.0, clip_denoised=False,
         noise_schedule='linear', diffusion_steps=1000, sigma_min=None, sigma_max=None, cache_dir=None, **config):
    """Family 'adm': guided-diffusion UNetModel weights (+ classifier weights for guidance_type='cg')."""
    if guidance_type in ('None', 'none', 'uncond', ''):
        guidance_type = None
    if guidance_type not in (None, 'cg'):
        raise ModelError(f'ADM models support guidance_type cg or none, not {guidance_type!r}')
    from models import check_model_options
    check_model_options('adm', config, set(ADM_DEFAULTS) | set(CLASSIFIER_DEFAULTS) | {
        'classifier_path', 'guidance_type', 'guidance_rate', 'clip_denoised', 'noise_schedule', 'diffusion_steps',
        'sigma_min', 'sigma_max'}, guided=True)
    arch = _arch(ADM_DEFAULTS, config)
    state = _read_state_dict(open_model_file(model_path, cache_dir=cache_dir), 'ADM weights')
    unet_kwargs = unet_args_from_weights(state, arch)
    unet = _build(UNetModel, unet_kwargs, state, 'ADM')
    classifier = classifier_kwargs = None
    if guidance_type == 'cg':
        if not classifier_path:
            raise ModelError('guidance_type=cg needs classifier_path (the noise-aware classifier weights)')
        cstate = _read_state_dict(open_model_file(classifier_path, cache_dir=cache_dir), 'classifier weights')
        classifier_kwargs = classifier_args(cstate, unet_kwargs['image_size'], _arch(CLASSIFIER_DEFAULTS, config))
        classifier = _build(EncoderUNetModel, classifier_kwargs, cstate, 'classifier')
    return ADMDenoiser(unet, unet_kwargs, vp_alphas_cumprod(noise_schedule, int(diffusion_steps)),
                       classifier=classifier, classifier_kwargs=classifier_kwargs, guidance_type=guidance_type,
                       guidance_rate=guidance_rate, clip_denoised=clip_denoised, sigma_min=sigma_min,
                       sigma_max=sigma_max,
                       schedule=dict(noise_schedule=noise_schedule, diffusion_steps=int(diffusion_steps)))


def load_cm(model_path, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, cache_dir=None, **config):
    """Family 'cm': the consistency-models EDM networks (edm_bedroom256_ema.pt, edm_cat256_ema.pt)."""
    from models import check_model_options
    check_model_options('cm', config, set(CM_DEFAULTS) | {'sigma_min', 'sigma_max', 'sigma_data'})
    arch = _arch(CM_DEFAULTS, config)
    state = _read_state_dict(open_model_file(model_path, cache_dir=cache_dir), 'CM weights')
    unet_kwargs = unet_args_from_weights(state, arch)
    unet = _build(UNetModel, unet_kwargs, state, 'CM')
    return CMDenoiser(unet, unet_kwargs, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)


def _split_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def from_spec(spec, state, sigma_min=None, sigma_max=None, guidance_rate=None, **unused):
    """Rebuild an ADM or CM denoiser from models.convert's JSON and weights."""
    unet_kwargs = dict(spec['unet_kwargs'])
    for key in ('attention_resolutions', 'channel_mult'):
        unet_kwargs[key] = tuple(unet_kwargs[key])
    unet = _build(UNetModel, unet_kwargs, _split_state(state, 'unet.'), 'converted UNet')
    if spec['family'] == 'cm':
        return CMDenoiser(unet, unet_kwargs, sigma_min=spec['sigma_min'] if sigma_min is None else sigma_min,
                          sigma_max=spec['sigma_max'] if sigma_max is None else sigma_max,
                          sigma_data=spec['sigma_data'])
    classifier = None
    classifier_kwargs = spec.get('classifier_kwargs')
    if classifier_kwargs:
        classifier_kwargs = dict(classifier_kwargs)
        for key in ('attention_resolutions', 'channel_mult'):
            classifier_kwargs[key] = tuple(classifier_kwargs[key])
        classifier = _build(EncoderUNetModel, classifier_kwargs, _split_state(state, 'classifier.'),
                            'converted classifier')
    schedule = spec.get('schedule') or {}
    return ADMDenoiser(unet, unet_kwargs, vp_alphas_cumprod(**schedule), classifier=classifier,
                       classifier_kwargs=classifier_kwargs, guidance_type=spec.get('guidance_type'),
                       guidance_rate=spec.get('guidance_rate') if guidance_rate is None else guidance_rate,
                       clip_denoised=spec.get('clip_denoised', False),
                       sigma_min=spec['sigma_min'] if sigma_min is None else sigma_min,
                       sigma_max=spec['sigma_max'] if sigma_max is None else sigma_max, schedule=schedule)
