"""Generate images with any solver (or a trained predictor) on any model, across torchrun workers.

Deterministic: the image of seed s is byte-identical for any number of workers and any batch size.
Resumable: images already written are skipped; files appear under their final names only when complete.
"""
import json
import math
import os
import sys
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import configs
import models
import solvers
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write, to_uint8
from torch_utils.misc import parse_int_list, randn_per_seed, seed_generators
from torch_utils.run_options import check_outdir, file_digest, same_value

DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


class UsageError(Exception):
    """Bad input: printed as one line, non-zero exit."""


def image_path(outdir, seed, subdirs, ext='png'):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.{ext}')


def save_png(path, array):
    image = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, 'L' if array.shape[2] == 1
                                else 'RGB')
    atomic_write(path, lambda f: image.save(f, format='PNG'), fsync=False)


def save_npz(path, array):
    atomic_write(path, lambda f: np.savez(f, x=array), fsync=False)


def write_grid(outdir, seeds, subdirs, max_images=64):
    """A grid of the first images of the run, written as grid.png; returns its path or None."""
    paths = [image_path(outdir, s, subdirs) for s in seeds[:max_images]]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        return None
    tiles = [np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths]
    cols = int(math.ceil(math.sqrt(len(tiles))))
    rows = int(math.ceil(len(tiles) / cols))
    h, w, _ = tiles[0].shape
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = tile
    path = os.path.join(outdir, 'grid.png')
    atomic_write(path, lambda f: PIL.Image.fromarray(grid).save(f, format='PNG'))
    return path


class NonFiniteError(Exception):
    pass


def guard_finite(net, sigmas):
    """Stop the run, naming the step and sigma, as soon as the denoiser returns NaN or inf."""
    grid = [float(s) for s in sigmas]

    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        if not torch.isfinite(out).all():
            sigma = torch.as_tensor(args[1] if len(args) > 1 else kwargs['sigma']).reshape(-1)[0].item()
            step = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / sigma)) if sigma > 0 else i)
            raise NonFiniteError(f"the denoiser returned NaN/inf at sigma={sigma:.6g} (step {step} of "
                                 f"{len(grid) - 1}); check the model file and the sigma range")
    return net.register_forward_hook(hook, with_kwargs=True)


def resolve_settings(cfg, overrides):
    """Solver settings: the dataset config's recommendations, overridden by options given on the command line."""
    settings = dict(solver='euler', num_steps=6, schedule_type='polynomial', schedule_rho=7.0, afs=False,
                    denoise_to_zero=False, max_order=None, predict_x0=True, lower_order_final=True, variant='bh2',
                    dtype='float32')
    settings.update(cfg.get('sample', {}))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def parse_t_steps(text):
    """'[80,10.98,...,0.002]' -> a list of floats, strictly decreasing and positive (else UsageError)."""
    try:
        grid = [float(v) for v in text.strip().strip('[]').split(',') if v.strip()]
    except ValueError:
        grid = None
    if not grid or len(grid) < 2 or any(b >= a for a, b in zip(grid, grid[1:])) or grid[-1] <= 0:
        raise UsageError(f"--t_steps={text!r} must list at least 2 strictly decreasing positive noise levels, "
                         "e.g. --t_steps=\"[80,10.98,3.88,1.58,0.57,0.17,0.002]\"")
    return grid


def check_predictor_options(predictor, given, predictor_path):
    """Solver options next to --predictor_path: the predictor fixes them, so one that disagrees with it (or that it
    has no use for) is refused, not silently ignored."""
    fixed = predictor.sampling_options()
    for name, value in given.items():
        flag = '--sampler_stu' if name == 'solver' else f'--{name}'
        if name not in fixed:
            raise UsageError(f"{flag} does not apply with --predictor_path={predictor_path} (the predictor fixes its "
                             "own solver settings); drop it")
        if not same_value(value, fixed[name]):
            raise UsageError(f"{flag}={value} contradicts the predictor's {name}={fixed[name]} "
                             f"(--predictor_path={predictor_path}); drop {flag} or use a predictor trained with it")


def load_model(cfg, model_path, device, guidance_type=None, guidance_rate=None):
    kwargs = dict(cfg['model'])
    if model_path is not None:
        kwargs['model_path'] = model_path
        if str(model_path).startswith('python:'):
            kwargs = {'model_path': model_path}
    if guidance_type is not None:
        kwargs['guidance_type'] = guidance_type
    if guidance_rate is not None:
        kwargs['guidance_rate'] = guidance_rate
    net = models.load_denoiser(**kwargs).to(device).eval().requires_grad_(False)
    given = [f'--{k}={v}' for k, v in (('guidance_type', guidance_type), ('guidance_rate', guidance_rate))
             if v is not None and v not in ('none', 'None', 'uncond')]
    if given and not net.label_dim and not getattr(net, 'prompt_keys', None):
        raise models.ModelError(f"{' '.join(given)} given, but the model of {cfg['dataset_name']} has no conditions (no "
                         "classes, no prompts), so guidance would change nothing; drop the guidance options")
    return net


def generate(net, seeds, outdir, settings, batch, batch_gpu=None, subdirs=True, class_idx=None, save_npz_too=False,
             predictor=None, device=torch.device('cpu'), prompts=None, progress=True):
    """Sample every seed not yet written; returns a summary dict (rank 0's view of all ranks)."""
    dtype = DTYPES[settings['dtype']]
    rank, world = dist.get_rank(), dist.get_world_size()
    make_png = (net.image_channels or net.sample_shape[0]) in (1, 3)
    def done(seed):
        return ((not make_png or os.path.isfile(image_path(outdir, seed, subdirs)))
                and (not (save_npz_too or not make_png) or os.path.isfile(image_path(outdir, seed, subdirs, 'npz'))))
    todo = [s for s in seeds if not done(s)]
    dist.barrier()
    # EDM's sharding: every rank gets the same number of chunks (some may be empty).
    chunks = [[todo[i] for i in idx.tolist()] for idx in dist.rank_batches(len(todo), batch)]
    solve_opts = {k: settings[k] for k in ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs',
                                           'denoise_to_zero', 'max_order', 'predict_x0', 'lower_order_final',
                                           'variant', 'sigma_min', 'sigma_max') if k in settings}
    if predictor is not None:
        sigmas = predictor.schedule(net)
    elif settings.get('t_steps'):
        sigmas = solve_opts['sigmas'] = torch.tensor(settings['t_steps'], dtype=torch.float64)
    else:
        sigmas = solvers.get_schedule(settings['num_steps'], settings.get('sigma_min') or net.sigma_min,
                                      settings.get('sigma_max') or net.sigma_max, settings['schedule_type'],
                                      settings['schedule_rho'], net=net)
    handle = guard_finite(net, sigmas)
    counted_rows = counted_calls = counted_images = counted_batches = 0
    start = time.time()
    bar = tqdm.tqdm(total=sum(len(c) for c in chunks) * world, unit='img', disable=(rank != 0 or not progress),
                    file=sys.stdout, dynamic_ncols=True)
    try:
        for chunk in chunks:
            cap = batch_gpu or max(1, len(chunk))   # a chunk may be empty: all its seeds already written
            for lo in range(0, len(chunk), cap):
                part = chunk[lo:lo + cap]
                gens = seed_generators(part, device)
                latents = randn_per_seed(gens, net.sample_shape, dtype, device)
                cond = None
                if net.label_dim:
                    labels = torch.stack([net.sample_labels(g, device) for g in gens])
                    if class_idx is not None:
                        labels = torch.nn.functional.one_hot(torch.full((len(part),), class_idx, device=device),
                                                             net.label_dim).float()
                    cond = labels.to(dtype)
                if prompts is not None:
                    cond = net.encode_prompts(prompts.prompts_for_seeds(part))
                with torch.no_grad(), solvers.count_calls(net) as counter:
                    x = solvers.sample(net, latents, cond=cond, predictor=predictor, **solve_opts)
                    images = net.decode(x)
                counted_rows += counter.rows
                counted_calls += counter.calls
                counted_images += len(part)
                counted_batches += 1
                if make_png:
                    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
                    for seed, array in zip(part, arrays):
                        save_png(image_path(outdir, seed, subdirs), array)
                if save_npz_too or not make_png:
                    for seed, sample_ in zip(part, x.detach().cpu().numpy()):
                        save_npz(image_path(outdir, seed, subdirs, 'npz'), sample_)
                bar.update(len(part) * world)
    finally:
        handle.remove()
        bar.close()
    wall = time.time() - start
    stats = torch.tensor([counted_rows, counted_calls, counted_images, counted_batches], dtype=torch.float64)
    rows, calls, images, batches = dist.all_reduce_sum(stats).tolist()
    return dict(images=int(images), skipped=len(seeds) - len(todo), nfe_per_image=rows / images if images else None,
                sequential_rounds=calls / batches if images else None, wall_s=wall,
                images_per_s=images / wall if wall > 0 and images else None)


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', metavar='NAME|YAML', default=None, help=f'Dataset config (configs/NAME.yaml or a YAML path) [default: the predictor\'s, else {configs.DEFAULT_DATASET}]')
@click.option('--model_path', metavar='PATH|URL|python:MOD:FN', default=None, help='Override the config\'s model source')
@click.option('--predictor_path', metavar='PATH|INT', default=None, help='Trained predictor: folder, file or experiment number')
@click.option('--sampler_stu', '--solver', 'solver', metavar='NAME', default=None,
              help=f'Solver when no predictor is given: {", ".join(sorted(solvers.SOLVERS))}')
@click.option('--num_steps', metavar='INT', type=click.IntRange(min=2), default=None, help='Time points (num_steps - 1 steps)')
@click.option('--t_steps', metavar='LIST', default=None, help='Explicit decreasing grid, e.g. "[80,10.98,3.88,1.58,0.57,0.17,0.002]" (sets num_steps and the sigma range)')
@click.option('--schedule_type', metavar='NAME', type=click.Choice(solvers.SCHEDULES), default=None, help='Time schedule')
@click.option('--schedule_rho', metavar='FLOAT', type=float, default=None, help='Schedule exponent')
@click.option('--sigma_min', metavar='FLOAT', type=float, default=None, help='Lowest noise level [default: the model\'s]')
@click.option('--sigma_max', metavar='FLOAT', type=float, default=None, help='Highest noise level [default: the model\'s]')
@click.option('--afs', metavar='BOOL', type=bool, default=None, help='Analytical first step (saves one NFE)')
@click.option('--denoise_to_zero', metavar='BOOL', type=bool, default=None, help='Final denoising call (one more NFE)')
@click.option('--max_order', metavar='INT', type=int, default=None, help='Order of multistep solvers')
@click.option('--predict_x0', metavar='BOOL', type=bool, default=None, help='DPM-Solver++/UniPC: data prediction')
@click.option('--lower_order_final', metavar='BOOL', type=bool, default=None, help='Lower the order on the final steps of short runs')
@click.option('--variant', metavar='bh1|bh2', default=None, help='UniPC variant')
@click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance (models that support it)')
@click.option('--guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
@click.option('--prompt', metavar='TEXT', default=None, help='One prompt for every image (text-to-image models)')
@click.option('--prompt_file', metavar='PATH', default=None, help='Prompts: text lines or a CSV with a text column')
@click.option('--class', 'class_idx', metavar='INT', type=int, default=None, help='Fixed class label (conditional models)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Total batch size over all workers')
@click.option('--batch-gpu', 'batch_gpu', metavar='INT', type=click.IntRange(min=1), default=None, help='Per-worker cap')
@click.option('--seeds', metavar='LIST', default='0-63', help="Seeds, e.g. '0-63' or '1,5,10-19'")
@click.option('--outdir', metavar='DIR', default=None, help='Output folder [default: samples/DATASET/SOLVER_nfeN_SCHEDULE, predictors: KIND-..._HASH]')
@click.option('--subdirs', metavar='BOOL', type=bool, default=True, help='1000 images a folder')
@click.option('--grid', metavar='BOOL', type=bool, default=False, help='Also write grid.png of the first 64 images')
@click.option('--save_npz', metavar='BOOL', type=bool, default=False, help='Also save the raw float samples (.npz per seed)')
@click.option('--dtype', metavar='NAME', type=click.Choice(list(DTYPES)), default=None, help='Sampling dtype [default: the config\'s, else float32]')
@click.option('--device', metavar='DEV', default=None, help='Device [default: cuda if available]')
def main(dataset_name, model_path, predictor_path, solver, num_steps, t_steps, schedule_type, schedule_rho, sigma_min,
         sigma_max, afs, denoise_to_zero, max_order, predict_x0, lower_order_final, variant, guidance_type,
         guidance_rate, prompt, prompt_file, class_idx, batch, batch_gpu, seeds, outdir, subdirs, grid, save_npz,
         dtype, device):
    """Generate images: any solver, any model, any number of torchrun workers.

    \b
    torchrun --standalone --nproc_per_node=2 sample.py --dataset_name=gmm_image --sampler_stu=dpmpp --num_steps=6
    python sample.py --predictor_path=1 --seeds=0-49999
    """
    try:
        run(**locals())
    except (UsageError, ValueError, models.ModelError, NonFiniteError, OSError) as e:
        print(f'sample.py: error: {e}', file=sys.stderr)
        dist.shutdown()
        sys.exit(1)
    dist.shutdown()


def run(dataset_name, model_path, predictor_path, solver, num_steps, t_steps, schedule_type, schedule_rho, sigma_min,
        sigma_max, afs, denoise_to_zero, max_order, predict_x0, lower_order_final, variant, guidance_type,
        guidance_rate, prompt, prompt_file, class_idx, batch, batch_gpu, seeds, outdir, subdirs, grid, save_npz,
        dtype, device):
    seed_list = parse_int_list(seeds)
    if not seed_list:
        raise UsageError(f"--seeds={seeds!r} selects no seed")
    dist.init()
    device = torch.device(device) if device else dist.get_device()
    predictor = None
    if predictor_path is not None:
        import training
        predictor = training.load_predictor(predictor_path)
        notice = training.unfinished_notice(predictor, training.resolve_predictor_path(predictor_path))
        if notice:
            dist.print0(notice, flush=True)
        meta = predictor.settings
        cfg = configs.load_config(dataset_name or meta['dataset_name'])
        if cfg['dataset_name'] != meta['dataset_name']:
            raise UsageError(f"the predictor {predictor_path} was trained for dataset {meta['dataset_name']!r}, not "
                             f"{cfg['dataset_name']!r}; drop --dataset_name or use a predictor trained for it")
        guidance_type = guidance_type or meta.get('guidance_type')
        guidance_rate = guidance_rate or meta.get('guidance_rate')
    else:
        cfg = configs.load_config(dataset_name or configs.DEFAULT_DATASET)
    dataset_name = cfg['dataset_name']
    overrides = dict(solver=solver, num_steps=num_steps, schedule_type=schedule_type, schedule_rho=schedule_rho,
                     sigma_min=sigma_min, sigma_max=sigma_max, afs=afs, denoise_to_zero=denoise_to_zero,
                     max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                     variant=variant, dtype=dtype)
    if t_steps is not None:
        t_grid = parse_t_steps(t_steps)
        overrides.update(t_steps=t_grid, num_steps=len(t_grid), sigma_max=t_grid[0], sigma_min=t_grid[-1])
    settings = resolve_settings(cfg, overrides)
    if predictor is None:
        solvers.check_options(**settings)
    else:
        if t_steps is not None:
            raise UsageError(f"--t_steps does not apply with --predictor_path={predictor_path} (the predictor has "
                             "its own grid); drop it")
        check_predictor_options(predictor, {k: v for k, v in overrides.items() if v is not None and k != 'dtype'},
                                predictor_path)
    # Rank 0 loads (and may download) first, the others wait, then load from the cache.
    if dist.get_rank() != 0:
        dist.barrier()
    net = load_model(cfg, model_path, device, guidance_type, guidance_rate)
    if dist.get_rank() == 0:
        dist.barrier()
    if predictor is None:   # the sigma range again, now with the model's own ends
        solvers.check_options(**dict(settings, sigma_min=settings.get('sigma_min') or net.sigma_min,
                                     sigma_max=settings.get('sigma_max') or net.sigma_max))
    if predictor is not None:
        predictor.check_model(net)
        predictor = predictor.to(device)
        settings.update(predictor.summary())
    if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
        raise UsageError(f"--class={class_idx} is out of range: the model has {net.label_dim} classes"
                         if net.label_dim else f"--class given, but {dataset_name} is unconditional; drop --class")
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt=prompt, prompt_file=prompt_file, dataset_name=dataset_name)
    elif prompt is not None or prompt_file is not None:
        raise UsageError(f"--prompt/--prompt_file given, but {dataset_name} is not a text-to-image model")
    # Everything that changes a pixel: a folder holds images of one such setting only.
    image_settings = dict(dataset_name=dataset_name, model=model_path or cfg['model'],
                          guidance_type=guidance_type, guidance_rate=guidance_rate, class_idx=class_idx,
                          prompt=prompt, prompt_file=file_digest([prompt_file]) if prompt_file else None,
                          settings=dict(settings, sigma_min=settings.get('sigma_min') or net.sigma_min,
                                        sigma_max=settings.get('sigma_max') or net.sigma_max))
    if predictor is not None:
        folder = training.resolve_predictor_path(predictor_path)
        image_settings['predictor'] = file_digest([os.path.join(folder, training.SETTINGS_FILE),
                                                   os.path.join(folder, training.PREDICTOR_FILE)])
    if outdir is None:
        nfe = predictor.nfe() if predictor is not None else solvers.nfe_formula(**settings)
        name = f"{settings['solver']}_nfe{nfe}_{settings['schedule_type']}"
        if predictor is not None:
            name = f"{predictor.kind}-{name}_{image_settings['predictor']}"
        outdir = os.path.join('samples', dataset_name, name)
    check_outdir(outdir, image_settings)
    if dist.get_rank() == 0:
        try:
            os.makedirs(outdir, exist_ok=True)
            probe = os.path.join(outdir, '.write_test')
            open(probe, 'w').close()
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"cannot write to --outdir={outdir} ({e.strerror}); choose a writable folder")
        options = dict(dataset_name=dataset_name, model_path=model_path, predictor_path=predictor_path,
                       seeds=seeds, batch=batch, settings=settings, images=image_settings)
        atomic_write(os.path.join(outdir, 'sample_options.json'),
                     json.dumps(options, indent=2, default=str).encode())
    dist.barrier()
    dist.print0(f'Sampling {len(seed_list)} seeds of {dataset_name} with {settings["solver"]} '
                f'({settings["num_steps"]} time points, {settings["schedule_type"]}) into {outdir}')
    summary = generate(net, seed_list, outdir, settings, batch, batch_gpu, subdirs, class_idx, save_npz, predictor,
                       device, prompts)
    dist.barrier()
    if dist.get_rank() == 0:
        grid_path = write_grid(outdir, seed_list, subdirs) if grid else None
        summary['outdir'] = outdir
        lines = [f"images: {summary['images']} new, {summary['skipped']} already there"]
        if summary['images']:
            lines += [f"NFE per image: {summary['nfe_per_image']:g} (sequential rounds: "
                      f"{summary['sequential_rounds']:g})",
                      f"wall time: {summary['wall_s']:.2f} s, {summary['images_per_s']:.1f} images/s"]
        lines.append(f'images in: {outdir}')
        if grid_path:
            lines.append(f'grid: {grid_path}')
        print('\n'.join(lines), flush=True)
    return summary


if __name__ == '__main__':
    main()
