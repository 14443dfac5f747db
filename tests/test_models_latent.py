"""Latent-model adapters on tiny random-weight diffusers models saved in their real layouts.

The builders (`build_tiny_*`) are importable for end-to-end tests of sample.py/train.py:
    from tests.test_models_latent import build_tiny_sd; build_tiny_sd(folder)
"""
import json
import math
import os

import pytest
import torch

import models
from models import ModelError
from models import latent, prompts

# ----------------------------------------------------------------------------------------------------------------
# Tiny components (random weights, real classes).

CHARS = 'abcdefghijklmnopqrstuvwxyz'


def tiny_clip_tokenizer(folder, max_length=16):
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    tokens = ['<|startoftext|>', '<|endoftext|>'] + list(CHARS) + [c + '</w>' for c in CHARS]
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    tok = CLIPTokenizer(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'),
                        model_max_length=max_length)
    return tok


def tiny_t5_tokenizer():
    from transformers import T5TokenizerFast
    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -1.0)] + [(c, -1.0) for c in CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_clip(hidden=32, projection=False, projection_dim=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(CHARS) * 2 + 2, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=16,
                         projection_dim=projection_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5(d_model=32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(CHARS) + 4, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=1, num_heads=2, decoder_start_token_id=0)).eval()


def tiny_kl_vae(latent_channels=4, scaling_factor=0.18215, shift_factor=None):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                         up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def build_tiny_sd(folder, prediction_type='epsilon', seed=0):
    """SD 1.x layout (v-prediction = the SD 2.x 768-v layout): 8x8x4 latents, 16x16 images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_kl_vae(), text_encoder=tiny_clip(),
                                   tokenizer=tiny_clip_tokenizer(os.path.join(folder, '_tok')), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sd_original_checkpoint(folder):
    """The tiny SD folder's weights in the original (CompVis/RunwayML) single-file layout, built by the inverse of
    the documented LDM -> diffusers key mapping (input/middle/output blocks, KL first stage, CLIP under
    cond_stage_model.transformer.text_model)."""
    import re
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet')
    vae = AutoencoderKL.from_pretrained(folder, subfolder='vae')
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder='text_encoder')
    L = unet.config.layers_per_block
    up_has_attention = [getattr(block, 'attentions', None) is not None for block in unet.up_blocks]
    fixed = {'time_embedding.linear_1.': 'time_embed.0.', 'time_embedding.linear_2.': 'time_embed.2.',
             'conv_in.': 'input_blocks.0.0.', 'conv_norm_out.': 'out.0.', 'conv_out.': 'out.2.'}
    resnet = {'norm1.': 'in_layers.0.', 'conv1.': 'in_layers.2.', 'norm2.': 'out_layers.0.',
              'conv2.': 'out_layers.3.', 'time_emb_proj.': 'emb_layers.1.', 'conv_shortcut.': 'skip_connection.'}

    def unet_key(k):
        for a, b in fixed.items():
            if k.startswith(a):
                return b + k[len(a):]
        if m := re.match(r'(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)', k):
            i, j, rest = int(m[2]), int(m[4]), m[5]
            if m[3] == 'resnets':
                for a, b in resnet.items():
                    rest = rest.replace(a, b) if rest.startswith(a) else rest
            block = (L + 1) * i + j + 1 if m[1] == 'down' else (L + 1) * i + j
            return f"{'input' if m[1] == 'down' else 'output'}_blocks.{block}.{0 if m[3] == 'resnets' else 1}.{rest}"
        if m := re.match(r'down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)', k):
            return f'input_blocks.{(L + 1) * (int(m[1]) + 1)}.0.op.{m[2]}'
        if m := re.match(r'up_blocks\.(\d+)\.upsamplers\.0\.(.*)', k):
            i = int(m[1])
            return f'output_blocks.{(L + 1) * i + L}.{2 if up_has_attention[i] else 1}.{m[2]}'
        if m := re.match(r'mid_block\.attentions\.0\.(.*)', k):
            return f'middle_block.1.{m[1]}'
        if m := re.match(r'mid_block\.resnets\.(\d+)\.(.*)', k):
            rest = m[2]
            for a, b in resnet.items():
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            return f'middle_block.{2 * int(m[1])}.{rest}'
        raise KeyError(k)

    n = len(vae.config.block_out_channels)
    vae_rules = [(r'^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.', lambda m: f'encoder.down.{m[1]}.block.{m[2]}.'),
                 (r'^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.', lambda m: f'encoder.down.{m[1]}.downsample.'),
                 (r'^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.', lambda m: f'decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.'),
                 (r'^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.', lambda m: f'decoder.up.{n - 1 - int(m[1])}.upsample.'),
                 (r'mid_block\.resnets\.(\d+)\.', lambda m: f'mid.block_{int(m[1]) + 1}.'),
                 (r'mid_block\.attentions\.0\.', lambda m: 'mid.attn_1.'),
                 (r'conv_norm_out\.', lambda m: 'norm_out.'), (r'conv_shortcut\.', lambda m: 'nin_shortcut.'),
                 (r'attn_1\.group_norm\.', lambda m: 'attn_1.norm.'), (r'attn_1\.to_out\.0\.', lambda m: 'attn_1.proj_out.'),
                 (r'attn_1\.to_([qkv])\.', lambda m: f'attn_1.{m[1]}.')]
    state = {'model.diffusion_model.' + unet_key(k): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        for pattern, repl in vae_rules:
            k = re.sub(pattern, repl, k)
        if re.search(r'attn_1\.(q|k|v|proj_out)\.weight', k):
            v = v[:, :, None, None]  # the original first stage uses 1x1 convolutions where diffusers has linears
        state['first_stage_model.' + k] = v
    for k, v in text_encoder.state_dict().items():
        state['cond_stage_model.transformer.text_model.' + k.removeprefix('text_model.')] = v
    return {k: v.contiguous() for k, v in state.items()}


def build_tiny_ldm(folder, seed=0):
    """LDMPipeline layout (unet: UNet2DModel, vqvae: VQModel): 8x8x3 latents, 16x16 images."""
    from diffusers import DDIMScheduler, UNet2DModel, VQModel
    from diffusers.pipelines import LDMPipeline
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
                       attention_head_dim=8, norm_num_groups=8)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                    up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                    latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=8, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule='scaled_linear', clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def build_tiny_dit(folder, seed=0):
    """DiTPipeline layout: learned-sigma DiTTransformer2DModel (8 output channels), 10 classes."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule='linear', clip_sample=False)
    DiTPipeline(transformer=transformer, vae=tiny_kl_vae(), scheduler=scheduler).save_pretrained(folder)
    return folder


def build_tiny_sd3(folder, with_t5=True, seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_kl_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip(hidden=16, projection=True, projection_dim=16),
        tokenizer=tiny_clip_tokenizer(os.path.join(folder, '_tok')),
        text_encoder_2=tiny_clip(hidden=16, projection=True, projection_dim=16),
        tokenizer_2=tiny_clip_tokenizer(os.path.join(folder, '_tok')),
        text_encoder_3=tiny_t5() if with_t5 else None, tokenizer_3=tiny_t5_tokenizer() if with_t5 else None)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_flux(folder, seed=0):
    """FLUX.1-dev layout (guidance-distilled, dynamic shift): 8x8x4 latents packed into 16 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                        vae=tiny_kl_vae(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=tiny_clip(), tokenizer=tiny_clip_tokenizer(os.path.join(folder, '_tok')),
                        text_encoder_2=tiny_t5(), tokenizer_2=tiny_t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {'sd': build_tiny_sd, 'ldm': build_tiny_ldm, 'dit': build_tiny_dit, 'sd3': build_tiny_sd3,
            'flux': build_tiny_flux}
# options each tiny model is loaded with (image size 16: the tiny VAEs downsample by 2)
TINY_OPTIONS = {'sd': {}, 'ldm': {}, 'dit': {}, 'sd3': {}, 'flux': {'resolution': 16, 'max_sequence_length': 12}}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """family -> saved tiny pipeline folder (built once per module)."""
    root = tmp_path_factory.mktemp('tiny_latent')
    return {family: build(str(root / family)) for family, build in BUILDERS.items()}


def load(family, path, **options):
    return models.load_denoiser(model_path=path, family=family, **{**TINY_OPTIONS[family], **options})


# ----------------------------------------------------------------------------------------------------------------
# Schedules.

def test_sd_sigma_range_matches_reference():
    # SD v1.5's scaled-linear betas 0.00085 -> 0.012: sigma range 0.02917 .. 14.6146 (solvers_models_fid.md 2.1)
    from diffusers import DDPMScheduler
    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear').alphas_cumprod
    sigmas = latent.vp_sigma_table(abar)
    assert float(sigmas[0]) == pytest.approx(0.02917, abs=1e-5)
    assert float(sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    # LSUN LDM: betas 0.0015 -> 0.0195, sigma range 0.03876 .. 83.82
    abar = DDPMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule='scaled_linear').alphas_cumprod
    sigmas = latent.vp_sigma_table(abar)
    assert float(sigmas[0]) == pytest.approx(0.03876, abs=1e-5)
    assert float(sigmas[-1]) == pytest.approx(83.82, abs=1e-2)


def test_fractional_timestep():
    abar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    sigmas = latent.vp_sigma_table(abar)
    log_table = sigmas.log()
    # the model's own sigmas map to their integer indices
    torch.testing.assert_close(latent.fractional_timestep(sigmas, log_table), torch.arange(50.0, dtype=torch.float64))
    # halfway in log sigma is halfway in index
    mid = (sigmas[:-1] * sigmas[1:]).sqrt()
    torch.testing.assert_close(latent.fractional_timestep(mid, log_table), torch.arange(49.0, dtype=torch.float64) + 0.5)
    # clamped outside the table, finite at sigma = 0
    out = latent.fractional_timestep(torch.tensor([0.0, 1e-9, 1e9], dtype=torch.float64), log_table)
    assert out.tolist() == [0.0, 0.0, 49.0]
    # differentiable in sigma (learned time points train through it)
    s = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    latent.fractional_timestep(s, log_table).sum().backward()
    assert s.grad.item() > 0


def test_flow_shift_and_flux_mu():
    # SD3's shift-3 scheduler: smallest training sigma 0.0029940 (epd_amed_rdpo.md 7.1)
    assert latent.flow_time_shift(1 / 1000, 3.0) == pytest.approx(0.0029940, abs=1e-7)
    # FLUX.1-dev at 1024 px (4096 tokens): mu = 1.15
    cfg = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    assert math.log(latent.flux_dynamic_shift(4096, cfg)) == pytest.approx(1.15)


# ----------------------------------------------------------------------------------------------------------------
# VE wrapping checked against diffusers' own schedulers (independent implementations of DDIM / flow Euler).

def ve_euler(net, x, sigma, sigma_next, cond):
    """One Euler step of dx/dsigma = (x - D) / sigma, as the solvers take it."""
    denoised = net(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), cond)
    return x + (sigma_next - sigma) * (x - denoised) / sigma


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_vp_ddim_step_equals_ve_euler(tiny, tmp_path, prediction_type):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    folder = tiny['sd'] if prediction_type == 'epsilon' else \
        build_tiny_sd(str(tmp_path / 'sd'), prediction_type=prediction_type)
    net = load('sd', folder, guidance_type='cfg', guidance_rate=3.0)
    # independent path: the saved components driven as the diffusers SD pipeline drives them
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet')
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder='text_encoder')
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder='tokenizer')
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder='scheduler')
    scheduler.set_timesteps(10)
    t, t_prev = int(scheduler.timesteps[2]), int(scheduler.timesteps[3])   # 699 -> 599 (interior steps)
    ids = tokenizer(['a red cat', ''], padding='max_length', max_length=16, return_tensors='pt').input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
    cond_emb, uncond_emb = emb[:1].expand(2, -1, -1), emb[1:].expand(2, -1, -1)
    torch.manual_seed(1)
    x_vp = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = unet(torch.cat([x_vp, x_vp]), t, encoder_hidden_states=torch.cat([uncond_emb, cond_emb])).sample
        out_u, out_c = out.chunk(2)
        x_vp_next = scheduler.step(out_u + 3.0 * (out_c - out_u), t, x_vp).prev_sample
    # VE path
    abar = scheduler.alphas_cumprod.double()
    sigma, sigma_next = [float(((1 - abar[i]) / abar[i]).sqrt()) for i in (t, t_prev)]
    cond = net.encode_prompts(['a red cat', 'a red cat'])
    with torch.no_grad():
        x_ve_next = ve_euler(net, x_vp * math.sqrt(1 + sigma ** 2), sigma, sigma_next, cond)
    torch.testing.assert_close(x_ve_next / math.sqrt(1 + sigma_next ** 2), x_vp_next, atol=2e-5, rtol=1e-4)


def test_sd3_flow_euler_step_equals_ve_euler(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    net = load('sd3', tiny['sd3'], guidance_type='cfg', guidance_rate=4.5)
    transformer = SD3Transformer2DModel.from_pretrained(tiny['sd3'], subfolder='transformer')
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny['sd3'], subfolder='scheduler')
    scheduler.set_timesteps(8)
    i = 2
    t, t_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
    cond = net.encode_prompts(['a dog', 'a cat'])
    torch.manual_seed(2)
    x_flow = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        v = transformer(hidden_states=torch.cat([x_flow, x_flow]),
                        encoder_hidden_states=torch.cat([cond['uncond_context'], cond['context']]),
                        pooled_projections=torch.cat([cond['uncond_pooled'], cond['pooled']]),
                        timestep=scheduler.timesteps[i].expand(4)).sample
        v_u, v_c = v.chunk(2)
        x_flow_next = scheduler.step(v_u + 4.5 * (v_c - v_u), scheduler.timesteps[i], x_flow).prev_sample
        x_ve_next = ve_euler(net, x_flow / (1 - t), t / (1 - t), t_next / (1 - t_next), cond)
    torch.testing.assert_close(x_ve_next * (1 - t_next), x_flow_next, atol=2e-5, rtol=1e-4)


def test_flux_flow_euler_step_equals_ve_euler(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    net = load('flux', tiny['flux'], guidance_rate=2.5)
    assert net.flow_shift == pytest.approx(math.exp(0.5 + (16 - 256) * 0.65 / 3840))  # 16 image tokens
    transformer = FluxTransformer2DModel.from_pretrained(tiny['flux'], subfolder='transformer')
    t, t_next = 0.8, 0.6
    cond = net.encode_prompts(['a dog', 'a cat'])
    torch.manual_seed(3)
    x_flow = torch.randn(2, 4, 8, 8)
    packed = FluxPipeline._pack_latents(x_flow, 2, 4, 8, 8)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, 'cpu', torch.float32)
    with torch.no_grad():
        v = transformer(hidden_states=packed, encoder_hidden_states=cond['context'],
                        pooled_projections=cond['pooled'], timestep=torch.full((2,), t),
                        img_ids=img_ids, txt_ids=torch.zeros(cond['context'].shape[1], 3),
                        guidance=torch.full((2,), 2.5)).sample
        v = FluxPipeline._unpack_latents(v, 16, 16, 2)
        x_flow_next = x_flow + (t_next - t) * v
        x_ve_next = ve_euler(net, x_flow / (1 - t), t / (1 - t), t_next / (1 - t_next), cond)
    torch.testing.assert_close(x_ve_next * (1 - t_next), x_flow_next, atol=2e-5, rtol=1e-4)


def test_dit_ddim_step_equals_ve_euler(tiny):
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    net = load('dit', tiny['dit'], guidance_rate=4.0)
    assert net.label_dim == 10
    transformer = DiTTransformer2DModel.from_pretrained(tiny['dit'], subfolder='transformer')
    scheduler = DDIMScheduler.from_pretrained(tiny['dit'], subfolder='scheduler')
    scheduler.set_timesteps(20)
    t, t_prev = int(scheduler.timesteps[5]), int(scheduler.timesteps[6])
    labels = torch.tensor([3, 7])
    torch.manual_seed(4)
    x_vp = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = transformer(torch.cat([x_vp, x_vp]), timestep=torch.tensor([t] * 4),
                          class_labels=torch.cat([labels, torch.tensor([10, 10])])).sample[:, :4]
        eps_c, eps_u = out.chunk(2)
        x_vp_next = scheduler.step(eps_u + 4.0 * (eps_c - eps_u), t, x_vp).prev_sample
    abar = scheduler.alphas_cumprod.double()
    sigma, sigma_next = [float(((1 - abar[i]) / abar[i]).sqrt()) for i in (t, t_prev)]
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        x_ve_next = ve_euler(net, x_vp * math.sqrt(1 + sigma ** 2), sigma, sigma_next, onehot)
    torch.testing.assert_close(x_ve_next / math.sqrt(1 + sigma_next ** 2), x_vp_next, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Guidance: one network call per evaluation, a really unconditional branch.

class CallRecorder:
    """Counts calls of a module and keeps their keyword/positional inputs."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def remove(self):
        self.handle.remove()


def test_sd_cfg_is_one_call_with_unconditional_half(tiny):
    net = load('sd', tiny['sd'], guidance_rate=7.5, negative_prompt='')
    cond = net.encode_prompts(['a red cat', 'blue sky', 'a red cat'])
    empty = net.encode_prompts([''])['context'][0]
    x = torch.randn(3, *net.sample_shape)
    recorder = CallRecorder(net.network)
    with torch.no_grad():
        for sigma in (10.0, 1.0, 0.1):
            net(x, sigma, cond)
    recorder.remove()
    assert len(recorder.calls) == 3
    args, kwargs = recorder.calls[0]
    assert args[0].shape[0] == 6
    context = kwargs['encoder_hidden_states']
    torch.testing.assert_close(context[:3], empty.expand(3, -1, -1))   # uncond first
    torch.testing.assert_close(context[3:], cond['context'])
    # guidance rate 0 gives exactly the unconditional model; the empty prompt's conditional prediction
    net_plain = load('sd', tiny['sd'], guidance_type='none')
    with torch.no_grad():
        net.guidance_rate = 0.0
        d_uncond = net(x, 1.0, cond)
        d_empty = net_plain(x, 1.0, net_plain.encode_prompts([''] * 3))
        net.guidance_rate = 7.5
        d_guided = net(x, 1.0, cond)
        d_cond = net_plain(x, 1.0, net_plain.encode_prompts(['a red cat', 'blue sky', 'a red cat']))
    torch.testing.assert_close(d_uncond, d_empty, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_guided, d_empty + 7.5 * (d_cond - d_empty), atol=1e-4, rtol=1e-4)
    # guidance rate 1 is a single conditional call of batch B
    net.guidance_rate = 1.0
    recorder = CallRecorder(net.network)
    with torch.no_grad():
        d_one = net(x, 1.0, net.encode_prompts(['a red cat', 'blue sky', 'a red cat']))
    recorder.remove()
    assert len(recorder.calls) == 1 and recorder.calls[0][0][0].shape[0] == 3
    torch.testing.assert_close(d_one, d_cond, atol=1e-5, rtol=1e-5)


def test_negative_prompt_is_the_unconditional_branch(tiny):
    net = load('sd3', tiny['sd3'], guidance_rate=4.5, negative_prompt='blurry')
    cond = net.encode_prompts(['a dog'])
    recorder = CallRecorder(net.network)
    with torch.no_grad():
        net(torch.randn(1, *net.sample_shape), 2.0, cond)
    recorder.remove()
    assert len(recorder.calls) == 1
    kwargs = recorder.calls[0][1]
    blurry = net.encode_prompts(['blurry'])
    torch.testing.assert_close(kwargs['encoder_hidden_states'][0], blurry['context'][0])
    torch.testing.assert_close(kwargs['pooled_projections'][0], blurry['pooled'][0])
    torch.testing.assert_close(kwargs['pooled_projections'][1], cond['pooled'][0])
    assert kwargs['timestep'].shape[0] == 2


def test_dit_cfg_null_class(tiny):
    net = load('dit', tiny['dit'], guidance_rate=4.0)
    labels = torch.nn.functional.one_hot(torch.tensor([2, 5]), 10).float()
    recorder = CallRecorder(net.network)
    with torch.no_grad():
        net(torch.randn(2, *net.sample_shape), 5.0, labels)
    recorder.remove()
    assert len(recorder.calls) == 1
    assert recorder.calls[0][1]['class_labels'].tolist() == [10, 10, 2, 5]


def test_flux_embedded_guidance_is_one_call_of_batch_b(tiny):
    net = load('flux', tiny['flux'], guidance_rate=3.5)
    recorder = CallRecorder(net.network)
    with torch.no_grad():
        net(torch.randn(2, *net.sample_shape), 1.0, net.encode_prompts(['a', 'b']))
    recorder.remove()
    assert len(recorder.calls) == 1 and recorder.calls[0][1]['hidden_states'].shape[0] == 2
    assert recorder.calls[0][1]['guidance'].tolist() == [3.5, 3.5]


def test_prompt_embeddings_computed_once_per_prompt(tiny):
    net = load('sd', tiny['sd'], guidance_rate=7.5)
    recorder = CallRecorder(net.text_encoder)
    first = net.encode_prompts(['a', 'b', 'a'])
    assert len(recorder.calls) == 2            # ['a', 'b'] and the negative prompt ['']
    assert recorder.calls[0][0][0].shape[0] == 2
    again = net.encode_prompts(['b', 'a'])
    assert len(recorder.calls) == 2            # all cached
    recorder.remove()
    torch.testing.assert_close(again['context'][1], first['context'][0])
    torch.testing.assert_close(first['context'][0], first['context'][2])


# ----------------------------------------------------------------------------------------------------------------
# Every family: loads through the public path, sensible attributes, decodes, exposes a bottleneck.

@pytest.mark.parametrize('family', ['sd', 'ldm', 'dit', 'sd3', 'flux'])
def test_family_loads_evaluates_and_decodes(tiny, family):
    net = load(family, tiny[family])
    assert isinstance(net, models.Denoiser)
    assert net.sample_shape == ((3,) if family == 'ldm' else (4,)) + (8, 8)
    assert 0 < net.sigma_min < net.sigma_max
    if family in ('sd3', 'flux'):
        assert net.flow_shift > 1 and net.sigma_table is None
        t_min = net.sigma_min / (1 + net.sigma_min)
        assert t_min == pytest.approx(latent.flow_time_shift(1e-3, net.flow_shift))
    else:
        assert net.sigma_table[0] == pytest.approx(net.sigma_min) and net.sigma_table[-1] == pytest.approx(net.sigma_max)
        assert bool((net.sigma_table[1:] > net.sigma_table[:-1]).all())
    cond = None
    if hasattr(net, 'encode_prompts') and net.prompt_keys:
        cond = net.encode_prompts(['a cat', 'a dog'])
    elif net.label_dim:
        cond = torch.stack([net.sample_labels(torch.Generator().manual_seed(s), 'cpu') for s in (0, 1)])
    x = (torch.randn(2, *net.sample_shape) * net.sigma_max).requires_grad_()
    denoised, feature = net(x, torch.tensor([net.sigma_max, 1.0]), cond, return_bottleneck=True)
    assert denoised.shape == x.shape and feature.shape == (2, 64) and torch.isfinite(denoised).all()
    # images in [-1, 1], differentiable back to the state (losses on decoded images)
    images = net.decode(denoised)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    images.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sd3_without_t5_uses_zero_t5_embeddings(tmp_path):
    folder = build_tiny_sd3(str(tmp_path / 'sd3'), with_t5=False)
    net = load('sd3', folder, max_sequence_length=6)
    cond = net.encode_prompts(['a dog'])
    assert cond['context'].shape == (1, 16 + 6, 32)
    assert cond['context'][:, 16:].abs().max() == 0


def test_latent_decode_scaling(tiny):
    # decode(z) = vae.decode(z / scaling_factor + shift_factor), as the SD3/FLUX pipelines decode
    from diffusers import AutoencoderKL
    net = load('sd3', tiny['sd3'])
    vae = AutoencoderKL.from_pretrained(tiny['sd3'], subfolder='vae')
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(z / 1.5305 + 0.0609).sample.clamp(-1, 1)
        torch.testing.assert_close(net.decode(z), expected)


def test_bf16_dtype(tiny):
    net = load('dit', tiny['dit'], dtype='bf16')
    assert next(net.network.parameters()).dtype == torch.bfloat16
    ref = load('dit', tiny['dit'])
    x = torch.randn(1, *net.sample_shape)
    labels = torch.nn.functional.one_hot(torch.tensor([1]), 10).float()
    with torch.no_grad():
        out, out_ref = net(x, 2.0, labels), ref(x, 2.0, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------------------------
# Loading errors: one ModelError line each.

def test_missing_component_is_one_clear_error(tiny, tmp_path):
    import shutil
    broken = tmp_path / 'sd_no_vae'
    shutil.copytree(tiny['sd'], broken)
    shutil.rmtree(broken / 'vae')
    with pytest.raises(ModelError, match=r'lacks the vae/ component'):
        load('sd', str(broken))
    with pytest.raises(ModelError, match=r'no model_index.json'):
        load('sd', str(tmp_path))


@pytest.mark.parametrize('family,other', [('sd', 'sd3'), ('sd3', 'sd'), ('dit', 'flux'), ('ldm', 'dit'), ('flux', 'sd')])
def test_other_family_is_one_clear_error(tiny, family, other):
    with pytest.raises(ModelError, match=f'load it with family {other}'):
        load(family, tiny[other])


def test_single_file_of_another_family(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / 'sd3.safetensors')
    save_file({'model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight': torch.zeros(2, 2)}, path)
    with pytest.raises(ModelError, match='not an original Stable Diffusion 1.x/2.x checkpoint.*SD3/FLUX'):
        load('sd', path)
    with pytest.raises(ModelError, match='does not exist'):
        load('sd', str(tmp_path / 'missing.ckpt'))


def test_sd_single_original_checkpoint(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    path = str(tmp_path / 'sd-original.safetensors')
    save_file(sd_original_checkpoint(tiny['sd']), path)
    net = load('sd', path, single_file_config=tiny['sd'])
    ref = load('sd', tiny['sd'])
    for a, b in [(net.network, ref.network), (net.vae, ref.vae), (net.text_encoder, ref.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(1, *net.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 3.0, net.encode_prompts(['a cat'])), ref(x, 3.0, ref.encode_prompts(['a cat'])))


def test_unknown_option_and_dtype(tiny):
    with pytest.raises(ModelError, match='does not take option'):
        load('dit', tiny['dit'], guidance_scale=3)
    with pytest.raises(ModelError, match='dtype'):
        load('dit', tiny['dit'], dtype='fp8')


# ----------------------------------------------------------------------------------------------------------------
# Prompts.

def test_prompt_sources(tmp_path):
    (tmp_path / 'p.txt').write_text('a cat\n\n  a dog  \na bird\n')
    (tmp_path / 'p.csv').write_text('id,text\n0,"first, with comma"\n1,second\n')
    (tmp_path / 'bad.csv').write_text('id,words\n0,x\n')
    src = prompts.load_prompt_source(prompt_file=str(tmp_path / 'p.txt'))
    assert src.prompts == ['a cat', 'a dog', 'a bird']
    assert src.prompts_for_seeds([0, 1, 2, 3, 5]) == ['a cat', 'a dog', 'a bird', 'a cat', 'a bird']
    assert prompts.load_prompt_source(prompt_file=str(tmp_path / 'p.csv')).prompts == ['first, with comma', 'second']
    assert prompts.load_prompt_source(prompt='one').prompt_for_seed(12345) == 'one'
    assert prompts.load_prompt_source(dataset_name='cifar10') is None
    with pytest.raises(ModelError, match='no column named text'):
        prompts.read_prompt_file(str(tmp_path / 'bad.csv'))
    with pytest.raises(ModelError, match='not both'):
        prompts.load_prompt_source(prompt='a', prompt_file=str(tmp_path / 'p.txt'))


def test_prompt_url_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('FDS_CACHE_DIR', str(tmp_path / 'cache'))
    source = tmp_path / 'captions.csv'
    source.write_text('text\nx\ny\n')
    url = source.as_uri()
    assert prompts.read_prompt_file(url) == ['x', 'y']
    source.write_text('text\nchanged\n')
    assert prompts.read_prompt_file(url) == ['x', 'y']      # served from the cache
    assert os.path.isfile(tmp_path / 'cache' / 'prompts' / 'captions.csv')


# ----------------------------------------------------------------------------------------------------------------
# configs/: every model mapping is accepted by its loader (tiny weights in place of the real ones).

CONFIGS = {'ms_coco': 'sd', 'lsun_bedroom_ldm': 'ldm', 'sd3_512': 'sd3', 'sd3_1024': 'sd3', 'flux': 'flux',
           'dit': 'dit'}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_model_options_load(tiny, name):
    from omegaconf import OmegaConf
    root = os.path.join(os.path.dirname(__file__), '..', 'configs')
    config = OmegaConf.to_container(OmegaConf.load(os.path.join(root, f'{name}.yaml')))
    assert {'dataset_name', 'model', 'sample', 'train', 'fid_ref'} <= set(config)
    options = dict(config['model'])
    family = options.pop('family')
    assert family == CONFIGS[name]
    options.update(model_path=tiny[family], dtype='fp32')
    net = models.load_denoiser(**options, family=family)
    if 'resolution' in config['model']:
        assert net.resolution == config['model']['resolution']
