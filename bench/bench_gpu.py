"""Sampling throughput on a GPU, with random weights (throughput does not depend on them):

1. the EDM CIFAR-10 network (VP preconditioning, DDPM++ SongUNet at its real size) at batch 512, in fp32, fp16
   (the network's own use_fp16 path), bf16 (autocast), each with and without torch.compile;
2. the Stable Diffusion 1.5 UNet (real size, 512x512 images = 4x64x64 latents, bf16, classifier-free guidance as
   one batched call) sampled with EPD at NFE 10 and DPM-Solver++(2M) at NFE 10. Text embeddings are computed once
   per prompt outside the loop, and the VAE decode is not timed, so random [77, 768] contexts stand in for them.

    python bench/bench_gpu.py --out=docs/gpu.md                  # on a CUDA machine
    python bench/bench_gpu.py --tiny --device=cpu --compile=False --out=x.md   # tiny networks: a code-path check
"""
import os
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import solvers                                              # noqa: E402
from models import edm_networks                             # noqa: E402
from models.edm import EDMDenoiser                          # noqa: E402
from training.predictors import EPDPredictor                # noqa: E402

# EDM's CIFAR-10 DDPM++ network (train.py --arch=ddpmpp; dropout is irrelevant at inference).
CIFAR_DDPMPP = dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])
TINY_DDPMPP = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])
# runwayml/stable-diffusion-v1-5 unet/config.json (the architecture fields).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                 up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def images_per_second(run, batch, device, repeats):
    run()                                   # warm-up (and compilation)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(device)
    return batch * repeats / (time.perf_counter() - start)


def edm_rows(device, tiny, batch, repeats, solver, num_steps, compile_too):
    rows = []
    for precision in ('fp32', 'fp16', 'bf16'):
        for compiled in (False, True) if compile_too else (False,):
            torch.manual_seed(0)
            net = edm_networks.VPPrecond(img_resolution=32, img_channels=3, use_fp16=precision == 'fp16',
                                         model_type='SongUNet', **(TINY_DDPMPP if tiny else CIFAR_DDPMPP))
            den = EDMDenoiser(net).to(device).eval().requires_grad_(False)
            if compiled:
                den.net.model = torch.compile(den.net.model)
            z = torch.randn(batch, 3, 32, 32, device=device)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')

            def run():
                with torch.no_grad(), autocast:
                    return solvers.sample(den, z, solver, num_steps, 'polynomial', 7)
            nfe = solvers.nfe_formula(solver, num_steps)
            rows.append((f'EDM CIFAR-10 DDPM++ ({solver}, NFE {nfe})', precision, 'yes' if compiled else 'no', batch,
                         images_per_second(run, batch, device, repeats)))
    return rows


def sd_rows(device, tiny, batch, repeats):
    from diffusers import UNet2DConditionModel
    from models.latent import StableDiffusion
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).to(dtype)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2   # SD's scaled_linear
    net = StableDiffusion(unet=unet, vae=None, tokenizer=None, text_encoder=None,
                          alphas_cumprod=torch.cumprod(1 - betas, 0), prediction_type='epsilon', guidance_type='cfg',
                          guidance_rate=7.5, dtype=dtype, latent_scale=0.18215, latent_shift=0.0)
    net = net.to(device).eval().requires_grad_(False)
    size = unet.config.sample_size
    net.sample_shape = (4, size, size)
    width = unet.config.cross_attention_dim
    cond = {'context': torch.randn(batch, 77, width, device=device),
            'uncond_context': torch.randn(batch, 77, width, device=device)}
    z = torch.randn(batch, 4, size, size, device=device)
    settings = dict(dataset_name='ms_coco', sampler_stu='epd', sampler_tea='dpm', num_steps=6, M=1, num_points=2,
                    afs=False, scale_dir=0.0, scale_time=0.0, fcn=False, loss='l2', alpha=0,
                    schedule_type='discrete', schedule_rho=1.0, sigma_min=net.sigma_min, sigma_max=net.sigma_max,
                    max_order=None, sample_shape=list(net.sample_shape))
    epd = EPDPredictor(settings).to(device)
    runs = {
        f'EPD, NFE {epd.nfe()} (K=2)': lambda: epd.sample(net, z, cond=cond),
        'DPM-Solver++(2M), NFE 10': lambda: solvers.sample(net, z, 'dpmpp', 11, 'discrete', 1, max_order=2,
                                                           cond=cond),
    }
    rows = []
    for label, fn in runs.items():
        def run(fn=fn):
            with torch.no_grad():
                return fn()
        rows.append((f'SD1.5 UNet 512x512, CFG 7.5: {label}', str(dtype).replace('torch.', ''), 'no', batch,
                     images_per_second(run, batch, device, repeats)))
    return rows


@click.command(context_settings=dict(show_default=True))
@click.option('--device', metavar='DEV', default='cuda', help='Where to run')
@click.option('--tiny', is_flag=True, help='Tiny networks (checks the code path, e.g. on a CPU)')
@click.option('--edm_batch', metavar='INT', type=int, default=512, help='EDM batch size')
@click.option('--sd_batch', metavar='INT', type=int, default=8, help='SD batch size (images; CFG doubles it)')
@click.option('--repeats', metavar='INT', type=int, default=3, help='Timed runs after the warm-up')
@click.option('--solver', metavar='NAME', default='heun', help='EDM sampler')
@click.option('--num_steps', metavar='INT', type=int, default=18, help="EDM time points (Heun: NFE 2 (N - 1))")
@click.option('--compile', 'compile_too', metavar='BOOL', type=bool, default=True, help='Also time torch.compile')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'gpu.md'), help='Markdown output')
def main(device, tiny, edm_batch, sd_batch, repeats, solver, num_steps, compile_too, out):
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('bench_gpu.py: error: no CUDA device; run it on a GPU machine or pass --device=cpu --tiny')
    rows = edm_rows(device, tiny, edm_batch, repeats, solver, num_steps, compile_too) + sd_rows(device, tiny, sd_batch, repeats)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    lines = ['# Sampling throughput on a GPU', '', f'Device: {name}; torch {torch.__version__}; random weights'
             + (' (TINY networks: a code-path check, not a measurement)' if tiny else '') + '. Regenerate with:', '',
             '```', 'python bench/bench_gpu.py ' + ' '.join(sys.argv[1:]), '```', '',
             '| model and sampler | precision | torch.compile | batch | images/s |', '|---|---|---|---|---|']
    lines += [f'| {m} | {p} | {c} | {b} | {ips:.1f} |' for m, p, c, b, ips in rows]
    tmp = out + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, out)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
