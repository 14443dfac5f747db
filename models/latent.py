"""Latent and text-to-image families through diffusers: LDM, Stable Diffusion 1.x/2.x, SD3, FLUX, DiT.

Every model is wrapped into the VE protocol of models/base.py (see docs/models_latent.md for the derivations):

  discrete VP (LDM, SD, DiT)   sigma = sqrt((1 - abar) / abar), x_ve = x_vp / sqrt(abar)
                               network input x_vp = x_ve / sqrt(1 + sigma^2) at the fractional timestep whose
                               log sigma interpolates the model's table linearly;
                               D = x_ve - sigma * eps (eps-prediction), D = (x_vp - sigma * v) / sqrt(1 + sigma^2)
                               (v-prediction), D = x0 (sample prediction).
  flow matching (SD3, FLUX)    sigma = t / (1 - t), x_ve = x_flow / (1 - t)
                               network input x_flow = x_ve / (1 + sigma) at time t = sigma / (1 + sigma);
                               D = x_flow - t * v.

Guidance lives here: classifier-free guidance is one network call on a 2B batch ordered [uncond; cond], and
the two denoised halves are mixed as D = D_u + w (D_c - D_u) (D is affine in the network output with the same
coefficients for both halves, so this equals mixing eps or v). Text embeddings are computed once per distinct
prompt and cached (`encode_prompts`).
"""
import collections
import math
import os

import torch
import torch.nn.functional as F

from models.base import Denoiser, pooled_feature
from models.pipeline_folder import (DIFFUSERS_CLASSES, FAMILY_NAMES, PIPELINE_FAMILIES,  # noqa: F401
                                    TRANSFORMERS_CLASSES, PipelineFolder, single_file_folder)


def _model_error(message):
    from models import ModelError  # models/__init__ imports nothing from here; imported late to avoid a cycle
    return ModelError(message)


# ----------------------------------------------------------------------------------------------------------------
# Schedules.

def vp_sigma_table(alphas_cumprod):
    """Increasing VE sigmas sqrt((1 - abar_n) / abar_n) of a discrete VP model, in float64."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - abar) / abar).sqrt()


def fractional_timestep(sigma, log_sigma_table):
    """The model's (fractional) timestep index for a VE sigma, by linear interpolation of log sigma.

    Between grid points n and n+1 the index is n + (log sigma - log s_n) / (log s_{n+1} - log s_n), so the
    model's own sigmas map to their integer timesteps exactly and the map is monotone and differentiable in
    sigma (solvers that learn their time points train through it). Outside the table the index is clamped to
    [0, M-1]: the network was never trained beyond its table, and sigma = 0 would give -inf.
    """
    table = log_sigma_table
    log_sigma = sigma.to(table.dtype).clamp_min(1e-20).log()
    idx = torch.searchsorted(table, log_sigma.detach()).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    return ((idx - 1) + (log_sigma - lo) / (hi - lo)).clamp(0, len(table) - 1)


def flow_time_shift(u, shift):
    """The timestep shift of SD3/FLUX schedulers: t = shift * u / (1 + (shift - 1) * u)."""
    return shift * u / (1 + (shift - 1) * u)


def flux_dynamic_shift(image_seq_len, scheduler_config):
    """FLUX's resolution-dependent shift exp(mu), mu linear in the number of image tokens (as its pipeline)."""
    base_len = scheduler_config.get('base_image_seq_len', 256)
    max_len = scheduler_config.get('max_image_seq_len', 4096)
    base_shift = scheduler_config.get('base_shift', 0.5)
    max_shift = scheduler_config.get('max_shift', 1.15)
    mu = base_shift + (image_seq_len - base_len) * (max_shift - base_shift) / (max_len - base_len)
    return math.exp(mu)


# ----------------------------------------------------------------------------------------------------------------
# Common wrapper: dtype, guidance, prompt cache, VAE decoding.

DTYPES = {None: torch.float32, 'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16,
          'float16': torch.float16, 'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}
GUIDANCE_TYPES = {None: None, 'none': None, 'None': None, 'cfg': 'cfg', 'classifier-free': 'cfg',
                  'uncond': 'uncond', 'embedded': 'embedded'}


def parse_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise _model_error(f"dtype={dtype!r} is not supported; use one of fp32, fp16, bf16")
    return DTYPES[dtype]


class LatentDenoiser(Denoiser):
    """Shared machinery. Subclasses set `network` (the module whose one call per evaluation is counted),
    implement `_network_io` and `_denoised`, and (text models) `_encode_batch`."""
    image_channels = 3
    family = None
    prompt_keys = ()           # per-prompt tensors returned by _encode_batch (text models)
    prompt_cache_size = 1024

    def __init__(self, vae, guidance_type, guidance_rate, dtype, latent_scale, latent_shift, negative_prompt=''):
        super().__init__()
        self.vae = vae
        self.model_dtype = dtype
        self.guidance_type = GUIDANCE_TYPES.get(guidance_type, guidance_type)
        if self.guidance_type not in GUIDANCE_TYPES.values():
            raise _model_error(f"guidance_type={guidance_type!r} is not supported; use cfg, uncond or none")
        self.guidance_rate = float(guidance_rate)
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.negative_prompt = negative_prompt
        self._prompt_cache = collections.OrderedDict()
        self.prompt_encoder_calls = 0  # batches sent through the text encoders (for tests and logs)

    @property
    def cfg_active(self):
        return self.guidance_type == 'cfg' and self.guidance_rate != 1

    @property
    def rows_per_eval(self):
        return 2 if self.cfg_active else 1

    # -- evaluation --------------------------------------------------------------------------------------------
    def denoise(self, x, sigma, cond=None):
        guided = self.cfg_active
        sig = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        net_x, net_t = self._network_input(x, sig)
        net_cond = self._network_cond(cond, x.shape[0], guided)
        if guided:  # one call on [uncond; cond]
            net_x, net_t = torch.cat([net_x, net_x]), torch.cat([net_t, net_t])
        feature_store = []
        output = self._call_network(net_x.to(self.model_dtype), net_t, net_cond, feature_store)
        output = output.to(x.dtype)
        if guided:
            out_u, out_c = output.chunk(2)
            d_u, d_c = self._denoised(x, sig, out_u), self._denoised(x, sig, out_c)
            denoised = d_u + self.guidance_rate * (d_c - d_u)
        else:
            denoised = self._denoised(x, sig, output)
        feature = None
        if feature_store:
            mid = feature_store[-1]
            mid = mid[mid.shape[0] // 2:] if guided else mid  # the conditional half, as the reference reads it
            feature = pooled_feature(mid.to(x.dtype))
        return denoised, feature

    def _network_input(self, x, sig):
        raise NotImplementedError

    def _denoised(self, x, sig, output):
        raise NotImplementedError

    def _call_network(self, net_x, net_t, net_cond, feature_store):
        raise NotImplementedError

    def _network_cond(self, cond, batch, guided):
        return None

    # -- prompts -----------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts, negative_prompts=None):
        """Text conditions for a batch of prompts: a dict of batch-first tensors.

        Holds the prompts' embeddings and, when CFG is active, the negative prompts' embeddings (the model's
        negative_prompt, '' unless configured, or one per image). Each distinct prompt goes through the text
        encoders once; later batches reuse the cached embeddings.
        """
        if not self.prompt_keys:
            raise _model_error(f"the {self.family} model takes no text prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self._lookup(prompts)
        if self.cfg_active:
            if negative_prompts is None:
                negative_prompts = [self.negative_prompt] * len(prompts)
            elif isinstance(negative_prompts, str):
                negative_prompts = [negative_prompts] * len(prompts)
            for key, value in self._lookup(list(negative_prompts)).items():
                cond['uncond_' + key] = value
        return cond

    def _lookup(self, prompts):
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            with torch.no_grad():
                encoded = self._encode_batch(missing)
            self.prompt_encoder_calls += 1
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = {k: v[i] for k, v in encoded.items()}
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        rows = [self._prompt_cache[p] for p in prompts]
        while len(self._prompt_cache) > max(self.prompt_cache_size, len(prompts)):
            self._prompt_cache.popitem(last=False)
        device = self._device()
        return {k: torch.stack([r[k] for r in rows]).to(device) for k in self.prompt_keys}

    def _device(self):
        return next(self.network.parameters()).device

    # -- decoding ----------------------------------------------------------------------------------------------
    def decode(self, x):
        """VAE-decode latents (the final VE state is the latent up to sigma_min noise) to images in [-1, 1].
        Differentiable: losses on images backpropagate through it."""
        vae_param = next(self.vae.parameters())
        z = (x / self.latent_scale + self.latent_shift).to(vae_param.device, vae_param.dtype)
        images = self.vae.decode(z).sample
        return images.to(x.dtype).clamp(-1, 1)


class DiscreteVPDenoiser(LatentDenoiser):
    """Discrete-time VP models (eps-, v- or sample-prediction) in VE form."""

    def __init__(self, alphas_cumprod, prediction_type, **kwargs):
        super().__init__(**kwargs)
        if prediction_type not in ('epsilon', 'v_prediction', 'sample'):
            raise _model_error(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")
        self.prediction_type = prediction_type
        sigmas = vp_sigma_table(alphas_cumprod)
        self.sigma_table = sigmas  # float64 on the CPU; the schedule code moves it where it needs it
        self.register_buffer('log_sigma_table', sigmas.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def sigma_to_timestep(self, sigma):
        return fractional_timestep(sigma, self.log_sigma_table)

    def _network_input(self, x, sig):
        timestep = self.sigma_to_timestep(sig.reshape(-1)).to(torch.float32)
        return x / (1 + sig ** 2).sqrt(), timestep

    def _denoised(self, x, sig, output):
        if self.prediction_type == 'epsilon':
            return x - sig * output
        if self.prediction_type == 'v_prediction':
            # x_vp = a x0 + s eps, v = a eps - s x0 with a = 1/sqrt(1+sigma^2), s = sigma/sqrt(1+sigma^2):
            # x0 = a x_vp - s v = (x_vp - sigma v) / sqrt(1 + sigma^2), and x_vp = x_ve / sqrt(1 + sigma^2).
            c = 1 / (1 + sig ** 2)
            return c * (x - sig * (1 + sig ** 2).sqrt() * output)
        return output


class FlowDenoiser(LatentDenoiser):
    """Rectified-flow models x_t = (1 - t) x0 + t n with velocity v = n - x0, in VE form."""

    def __init__(self, flow_shift, num_train_timesteps, **kwargs):
        super().__init__(**kwargs)
        self.flow_shift = float(flow_shift)
        # The VE range is that of the shifted training times 1/M .. 1 - 1/M: t = 1 is sigma = inf, so the
        # largest time is one training step short of pure noise. Starting there from sigma_max * z differs from
        # the flow's start x_flow = z by (1 - t_max) (x0 - z), about 3e-4 for SD3's shift 3 and M = 1000.
        M = num_train_timesteps
        t_min, t_max = flow_time_shift(1 / M, self.flow_shift), flow_time_shift(1 - 1 / M, self.flow_shift)
        self.t_min, self.t_max = t_min, t_max
        self.sigma_min, self.sigma_max = t_min / (1 - t_min), t_max / (1 - t_max)

    def _network_input(self, x, sig):
        t = (sig / (1 + sig)).reshape(-1)
        return x / (1 + sig), t

    def _denoised(self, x, sig, output):
        t = sig / (1 + sig)
        return x / (1 + sig) - t * output


# ----------------------------------------------------------------------------------------------------------------
# Family wrappers.

class StableDiffusion(DiscreteVPDenoiser):
    """SD 1.x/2.x: UNet2DConditionModel on CLIP last hidden states; AutoencoderKL latents."""
    family = 'sd'
    prompt_keys = ('context',)

    def __init__(self, unet, vae, tokenizer, text_encoder, **kwargs):
        super().__init__(vae=vae, **kwargs)
        self.network = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    def _encode_batch(self, prompts):
        ids = _tokenize(self.tokenizer, prompts, self.text_encoder.config.max_position_embeddings)
        device = next(self.text_encoder.parameters()).device
        return {'context': self.text_encoder(ids.to(device))[0]}

    def _network_cond(self, cond, batch, guided):
        if cond is None or 'context' not in cond:
            raise _model_error("Stable Diffusion needs text conditions: pass cond=net.encode_prompts(prompts)")
        if guided:
            if 'uncond_context' not in cond:
                raise _model_error("CFG is on but cond has no negative-prompt embeddings; build cond with "
                                   "net.encode_prompts() after setting guidance")
            return torch.cat([cond['uncond_context'], cond['context']])
        return cond['context']

    def _call_network(self, net_x, net_t, context, feature_store):
        hook = self.network.mid_block.register_forward_hook(lambda m, i, o: feature_store.append(o))
        try:
            return self.network(net_x, net_t, encoder_hidden_states=context.to(self.model_dtype)).sample
        finally:
            hook.remove()


class LatentDiffusion(DiscreteVPDenoiser):
    """Unconditional LDM (LSUN bedroom, VQ-f4): UNet2DModel on VQModel latents."""
    family = 'ldm'

    def __init__(self, unet, **kwargs):
        super().__init__(**kwargs)
        self.network = unet

    def _call_network(self, net_x, net_t, net_cond, feature_store):
        hook = self.network.mid_block.register_forward_hook(lambda m, i, o: feature_store.append(o))
        try:
            return self.network(net_x, net_t).sample
        finally:
            hook.remove()


class DiT(DiscreteVPDenoiser):
    """Class-conditional DiT: learned-sigma outputs (eps = first C channels); the null class id = num_classes."""
    family = 'dit'

    def __init__(self, transformer, **kwargs):
        super().__init__(**kwargs)
        self.network = transformer
        self.label_dim = int(transformer.config.num_embeds_ada_norm)
        self.latent_channels = int(transformer.config.in_channels)

    def _network_cond(self, cond, batch, guided):
        device = self._device()
        null = torch.full((batch,), self.label_dim, dtype=torch.long, device=device)
        if cond is None:
            labels = null  # the model's unconditional branch
        elif cond.dtype in (torch.int64, torch.int32):
            labels = cond.reshape(batch).to(device, torch.long)
        else:
            labels = cond.reshape(batch, -1).argmax(dim=1).to(device)
        return torch.cat([null, labels]) if guided else labels

    def _call_network(self, net_x, net_t, labels, feature_store):
        out = self.network(net_x, timestep=net_t, class_labels=labels).sample
        return out[:, :self.latent_channels]


def _text_cond(self, cond, batch, guided):
    if cond is None or 'context' not in cond:
        raise _model_error(f"{self.family} needs text conditions: pass cond=net.encode_prompts(prompts)")
    if guided:
        if 'uncond_context' not in cond:
            raise _model_error("CFG is on but cond has no negative-prompt embeddings; build cond with "
                               "net.encode_prompts() after setting guidance")
        return (torch.cat([cond['uncond_context'], cond['context']]), torch.cat([cond['uncond_pooled'], cond['pooled']]))
    return cond['context'], cond['pooled']



class StableDiffusion3(FlowDenoiser):
    """SD3: SD3Transformer2DModel on CLIP-L + CLIP-G (+ T5) embeddings; timestep = 1000 t."""
    family = 'sd3'
    prompt_keys = ('context', 'pooled')

    def __init__(self, transformer, tokenizers, text_encoders, max_sequence_length=256, **kwargs):
        super().__init__(**kwargs)
        self.network = transformer
        self.tokenizers = tokenizers              # plain list: tokenizers are not modules
        self.text_encoders = torch.nn.ModuleList([e for e in text_encoders if e is not None])
        self.has_t5 = text_encoders[2] is not None
        self.max_sequence_length = max_sequence_length

    def _encode_batch(self, prompts):
        clip_hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = _tokenize(tokenizer, prompts, encoder.config.max_position_embeddings)
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])  # penultimate layer, as the SD3 pipeline
            pooled.append(out[0])                     # projected pooled embedding
        clip_hidden = torch.cat(clip_hidden, dim=-1)
        joint_dim = self.network.config.joint_attention_dim
        if self.has_t5:
            t5 = self.text_encoders[2]
            ids = _tokenize(self.tokenizers[2], prompts, self.max_sequence_length)
            t5_hidden = t5(ids.to(next(t5.parameters()).device))[0]
        else:  # SD3 runs without T5 on zero T5 embeddings
            t5_hidden = clip_hidden.new_zeros(len(prompts), self.max_sequence_length, joint_dim)
        clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {'context': torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], dim=-2),
                'pooled': torch.cat(pooled, dim=-1)}

    _network_cond = _text_cond

    def _call_network(self, net_x, net_t, cond, feature_store):
        context, pooled = cond
        return self.network(hidden_states=net_x, encoder_hidden_states=context.to(self.model_dtype),
                            pooled_projections=pooled.to(self.model_dtype),
                            timestep=(1000 * net_t).to(self.model_dtype)).sample


class Flux(FlowDenoiser):
    """FLUX.1: FluxTransformer2DModel on 2x2-packed latents, CLIP pooled + T5 embeddings; timestep = t.

    FLUX.1-dev is guidance-distilled: guidance_type 'embedded' feeds guidance_rate to its guidance embedding
    in a single call. 'cfg' is true CFG on a 2B batch (the embedded value is then `embedded_guidance`)."""
    family = 'flux'
    prompt_keys = ('context', 'pooled')
    _network_cond = _text_cond

    def __init__(self, transformer, tokenizers, text_encoders, max_sequence_length=512, embedded_guidance=3.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.network = transformer
        self.tokenizers = tokenizers
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.max_sequence_length = max_sequence_length
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        if self.guidance_type == 'embedded':
            if not self.guidance_embeds:
                raise _model_error("guidance_type=embedded needs a guidance-distilled FLUX (guidance_embeds); "
                                   "use cfg or none for this model")
            embedded_guidance = self.guidance_rate
        self.embedded_guidance = float(embedded_guidance)

    def _encode_batch(self, prompts):
        clip, t5 = self.text_encoders
        ids = _tokenize(self.tokenizers[0], prompts, clip.config.max_position_embeddings)
        pooled = clip(ids.to(next(clip.parameters()).device)).pooler_output
        ids = _tokenize(self.tokenizers[1], prompts, self.max_sequence_length)
        context = t5(ids.to(next(t5.parameters()).device))[0]
        return {'context': context, 'pooled': pooled}

    def _call_network(self, net_x, net_t, cond, feature_store):
        context, pooled = cond
        B, C, H, W = net_x.shape
        packed = net_x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        img_ids = torch.zeros(H // 2, W // 2, 3, device=net_x.device)
        img_ids[..., 1] += torch.arange(H // 2, device=net_x.device)[:, None]
        img_ids[..., 2] += torch.arange(W // 2, device=net_x.device)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(self.model_dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=net_x.device, dtype=self.model_dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((B,), self.embedded_guidance, device=net_x.device, dtype=torch.float32)
        out = self.network(hidden_states=packed, encoder_hidden_states=context.to(self.model_dtype),
                           pooled_projections=pooled.to(self.model_dtype), timestep=net_t.to(self.model_dtype),
                           img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
        return out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def _tokenize(tokenizer, prompts, max_positions):
    max_length = min(int(tokenizer.model_max_length), int(max_positions))
    return tokenizer(prompts, padding='max_length', max_length=max_length, truncation=True,
                     return_tensors='pt').input_ids


# ----------------------------------------------------------------------------------------------------------------
# Loading.

COMMON_OPTIONS = {'dtype', 'guidance_type', 'guidance_rate', 'resolution', 'device', 'latent_scale'}


def _check_options(family, config, extra):
    unknown = set(config) - COMMON_OPTIONS - set(extra)
    if unknown:
        raise _model_error(f"family {family} does not take option(s) {', '.join(sorted(unknown))}; known: "
                           f"{', '.join(sorted(COMMON_OPTIONS | set(extra)))}")


def _alphas_cumprod(scheduler_config):
    """abar_n of a discrete scheduler config (any beta_schedule diffusers implements)."""
    from diffusers import DDPMScheduler
    keep = {k: v for k, v in scheduler_config.items() if k in ('num_train_timesteps', 'beta_start', 'beta_end',
                                                                'beta_schedule', 'trained_betas')}
    return DDPMScheduler(**keep).alphas_cumprod.to(torch.float64)


def _freeze(*modules):
    for m in modules:
        if m is not None:
            m.eval().requires_grad_(False)


def _finish(net, sample_channels, latent_size, resolution, vae_factor, device):
    if resolution is not None:
        if resolution % vae_factor:
            raise _model_error(f"resolution {resolution} is not a multiple of the VAE factor {vae_factor}")
        latent_size = resolution // vae_factor
    net.sample_shape = (int(sample_channels), int(latent_size), int(latent_size))
    net.resolution = int(latent_size * vae_factor)
    _freeze(net)
    if device is not None:
        net.to(device)
    return net


def _vae_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


SINGLE_FILE_EXTENSIONS = ('.ckpt', '.safetensors', '.pt', '.pth', '.bin')
SD_SCALING_FACTOR = 0.18215


def is_single_file(model_path):
    """A checkpoint file (by extension) rather than a diffusers folder or hub id."""
    path = str(model_path) if model_path is not None else ''
    return path.endswith(SINGLE_FILE_EXTENSIONS) and not os.path.isdir(path)


# where the original single files of a family are published (for "does not exist" messages)
SINGLE_FILE_SOURCES = {
    'ldm': 'LSUN bedrooms: model.ckpt in https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip',
    'dit': 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt',
}


def _existing_file(path, family):
    path = str(path)
    if not os.path.isfile(path):
        source = f"; {SINGLE_FILE_SOURCES[family]}" if family in SINGLE_FILE_SOURCES else ''
        raise _model_error(f"{path} does not exist (family {family} takes a checkpoint file or a diffusers "
                           f"folder){source}")
    return path


def read_single_file(path, family):
    """The state dict of a single checkpoint file, checked to be of `family` by its key names."""
    from models.latent_convert import checkpoint_state, guess_family, read_checkpoint
    path = _existing_file(path, family)
    state = checkpoint_state(read_checkpoint(path), path)
    found = guess_family(state)
    if found != family:
        hint = f"; its keys are those of family {found} ({FAMILY_NAMES.get(found, found)})" if found else ''
        raise _model_error(f"{path} is not a {FAMILY_NAMES[family]} checkpoint{hint}")
    return state


def _single_file_transformer(class_name, state, folder, path, dtype):
    """The transformer of a single SD3/FLUX file, with the architecture (config) of `folder`'s transformer."""
    import diffusers
    from models.latent_convert import transformer_from_original
    cls = getattr(diffusers, class_name)
    try:
        config = dict(cls.load_config(folder.path, subfolder='transformer'))
    except OSError as e:
        raise _model_error(f"single_file_config={folder.path!r} has no readable transformer config "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {path} takes its "
                           f"architecture from there")
    return transformer_from_original(cls, state, config, path, folder.path).to(dtype)


def _sd3_hub_config(state):
    """The diffusers hub repo of an original SD3 file: 3.5 Medium has dual attention (attn2), 3.5 Large 38 blocks."""
    blocks = {k.split('joint_blocks.')[1].split('.')[0] for k in state if 'joint_blocks.' in k}
    if any('.attn2.' in k for k in state):
        return 'stabilityai/stable-diffusion-3.5-medium'
    return 'stabilityai/stable-diffusion-3.5-large' if len(blocks) == 38 else \
        'stabilityai/stable-diffusion-3-medium-diffusers'


def load_sd(model_path, dtype=None, guidance_type='cfg', guidance_rate=7.5, negative_prompt='', resolution=None,
            device=None, latent_scale=None, single_file_config=None, **config):
    """Stable Diffusion 1.x/2.x from a diffusers folder/hub id, or a single original .ckpt/.safetensors file."""
    _check_options('sd', config, ())
    dtype = parse_dtype(dtype)
    path = str(model_path) if model_path is not None else None
    if path is not None and path.endswith(('.ckpt', '.safetensors')) and not os.path.isdir(path):
        parts = _load_sd_single_file(path, single_file_config, dtype)
    else:
        folder = PipelineFolder(path, 'sd')
        folder.require('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
        parts = dict(unet=folder.component('unet', dtype), vae=folder.component('vae', dtype),
                     text_encoder=folder.component('text_encoder', dtype), tokenizer=folder.component('tokenizer'),
                     scheduler=folder.scheduler_config())
    return _build_sd(parts, dtype, guidance_type, guidance_rate, negative_prompt, resolution, device, latent_scale)


def _build_sd(parts, dtype, guidance_type, guidance_rate, negative_prompt, resolution, device, latent_scale):
    """The SD denoiser over its components (unet, vae, text_encoder, tokenizer, scheduler config)."""
    unet, vae, sched = parts['unet'], parts['vae'], parts['scheduler']
    _freeze(unet, vae, parts['text_encoder'])
    net = StableDiffusion(
        unet=unet, vae=vae, tokenizer=parts['tokenizer'], text_encoder=parts['text_encoder'],
        alphas_cumprod=_alphas_cumprod(sched), prediction_type=sched.get('prediction_type', 'epsilon'),
        guidance_type=guidance_type, guidance_rate=guidance_rate, dtype=dtype, negative_prompt=negative_prompt,
        latent_scale=latent_scale or vae.config.scaling_factor, latent_shift=vae.config.get('shift_factor') or 0.0)
    return _finish(net, unet.config.in_channels, unet.config.sample_size, resolution, _vae_factor(vae), device)


SD_ORIGINAL_KEY = 'model.diffusion_model.input_blocks.0.0.weight'


def _load_sd_single_file(path, single_file_config, dtype):
    """An original (CompVis/RunwayML layout) SD checkpoint through diffusers' single-file conversion.

    The key conversion is diffusers'; the architecture and the tokenizer come from `single_file_config`, a
    diffusers SD folder or hub id of the same model (default: the SD v1.5 hub repo, which needs internet or
    the Hugging Face cache)."""
    if not os.path.isfile(path):
        raise _model_error(f"{path} does not exist; SD v1.5 comes from https://huggingface.co/runwayml/"
                           f"stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt")
    from diffusers.models.model_loading_utils import load_state_dict
    state = load_state_dict(path)  # safetensors, or torch.load(weights_only=True)
    state = state.get('state_dict', state)
    if SD_ORIGINAL_KEY not in state:
        hint = 'SD3/FLUX (diffusion transformer)' if any('joint_blocks' in k or 'double_blocks' in k for k in state) \
            else 'another model'
        raise _model_error(f"{path} is not an original Stable Diffusion 1.x/2.x checkpoint (no {SD_ORIGINAL_KEY}; "
                           f"it looks like {hint})")
    from diffusers import StableDiffusionPipeline
    config = single_file_config or 'stable-diffusion-v1-5/stable-diffusion-v1-5'
    try:
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, torch_dtype=dtype,
                                                        safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        raise _model_error(f"cannot convert {path} with the diffusers config {config!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); set single_file_config to a local "
                           f"diffusers folder of the same model")
    scheduler = dict(pipe.scheduler.config)
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                scheduler=scheduler)


def load_ldm(model_path, dtype=None, guidance_type='uncond', guidance_rate=1.0, resolution=None, device=None,
             latent_scale=None, original_config=None, use_ema=True, **config):
    """Unconditional LDM (UNet2DModel + VQModel or AutoencoderKL) from a diffusers folder (LDMPipeline layout) or
    an original CompVis checkpoint (.ckpt; its yaml is `original_config`, default config.yaml beside it; its EMA
    weights are used when it has them unless use_ema=False), converted by models/latent_convert.py."""
    _check_options('ldm', config, ())
    if GUIDANCE_TYPES.get(guidance_type, guidance_type) not in (None, 'uncond'):
        raise _model_error(f"the unconditional LDM takes guidance_type uncond, not {guidance_type}")
    dtype = parse_dtype(dtype)
    if is_single_file(model_path):
        from models.latent_convert import load_ldm_checkpoint
        parts = load_ldm_checkpoint(_existing_file(model_path, 'ldm'), original_config, use_ema)
        unet, vae, sched = parts['unet'].to(dtype), parts['vae'].to(dtype), parts['scheduler']
        latent_scale = parts['latent_scale'] if latent_scale is None else latent_scale
    else:
        if original_config is not None:
            raise _model_error("original_config is the yaml of a CompVis .ckpt; a diffusers folder needs none")
        folder = PipelineFolder(model_path, 'ldm')
        folder.require('unet', 'scheduler')
        vae_name = folder.first('vqvae', 'vae')
        unet, vae, sched = folder.component('unet', dtype), folder.component(vae_name, dtype), folder.scheduler_config()
        if type(unet).__name__ != 'UNet2DModel':
            raise _model_error(f"{folder.path}: unet is a {type(unet).__name__}; an unconditional LDM has a "
                               f"UNet2DModel")
    return _build_ldm(unet, vae, sched, dtype, resolution, device, latent_scale)


def _build_ldm(unet, vae, sched, dtype, resolution, device, latent_scale):
    """The unconditional LDM denoiser over its UNet2DModel, first stage and scheduler config."""
    if latent_scale is None:
        latent_scale = vae.config.scaling_factor
        if type(vae).__name__ == 'VQModel' and latent_scale == SD_SCALING_FACTOR:
            # CompVis VQ-f4 LDMs use scale_factor 1; diffusers fills a VQModel config without one with SD's value
            latent_scale = 1.0
    _freeze(unet, vae)
    net = LatentDiffusion(unet=unet, vae=vae, alphas_cumprod=_alphas_cumprod(sched),
                          prediction_type=sched.get('prediction_type', 'epsilon'), guidance_type='uncond',
                          guidance_rate=1.0, dtype=dtype, latent_scale=latent_scale, latent_shift=0.0)
    return _finish(net, unet.config.in_channels, unet.config.sample_size, resolution, _vae_factor(vae), device)


def load_dit(model_path, dtype=None, guidance_type='cfg', guidance_rate=4.0, resolution=None, device=None,
             latent_scale=None, single_file_config=None, num_attention_heads=None, **config):
    """Class-conditional DiT (DiTTransformer2DModel + AutoencoderKL) from a diffusers DiTPipeline folder, or an
    original facebookresearch .pt (converted by models/latent_convert.py) with the VAE and scheduler of
    `single_file_config` (default facebook/DiT-XL-2-256)."""
    _check_options('dit', config, ())
    dtype = parse_dtype(dtype)
    if is_single_file(model_path):
        from models.latent_convert import convert_dit
        state = read_single_file(model_path, 'dit')
        transformer = convert_dit(state, str(model_path), num_attention_heads).to(dtype)
        folder = single_file_folder(single_file_config or 'facebook/DiT-XL-2-256', 'dit', model_path,
                                    ('vae', 'scheduler'))
    else:
        folder = PipelineFolder(model_path, 'dit')
        folder.require('transformer', 'vae', 'scheduler')
        transformer = folder.component('transformer', dtype)
    vae, sched = folder.component('vae', dtype), folder.scheduler_config()
    return _build_dit(transformer, vae, sched, dtype, guidance_type, guidance_rate, resolution, device, latent_scale,
                      source=model_path)


def _build_dit(transformer, vae, sched, dtype, guidance_type, guidance_rate, resolution, device, latent_scale,
               source):
    """The DiT denoiser over its transformer, VAE and scheduler config."""
    if not transformer.config.get('num_embeds_ada_norm'):
        raise _model_error(f"{source}: the transformer is not class-conditional (no num_embeds_ada_norm)")
    _freeze(transformer, vae)
    net = DiT(transformer=transformer, vae=vae, alphas_cumprod=_alphas_cumprod(sched),
              prediction_type=sched.get('prediction_type', 'epsilon'), guidance_type=guidance_type,
              guidance_rate=guidance_rate, dtype=dtype, latent_scale=latent_scale or vae.config.scaling_factor,
              latent_shift=0.0)
    return _finish(net, transformer.config.in_channels, transformer.config.sample_size, resolution,
                   _vae_factor(vae), device)


def _transformer_pipeline(model_path, family, class_name, single_file_config, default_config, dtype):
    """(folder of the other components, transformer) of a two-text-encoder transformer pipeline (SD3, FLUX): from
    a diffusers folder, or from a single transformer file with the rest from `single_file_config` (by default the
    hub id `default_config(state)` picks from the file's weights)."""
    needs = ('vae', 'scheduler', 'text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2')
    if is_single_file(model_path):
        state = read_single_file(model_path, family)
        folder = single_file_folder(single_file_config or default_config(state), family, model_path, needs)
        return folder, _single_file_transformer(class_name, state, folder, model_path, dtype)
    folder = PipelineFolder(model_path, family)
    folder.require('transformer', *needs)
    return folder, folder.component('transformer', dtype)


def _flux_hub_config(state):
    guided = any('guidance_in.' in k or 'guidance_embedder.' in k for k in state)
    return 'black-forest-labs/FLUX.1-dev' if guided else 'black-forest-labs/FLUX.1-schnell'


def load_sd3(model_path, dtype=None, guidance_type='cfg', guidance_rate=4.5, negative_prompt='', resolution=None,
             device=None, latent_scale=None, max_sequence_length=256, single_file_config=None, **config):
    """Stable Diffusion 3 from a diffusers folder/hub id, or a single original checkpoint (sd3_medium.safetensors,
    sd3.5_medium.safetensors) whose transformer is used with the other components of `single_file_config`.
    T5 (text_encoder_3) may be left out of the folder."""
    _check_options('sd3', config, ())
    dtype = parse_dtype(dtype)
    folder, transformer = _transformer_pipeline(model_path, 'sd3', 'SD3Transformer2DModel', single_file_config,
                                                _sd3_hub_config, dtype)
    vae = folder.component('vae', dtype)
    encoders = [folder.component('text_encoder', dtype), folder.component('text_encoder_2', dtype),
                folder.component('text_encoder_3', dtype) if folder.has('text_encoder_3') else None]
    tokenizers = [folder.component('tokenizer'), folder.component('tokenizer_2'),
                  folder.component('tokenizer_3') if folder.has('tokenizer_3') else None]
    return _build_sd3(transformer, vae, encoders, tokenizers, folder.scheduler_config(), dtype, guidance_type,
                      guidance_rate, negative_prompt, resolution, device, latent_scale, max_sequence_length)


def _build_sd3(transformer, vae, encoders, tokenizers, sched, dtype, guidance_type, guidance_rate, negative_prompt,
               resolution, device, latent_scale, max_sequence_length):
    """The SD3 denoiser over its transformer, VAE, text encoders (T5 may be None) and scheduler config."""
    _freeze(transformer, vae, *encoders)
    net = StableDiffusion3(
        transformer=transformer, tokenizers=tokenizers, text_encoders=encoders,
        max_sequence_length=max_sequence_length, flow_shift=sched.get('shift', 1.0),
        num_train_timesteps=sched.get('num_train_timesteps', 1000), vae=vae, guidance_type=guidance_type,
        guidance_rate=guidance_rate, dtype=dtype, negative_prompt=negative_prompt,
        latent_scale=latent_scale or vae.config.scaling_factor, latent_shift=vae.config.get('shift_factor') or 0.0)
    return _finish(net, transformer.config.in_channels, transformer.config.sample_size, resolution,
                   _vae_factor(vae), device)


def load_flux(model_path, dtype=None, guidance_type='embedded', guidance_rate=3.5, negative_prompt='',
              resolution=None, device=None, latent_scale=None, max_sequence_length=512, embedded_guidance=3.5,
              single_file_config=None, **config):
    """FLUX.1 from a diffusers folder/hub id, or a single transformer file (flux1-dev.safetensors) used with the
    other components of `single_file_config`. The flow shift follows the scheduler: exp(mu) with mu from the
    latent token count when dynamic shifting is on (FLUX.1-dev), else its fixed shift."""
    _check_options('flux', config, ())
    dtype = parse_dtype(dtype)
    folder, transformer = _transformer_pipeline(model_path, 'flux', 'FluxTransformer2DModel', single_file_config,
                                                _flux_hub_config, dtype)
    vae = folder.component('vae', dtype)
    encoders = [folder.component('text_encoder', dtype), folder.component('text_encoder_2', dtype)]
    tokenizers = [folder.component('tokenizer'), folder.component('tokenizer_2')]
    return _build_flux(transformer, vae, encoders, tokenizers, folder.scheduler_config(), dtype, guidance_type,
                       guidance_rate, negative_prompt, resolution, device, latent_scale, max_sequence_length,
                       embedded_guidance)


def _build_flux(transformer, vae, encoders, tokenizers, sched, dtype, guidance_type, guidance_rate, negative_prompt,
                resolution, device, latent_scale, max_sequence_length, embedded_guidance):
    """The FLUX denoiser over its transformer, VAE, CLIP and T5 encoders and scheduler config."""
    vae_factor = _vae_factor(vae)
    # The FLUX transformer has no sample_size: the default is the model's 1024 px (128x128 latents).
    latent_size = (resolution or 1024) // vae_factor
    if latent_size % 2:
        raise _model_error(f"FLUX packs 2x2 latent patches: resolution must be a multiple of {2 * vae_factor}")
    if sched.get('use_dynamic_shifting'):
        shift = flux_dynamic_shift((latent_size // 2) ** 2, sched)
    else:
        shift = sched.get('shift', 1.0)
    _freeze(transformer, vae, *encoders)
    net = Flux(transformer=transformer, tokenizers=tokenizers, text_encoders=encoders,
               max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance, flow_shift=shift,
               num_train_timesteps=sched.get('num_train_timesteps', 1000), vae=vae, guidance_type=guidance_type,
               guidance_rate=guidance_rate, dtype=dtype, negative_prompt=negative_prompt,
               latent_scale=latent_scale or vae.config.scaling_factor,
               latent_shift=vae.config.get('shift_factor') or 0.0)
    return _finish(net, transformer.config.in_channels // 4, latent_size, None, vae_factor, device)


# ----------------------------------------------------------------------------------------------------------------
# A pipeline object already in memory.

# loader options that do not apply to a pipeline in memory, and why
PIPELINE_REFUSED = {
    'dtype': "the pipeline's modules keep their dtype; convert the pipeline first (pipe.to(torch.bfloat16))",
    'device': "the pipeline's modules stay where they are; move the pipeline first (pipe.to('cuda'))",
    'single_file_config': 'it is for single checkpoint files', 'original_config': 'it is for CompVis checkpoints',
    'use_ema': 'it is for CompVis checkpoints', 'num_attention_heads': 'it is for original DiT checkpoints',
}
LOADERS = {'sd': 'load_sd', 'ldm': 'load_ldm', 'dit': 'load_dit', 'sd3': 'load_sd3', 'flux': 'load_flux'}


def pipeline_family(pipe):
    """The family of a diffusers pipeline object, by its class (or a base class) name."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    raise _model_error(f"from_pipeline takes a diffusers pipeline of {', '.join(sorted(PIPELINE_FAMILIES))}, "
                       f"not a {type(pipe).__name__}; pass family= (sd, ldm, dit, sd3, flux) for a pipeline of the "
                       "same layout")


def from_pipeline(pipe, family=None, **options):
    """Adapt a diffusers pipeline object (SD 1.x/2.x, SD3, FLUX, DiT, unconditional LDM) to the denoiser protocol.

    The denoiser holds the pipeline's own modules (no copy: the same parameter storage), in their dtype and on
    their device, and is built by the same code as the family's folder loader, with that loader's options and
    defaults (guidance_type, guidance_rate, negative_prompt, resolution, latent_scale, ...). As with the loaders,
    the modules are put in eval mode without gradients."""
    import inspect
    family = family or pipeline_family(pipe)
    if family not in LOADERS:
        raise _model_error(f"unknown pipeline family {family!r}; known: {', '.join(LOADERS)}")
    params = inspect.signature(globals()[LOADERS[family]]).parameters
    for name in options:
        if name in PIPELINE_REFUSED:
            raise _model_error(f"from_pipeline takes no {name}: {PIPELINE_REFUSED[name]}")
    allowed = [k for k, p in params.items() if p.default is not inspect.Parameter.empty and k not in PIPELINE_REFUSED]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _model_error(f"from_pipeline for family {family} does not take option(s) {', '.join(unknown)}; known: "
                           f"{', '.join(allowed)}")
    opts = {k: params[k].default for k in allowed}
    opts.update(options)

    def part(name, optional=False):
        value = getattr(pipe, name, None)
        if value is None and not optional:
            raise _model_error(f"the {type(pipe).__name__} has no {name}, which a {FAMILY_NAMES[family]} model needs")
        return value

    scheduler = dict(part('scheduler').config)
    network = part('transformer' if family in ('dit', 'sd3', 'flux') else 'unet')
    dtype = next(network.parameters()).dtype
    common = dict(dtype=dtype, resolution=opts['resolution'], device=None, latent_scale=opts['latent_scale'])
    if family == 'sd':
        parts = dict(unet=network, vae=part('vae'), text_encoder=part('text_encoder'), tokenizer=part('tokenizer'),
                     scheduler=scheduler)
        return _build_sd(parts, guidance_type=opts['guidance_type'], guidance_rate=opts['guidance_rate'],
                         negative_prompt=opts['negative_prompt'], **common)
    if family == 'ldm':
        vae = part('vqvae', optional=True) or part('vae')
        return _build_ldm(network, vae, scheduler, **common)
    if family == 'dit':
        return _build_dit(network, part('vae'), scheduler, guidance_type=opts['guidance_type'],
                          guidance_rate=opts['guidance_rate'], source=type(pipe).__name__, **common)
    text = dict(guidance_type=opts['guidance_type'], guidance_rate=opts['guidance_rate'],
                negative_prompt=opts['negative_prompt'], max_sequence_length=opts['max_sequence_length'])
    if family == 'sd3':
        encoders = [part('text_encoder'), part('text_encoder_2'), part('text_encoder_3', optional=True)]
        tokenizers = [part('tokenizer'), part('tokenizer_2'), part('tokenizer_3', optional=True)]
        return _build_sd3(network, part('vae'), encoders, tokenizers, scheduler, **text, **common)
    encoders, tokenizers = [part('text_encoder'), part('text_encoder_2')], [part('tokenizer'), part('tokenizer_2')]
    return _build_flux(network, part('vae'), encoders, tokenizers, scheduler,
                       embedded_guidance=opts['embedded_guidance'], **text, **common)
