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
from models.loading import load_model
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write, to_uint8
from torch_utils.misc import parse_int_list, randn_per_seed, seed_generators
from torch_utils.run_options import check_outdir, file_digest, same_value
from solvers.noise import ImageNoise
from solvers import parallel as par

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


def grid_path(outdir):
    """The grid goes beside the folder it shows (<outdir>.grid.png), not into it: the folder stays a set of
    same-sized samples that fid.py calc can score as it is."""
    return os.path.normpath(os.path.abspath(outdir)) + '.grid.png'


def write_grid(outdir, seeds, subdirs, max_images=64):
    """A grid of the first images of the run, written as <outdir>.grid.png; returns its path or None."""
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
    path = grid_path(outdir)
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
                    denoise_to_zero=False, max_order=None, predict_x0=True, lower_order_final=True, variant=None,
                    dtype='float32')
    unknown = sorted(set(cfg.get('sample', {})) - set(settings) - {'sigma_min', 'sigma_max'})
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)} in the sample section of the "
                         f"{cfg.get('dataset_name')} config; allowed: {', '.join(sorted(settings))}, sigma_min, "
                         "sigma_max")
    settings.update(cfg.get('sample', {}))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings['variant'] is None:
        settings['variant'] = solvers.default_variant(settings['solver'])
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


def gits_prompts(net, prompt, prompt_file, dataset_name):
    """The prompts GITS's teacher runs use (those of the images' seeds 0..num_warmup-1) for text-to-image models."""
    if not getattr(net, 'prompt_keys', None):
        return None
    from models.prompts import load_prompt_source
    return load_prompt_source(prompt=prompt, prompt_file=prompt_file, dataset_name=dataset_name)


def generate(net, seeds, outdir, settings, batch, batch_gpu=None, subdirs=True, class_idx=None, save_npz_too=False,
             predictor=None, device=torch.device('cpu'), prompts=None, progress=True, parallel=None):
    """Sample every seed not yet written; returns a summary dict (rank 0's view of all ranks).

    parallel: options of solvers.parallel.solve_parallel (with 'method'; and save_iterates, save_trajectory,
    init_trajectory): every worker takes part in every batch, each evaluating its slice of the window."""
    dtype = DTYPES[settings['dtype']]
    rank, world = dist.get_rank(), dist.get_world_size()
    if parallel is not None:
        return generate_parallel(net, seeds, outdir, settings, batch, subdirs, class_idx, save_npz_too, predictor,
                                 device, prompts, parallel)
    make_png, todo = seeds_to_do(net, seeds, outdir, subdirs, save_npz_too)
    dist.barrier()
    # EDM's sharding: every rank gets the same number of chunks (some may be empty).
    chunks = [[todo[i] for i in idx.tolist()] for idx in dist.rank_batches(len(todo), batch)]
    solve_opts = {k: settings[k] for k in ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs',
                                           'denoise_to_zero', 'max_order', 'predict_x0', 'lower_order_final',
                                           'variant', 'sigma_min', 'sigma_max', 'eta') if k in settings}
    solve_opts.update({k: settings[k] for k in solvers.stochastic.OPTION_USERS if k in settings})
    if predictor is not None:
        sigmas = predictor.schedule(net)
    elif settings.get('t_steps'):
        sigmas = solve_opts['sigmas'] = torch.tensor(settings['t_steps'], dtype=torch.float64)
        solve_opts.pop('schedule_type')       # an explicit grid (given, or GITS's): no schedule is built
    else:
        sigmas = solvers.get_schedule(settings['num_steps'], settings.get('sigma_min') or net.sigma_min,
                                      settings.get('sigma_max') or net.sigma_max, settings['schedule_type'],
                                      settings['schedule_rho'], net=net)
    handle = guard_finite(net, sigmas)
    counted_rows = counted_calls = counted_images = counted_batches = counted_jvp_rows = 0
    start = time.time()
    bar = tqdm.tqdm(total=sum(len(c) for c in chunks) * world, unit='img', disable=(rank != 0 or not progress),
                    file=sys.stdout, dynamic_ncols=True)
    try:
        for chunk in chunks:
            cap = batch_gpu or max(1, len(chunk))   # a chunk may be empty: all its seeds already written
            for lo in range(0, len(chunk), cap):
                part = chunk[lo:lo + cap]
                latents, cond = batch_inputs(net, part, dtype, device, class_idx, prompts)
                stochastic = settings.get('eta') or predictor is None and solvers.SOLVERS[settings['solver']].stochastic
                noise = ImageNoise(part) if stochastic else None
                with torch.no_grad(), solvers.count_calls(net) as counter:
                    x = solvers.sample(net, latents, cond=cond, predictor=predictor, noise=noise, **solve_opts)
                    images = net.decode(x)
                counted_rows += counter.rows
                counted_jvp_rows += counter.jvp_rows
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
    stats = torch.tensor([counted_rows, counted_calls, counted_images, counted_batches, counted_jvp_rows],
                         dtype=torch.float64)
    rows, calls, images, batches, jvp_rows = dist.all_reduce_sum(stats).tolist()
    return dict(images=int(images), skipped=len(seeds) - len(todo), nfe_per_image=rows / images if images else None,
                jvp_per_image=jvp_rows / images if images else None,
                sequential_rounds=calls / batches if images else None, wall_s=wall,
                images_per_s=images / wall if wall > 0 and images else None)


def trajectory_path(folder, seed):
    return os.path.join(folder, f'{seed:06d}.npz')


def load_trajectory(folder, seed, scheme, shape):
    """A saved converged trajectory of this seed, checked against the solver's grid (UsageError if not)."""
    path = trajectory_path(folder, seed)
    if not os.path.isfile(path):
        raise UsageError(f"--init_trajectory={folder} has no trajectory for seed {seed} ({path}); save one with "
                         "--save_trajectory=True and the same seeds")
    with np.load(path, allow_pickle=False) as data:
        traj, times = data['trajectory'], data['times']
    if tuple(traj.shape[1:]) != tuple(shape) or len(times) != scheme.num_evals or not np.allclose(
            times, scheme.times.numpy(), rtol=1e-12, atol=0):
        raise UsageError(f"the trajectory {path} comes from another model or grid (shape {tuple(traj.shape)}, "
                         f"{len(times)} evaluations; this run: {scheme.num_evals} of shape {tuple(shape)}); use "
                         "the same solver, steps and model")
    return torch.from_numpy(traj)


def seeds_to_do(net, seeds, outdir, subdirs, save_npz_too):
    """Whether the images are written as PNG (1 or 3 channels), and the seeds whose files are not all there yet."""
    make_png = (net.image_channels or net.sample_shape[0]) in (1, 3)
    def done(seed):
        return ((not make_png or os.path.isfile(image_path(outdir, seed, subdirs)))
                and (not (save_npz_too or not make_png) or os.path.isfile(image_path(outdir, seed, subdirs, 'npz'))))
    return make_png, [s for s in seeds if not done(s)]


def batch_inputs(net, part, dtype, device, class_idx, prompts):
    """Latents and condition of the images of these seeds (as in generate)."""
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
    return latents, cond


def generate_parallel(net, seeds, outdir, settings, batch, subdirs, class_idx, save_npz_too, predictor, device,
                      prompts, parallel):
    """generate() with a parallel-in-time solver: every worker runs every batch and evaluates its slice of each
    window; rank 0 writes. Returns the summary with the parallel counts."""
    dtype = DTYPES[settings['dtype']]
    rank = dist.get_rank()
    opts = dict(parallel)
    scheme = opts.pop('scheme')
    save_iterates, save_traj = opts.pop('save_iterates', False), opts.pop('save_trajectory', False)
    init_dir = opts.pop('init_trajectory', None)
    make_png, todo = seeds_to_do(net, seeds, outdir, subdirs, save_npz_too)
    dist.barrier()
    iterations, rounds, evals, residuals = [], [], [], []
    start = time.time()
    bar = tqdm.tqdm(total=len(todo), unit='img', disable=rank != 0, file=sys.stdout, dynamic_ncols=True)
    for lo in range(0, len(todo), batch):
        part = todo[lo:lo + batch]
        latents, cond = batch_inputs(net, part, dtype, device, class_idx, prompts)
        init = None
        if init_dir is not None:
            init = torch.stack([load_trajectory(init_dir, s, scheme, net.sample_shape) for s in part], 1)
        x, stats = par.solve_parallel(net, scheme, latents, cond=cond, noise=ImageNoise(part),
                                      return_iterates=save_iterates, init_trajectory=init,
                                      evaluate=dist.split_evaluate, **opts)
        iterations.append(stats['iterations'])
        rounds += stats['rounds'].tolist()
        evals += stats['evals_per_image'].tolist()
        residuals += stats['residual'].tolist()
        if rank == 0:
            with torch.no_grad():
                images = net.decode(x)
            if make_png:
                for seed, array in zip(part, to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()):
                    save_png(image_path(outdir, seed, subdirs), array)
            if save_npz_too or not make_png:
                for seed, sample_ in zip(part, x.detach().cpu().numpy()):
                    save_npz(image_path(outdir, seed, subdirs, 'npz'), sample_)
            if save_traj:
                os.makedirs(os.path.join(outdir, 'trajectories'), exist_ok=True)
                for b, seed in enumerate(part):
                    arrays = dict(trajectory=stats['trajectory'][:, b].cpu().numpy(), times=scheme.times.numpy())
                    atomic_write(trajectory_path(os.path.join(outdir, 'trajectories'), seed),
                                 lambda f, a=arrays: np.savez(f, **a), fsync=False)
            if save_iterates:
                for b, seed in enumerate(part):
                    folder = os.path.join(outdir, 'iterates', f'{seed:06d}')
                    os.makedirs(folder, exist_ok=True)
                    with torch.no_grad():
                        frames = net.decode(stats['iterates'][:, b].to(device))
                    if make_png:
                        for k, array in enumerate(to_uint8(frames).permute(0, 2, 3, 1).cpu().numpy()):
                            save_png(os.path.join(folder, f'{k + 1:03d}.png'), array)
                    else:
                        save_npz(os.path.join(folder, 'iterates.npz'), stats['iterates'][:, b].cpu().numpy())
        bar.update(len(part))
    bar.close()
    wall = time.time() - start
    n = len(rounds)
    return dict(images=n, skipped=len(seeds) - len(todo), wall_s=wall, images_per_s=n / wall if wall > 0 and n
                else None, parallel=dict(
                    method=parallel['method'], iterations_per_batch=sum(iterations) / len(iterations) if n else None,
                    rounds_mean=sum(rounds) / n if n else None, rounds_max=max(rounds) if n else None,
                    evals_per_image=sum(evals) / n if n else None, residual_max=max(residuals) if n else None,
                    sequential_rounds=scheme.rounds, sequential_evals=scheme.num_evals, batches=len(iterations)))


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', metavar='NAME|YAML', default=None, help=f'Dataset config (configs/NAME.yaml or a YAML path) [default: the predictor\'s, else told from --model_path, else {configs.DEFAULT_DATASET}]')
@click.option('--model_path', metavar='PATH|URL|python:MOD:FN', default=None, help='Override the config\'s model source')
@click.option('--classifier_path', metavar='PATH|URL', default=None, help='Noise-aware classifier for --guidance_type=cg (family adm) [default: the config\'s]')
@click.option('--resolution', metavar='INT', type=click.IntRange(min=8), default=None, help='Image size of latent models [default: the config\'s; with another --model_path, the model\'s own]')
@click.option('--network', metavar='PKL', default=None, help='2nd-SED\'s generate.py spelling: an EDM pickle (= --model_path; without --dataset_name read as family edm, float64, default solver sed_ref)')
@click.option('--predictor_path', metavar='PATH|INT', default=None, help='Trained predictor: folder, file or experiment number')
@click.option('--sampler_stu', '--solver', 'solver', metavar='NAME', default=None,
              help=f'Solver when no predictor is given: {", ".join(sorted(solvers.SOLVERS))}')
@click.option('--num_steps', '--steps', 'num_steps', metavar='INT', type=click.IntRange(min=2), default=None, help='Time points (num_steps - 1 steps); --steps is the seed generate.py\'s spelling')
@click.option('--t_steps', metavar='LIST', default=None, help='Explicit decreasing grid, e.g. "[80,10.98,3.88,1.58,0.57,0.17,0.002]" (sets num_steps and the sigma range)')
@click.option('--schedule_type', metavar='NAME', type=click.Choice(solvers.SCHEDULES + ('gits',)), default=None, help='Time schedule (gits: searched from a teacher trajectory, training/gits.py)')
@click.option('--solver_tea', metavar='NAME', default=None, help='GITS: teacher solver [default: ipndm]')
@click.option('--num_steps_tea', metavar='INT', type=int, default=None, help='GITS: points of the fine teacher grid (polynomial, --schedule_rho) [default: 61]')
@click.option('--metric', metavar='dev|l1|l2', default=None, help='GITS: cost of a jump [default: dev]')
@click.option('--coeff', metavar='FLOAT', type=float, default=None, help='GITS: cost weight growth per step [default: 1.15]')
@click.option('--num_warmup', metavar='INT', type=int, default=None, help='GITS: teacher runs for the cost table (cached in exps/gits_cache) [default: 256]')
@click.option('--schedule_rho', '--rho', 'schedule_rho', metavar='FLOAT', type=float, default=None, help='Schedule exponent')
@click.option('--sigma_min', metavar='FLOAT', type=float, default=None, help='Lowest noise level [default: the model\'s]')
@click.option('--sigma_max', metavar='FLOAT', type=float, default=None, help='Highest noise level [default: the model\'s]')
@click.option('--afs', metavar='BOOL', type=bool, default=None, help='Analytical first step (saves one NFE)')
@click.option('--denoise_to_zero', metavar='BOOL', type=bool, default=None, help='Final denoising call (one more NFE)')
@click.option('--max_order', metavar='INT', type=int, default=None, help='Order of multistep solvers')
@click.option('--predict_x0', metavar='BOOL', type=bool, default=None, help='DPM-Solver++/UniPC: data prediction')
@click.option('--lower_order_final', metavar='BOOL', type=bool, default=None, help='Lower the order on the final steps of short runs')
@click.option('--variant', metavar='NAME', default=None, help='Update variant: unipc bh2|bh1, dpmpp phi3|2phi3 (docs/solvers.md) [default: the first]')
@click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance (models that support it)')
@click.option('--guidance_rate', '--cfg_scale', 'guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
@click.option('--prompt', metavar='TEXT', default=None, help='One prompt for every image (text-to-image models)')
@click.option('--prompt_file', '--prompt_path', 'prompt_file', metavar='PATH', default=None, help='Prompts: text lines or a CSV with a text column')
@click.option('--class', 'class_idx', metavar='INT', type=int, default=None, help='Fixed class label (conditional models)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Total batch size over all workers')
@click.option('--batch-gpu', 'batch_gpu', metavar='INT', type=click.IntRange(min=1), default=None, help='Per-worker cap')
@click.option('--seeds', metavar='LIST', default='0-63', help="Seeds, e.g. '0-63' or '1,5,10-19'")
@click.option('--outdir', '--output_path', 'outdir', metavar='DIR', default=None, help='Output folder [default: samples/DATASET/SOLVER_nfeN_SCHEDULE, predictors: KIND-..._HASH]')
@click.option('--subdirs', metavar='BOOL', type=bool, default=True, help='1000 images a folder')
@click.option('--grid', metavar='BOOL', type=bool, default=False, help='Also write <outdir>.grid.png of the first 64 images')
@click.option('--save_npz', metavar='BOOL', type=bool, default=False, help='Also save the raw float samples (.npz per seed)')
@click.option('--dtype', metavar='NAME', type=click.Choice(list(DTYPES)), default=None, help='Sampling dtype [default: the config\'s, else float32]')
@click.option('--device', metavar='DEV', default=None, help='Device [default: cuda if available]')
@click.option('--timesteps', metavar='INT', type=click.IntRange(min=1), default=None, help='Steps (the seed\'s name): num_steps = timesteps + 1')
@click.option('--num_samples', metavar='INT', type=click.IntRange(min=1), default=None, help='Seeds 0..N-1 (replaces --seeds)')
@click.option('--eta', metavar='FLOAT', type=click.FloatRange(min=0), default=None, help='Solver ddim: stochasticity (0 = Euler, 1 = ancestral); noise drawn per seed')
@click.option('--S_churn', 'S_churn', metavar='FLOAT', type=float, default=None, help='edm_sde: churn (EDM Algorithm 2) [default: 0]')
@click.option('--S_min', 'S_min', metavar='FLOAT', type=float, default=None, help='edm_sde: churn from this sigma [default: 0]')
@click.option('--S_max', 'S_max', metavar='FLOAT', type=float, default=None, help='edm_sde: churn up to this sigma; sed_ref: second-order branch above it [default: inf]')
@click.option('--S_noise', 'S_noise', metavar='FLOAT', type=float, default=None, help='edm_sde: churn noise scale [default: 1]')
@click.option('--randn_like', metavar='db|ddb', type=click.Choice(['db', 'ddb']), default=None, help='sed2/sed_ref: Brownian increment only (db) or with its time integral (ddb) [default: sed2 ddb, sed_ref db]')
@click.option('--beta', metavar='FLOAT', type=float, default=None, help='euler_maruyama/sed2: Langevin rate of the reverse SDE (0 = the ODE) [default: 1]')
@click.option('--drift', metavar='lagged|fresh', type=click.Choice(['lagged', 'fresh']), default=None, help='sed2: drift in the JVP tangent, the previous step\'s (1 call a step) or a fresh call (2) [default: lagged]')
@click.option('--jvp', metavar='auto|jvp|fd', type=click.Choice(['auto', 'jvp', 'fd']), default=None, help='sed2/sed_ref: forward-mode JVP or a finite difference (one extra evaluation) [default: auto]')
@click.option('--parallel', metavar='taa|picard', type=click.Choice(par.PARALLEL_METHODS), default=None, help='Parallel-in-time solving (ParaTAA, Picard/ParaDiGMS) [default: sequential]')
@click.option('--window_size', metavar='INT', type=int, default=None, help='Parallel: unknowns updated per iteration [default: all]')
@click.option('--order', metavar='INT', type=int, default=None, help='Parallel: equations reach this many evaluations back [default: the window]')
@click.option('--memory_size', metavar='INT', type=int, default=None, help='Parallel: Anderson history (1 = none) [default: 2 for taa]')
@click.option('--max_steps', metavar='INT', type=int, default=None, help='Parallel: cap on the iterations [default: the sequential evaluations]')
@click.option('--tol', metavar='FLOAT', type=float, default=None, help='Parallel: per-step residual tolerance (RMS, VP units; --stop=final: only while a shorter window slides) [default: 1e-4]')
@click.option('--stop', metavar='final|residual', type=click.Choice(par.STOP_RULES), default='final', help='Parallel stopping rule: final = error estimate of the output, residual = per-step (the references\')')
@click.option('--final_tol', metavar='FLOAT', type=float, default=par.FINAL_TOL, help='Parallel, --stop=final: bound on the output\'s RMS error estimate (VP units)')
@click.option('--save_iterates', metavar='BOOL', type=bool, default=False, help='Parallel: save each iteration\'s output estimate (iterates/SEED/K.png)')
@click.option('--save_trajectory', metavar='BOOL', type=bool, default=False, help='Parallel: save the converged trajectory per seed (trajectories/SEED.npz)')
@click.option('--init_trajectory', metavar='DIR', default=None, help='Parallel: start from the trajectories in DIR (warm start)')
@click.option('--variation_steps', metavar='INT', type=int, default=None, help='Parallel, with --init_trajectory: re-solve only the last K evaluations [default: all]')
def main(dataset_name, model_path, predictor_path, solver, num_steps, t_steps, schedule_type, schedule_rho, sigma_min,
         sigma_max, afs, denoise_to_zero, max_order, predict_x0, lower_order_final, variant, guidance_type,
         guidance_rate, prompt, prompt_file, class_idx, batch, batch_gpu, seeds, outdir, subdirs, grid, save_npz,
         dtype, device, timesteps, num_samples, eta, parallel, window_size, order, memory_size, max_steps, tol, stop,
         final_tol, save_iterates, save_trajectory, init_trajectory, variation_steps, network, S_churn, S_min, S_max,
         S_noise, randn_like, beta, drift, jvp, classifier_path, resolution, solver_tea, num_steps_tea, metric, coeff,
         num_warmup):
    """Generate images: any solver, any model, any number of torchrun workers.

    \b
    torchrun --standalone --nproc_per_node=2 sample.py --dataset_name=gmm_image --sampler_stu=dpmpp --num_steps=6
    python sample.py --predictor_path=1 --seeds=0-49999
    """
    try:
        run(**locals())
    except (UsageError, ValueError, models.ModelError, NonFiniteError, OSError) as e:
        dist.report_error('sample.py', e, same_everywhere=not isinstance(e, (NonFiniteError, OSError)))
        dist.shutdown()
        sys.exit(1)
    dist.shutdown()


def run(dataset_name, model_path, predictor_path, solver, num_steps, t_steps, schedule_type, schedule_rho, sigma_min,
        sigma_max, afs, denoise_to_zero, max_order, predict_x0, lower_order_final, variant, guidance_type,
        guidance_rate, prompt, prompt_file, class_idx, batch, batch_gpu, seeds, outdir, subdirs, grid, save_npz,
        dtype, device, timesteps=None, num_samples=None, eta=None, parallel=None, window_size=None, order=None,
        memory_size=None, max_steps=None, tol=None, stop='final', final_tol=par.FINAL_TOL, save_iterates=False,
        save_trajectory=False, init_trajectory=None, variation_steps=None, network=None, S_churn=None, S_min=None,
        S_max=None, S_noise=None, randn_like=None, beta=None, drift=None, jvp=None, classifier_path=None,
        resolution=None, solver_tea=None, num_steps_tea=None, metric=None, coeff=None, num_warmup=None):
    stochastic_given = {k: v for k, v in dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                                              randn_like=randn_like, beta=beta, drift=drift, jvp=jvp).items()
                        if v is not None}
    seed_style = network is not None or randn_like is not None
    if network is not None:
        if model_path is not None:
            raise UsageError(f"--network={network} and --model_path={model_path} name the same thing; give one")
        model_path = network
    if num_samples is not None:
        seeds = f'0-{num_samples - 1}'
    if timesteps is not None:
        if num_steps is not None and num_steps != timesteps + 1:
            raise UsageError(f"--timesteps={timesteps} (steps) and --num_steps={num_steps} (time points) disagree; "
                             "give one of them")
        num_steps = timesteps + 1
    if parallel is None and (save_iterates or save_trajectory or init_trajectory or variation_steps is not None):
        raise UsageError("--save_iterates/--save_trajectory/--init_trajectory/--variation_steps need --parallel=taa "
                         "or --parallel=picard")
    given = [f'--{k}' for k, v in dict(window_size=window_size, order=order, memory_size=memory_size,
                                       max_steps=max_steps, tol=tol).items() if v is not None]
    if parallel is None and given:
        raise UsageError(f"{'/'.join(given)} apply to parallel solving only; add --parallel=taa or --parallel=picard")
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
        cfg = configs.load_config(dataset_name or meta.get('config') or meta['dataset_name'])
        if cfg['dataset_name'] != meta['dataset_name']:
            raise UsageError(f"the predictor {predictor_path} was trained for dataset {meta['dataset_name']!r}, not "
                             f"{cfg['dataset_name']!r}; drop --dataset_name or use a predictor trained for it")
        guidance_type = guidance_type or meta.get('guidance_type')
        guidance_rate = guidance_rate or meta.get('guidance_rate')
    elif network is not None and dataset_name is None:
        # The seed's generate.py reads EDM pickles, samples in float64 over EDM's sigma range 0.002-80.
        cfg = dict(dataset_name='edm', model=dict(family='edm', sigma_min=0.002, sigma_max=80.0),
                   sample=dict(dtype='float64'))
    else:
        cfg = configs.config_for_run(dataset_name, model_path)
    dataset_name = cfg['dataset_name']
    if solver is None and predictor is None and seed_style:
        solver = 'sed_ref'    # the seed's command line (--network, --randn_like) runs its own sampler
        dist.print0('--network/--randn_like without --sampler_stu: sampling with sed_ref (2nd-SED as its reference '
                    'code does it)')
    overrides = dict(solver=solver, num_steps=num_steps, schedule_type=schedule_type, schedule_rho=schedule_rho,
                     sigma_min=sigma_min, sigma_max=sigma_max, afs=afs, denoise_to_zero=denoise_to_zero,
                     max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                     variant=variant, dtype=dtype, eta=eta or None)
    if t_steps is not None:
        t_grid = parse_t_steps(t_steps)
        overrides.update(t_steps=t_grid, num_steps=len(t_grid), sigma_max=t_grid[0], sigma_min=t_grid[-1])
    settings = resolve_settings(cfg, overrides)
    gits_given = {k: v for k, v in dict(solver_tea=solver_tea, num_steps_tea=num_steps_tea, metric=metric,
                                        coeff=coeff, num_warmup=num_warmup).items() if v is not None}
    gits_opts = None
    if settings['schedule_type'] == 'gits' and predictor is None and not settings.get('t_steps'):
        import training.gits
        gits_opts = training.gits.resolve(dict(gits_given, fine_rho=settings['schedule_rho']))
        # checked as the fine grid's schedule until the grid is searched (after the model is loaded)
        settings['schedule_type'] = gits_opts['fine_schedule']
    elif gits_given:
        raise UsageError(f"--{next(iter(gits_given))} applies to --schedule_type=gits only; drop it or add "
                         "--schedule_type=gits")
    if predictor is None:
        unused = solvers.stochastic.unused_option(settings['solver'], stochastic_given)
        if unused:
            raise UsageError(unused[1])
        # the sampler's options as it runs them (defaults filled in), so the folder's recorded settings see them
        settings.update(solvers.stochastic.option_defaults(settings['solver']), **stochastic_given)
        solvers.check_options(**settings)
        if settings.get('eta') and settings['solver'] != 'ddim':
            raise UsageError(f"--eta={eta} is for --solver=ddim (stochastic DDIM); {settings['solver']} is "
                             "deterministic")
    else:
        if t_steps is not None:
            raise UsageError(f"--t_steps does not apply with --predictor_path={predictor_path} (the predictor has "
                             "its own grid); drop it")
        if stochastic_given:
            raise UsageError(f"--{next(iter(stochastic_given))} does not apply with --predictor_path="
                             f"{predictor_path} (a predictor runs its own deterministic solver); drop it")
        check_predictor_options(predictor, {k: v for k, v in overrides.items() if v is not None and k != 'dtype'},
                                predictor_path)
    # Rank 0 loads (and may download) first, the others wait, then load from the cache.
    if dist.get_rank() != 0:
        dist.barrier()
    net = load_model(cfg, model_path, device, guidance_type, guidance_rate, classifier_path, resolution)
    if dist.get_rank() == 0:
        dist.barrier()
    if settings.get('t_steps') and (settings['t_steps'][0] > net.sigma_max * (1 + 1e-9)
                                    or settings['t_steps'][-1] < net.sigma_min * (1 - 1e-9)):
        raise UsageError(f"--t_steps runs from {settings['t_steps'][0]:g} to {settings['t_steps'][-1]:g}, outside "
                         f"the model's sigma range {net.sigma_max:g} to {net.sigma_min:g}; give a grid inside it")
    if predictor is None and settings.get('jvp') == 'jvp' and not net.forward_ad:
        raise UsageError(f"--jvp=jvp: the model of {dataset_name} cannot give a forward-mode JVP (its forward "
                         "differentiates internally, e.g. classifier guidance); use --jvp=fd or --jvp=auto")
    if predictor is None:   # the sigma range again, now with the model's own ends
        solvers.check_options(**dict(settings, sigma_min=settings.get('sigma_min') or net.sigma_min,
                                     sigma_max=settings.get('sigma_max') or net.sigma_max))
    if predictor is not None:
        predictor.check_model(net)
        predictor = predictor.to(device)
        settings.update(predictor.summary())
    if gits_opts is not None:
        gits_sigmas, _ = training.gits.gits_grid(
            net, settings['num_steps'], gits_opts, model_path or cfg['model'], settings.get('sigma_min'),
            settings.get('sigma_max'), DTYPES[settings['dtype']], device, guidance=(guidance_type, guidance_rate),
            prompts=gits_prompts(net, prompt, prompt_file, dataset_name), log=dist.print0)
        settings.update(schedule_type='gits', t_steps=gits_sigmas.tolist(), gits={k: v for k, v in gits_opts.items()
                                                                          if k != 'cache_dir'})
    if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
        raise UsageError(f"--class={class_idx} is out of range: the model has {net.label_dim} classes"
                         if net.label_dim else f"--class given, but {dataset_name} is unconditional; drop --class")
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt=prompt, prompt_file=prompt_file, dataset_name=dataset_name)
    elif prompt is not None or prompt_file is not None:
        raise UsageError(f"--prompt/--prompt_file given, but {dataset_name} is not a text-to-image model")
    parallel_opts = None
    if parallel is not None:
        solve_keys = ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs', 'denoise_to_zero', 'max_order',
                      'predict_x0', 'lower_order_final', 'variant', 'sigma_min', 'sigma_max', 'eta')
        opts = {k: settings[k] for k in solve_keys if k in settings}
        if settings.get('t_steps'):
            opts['sigmas'] = torch.tensor(settings['t_steps'], dtype=torch.float64)
            opts.pop('schedule_type')
        scheme = par.solver_scheme(net, predictor=predictor, **opts)
        if tol is None:
            tol = 1e-4
        if memory_size is None:
            memory_size = 2 if parallel == 'taa' else 1
        parallel_opts = dict(method=parallel, window_size=window_size, order=order, memory_size=memory_size,
                             max_steps=max_steps, tol=tol, stop=stop, final_tol=final_tol,
                             variation_steps=variation_steps)
        par.check_parallel_options(num_evals=scheme.num_evals, **{k: v for k, v in parallel_opts.items()
                                                                   if k != 'variation_steps'})
        if init_trajectory is not None and not os.path.isdir(init_trajectory):
            raise UsageError(f"--init_trajectory={init_trajectory} is not a folder; give a run's trajectories folder")
        if variation_steps is not None and init_trajectory is None:
            raise UsageError("--variation_steps needs --init_trajectory (the run to start from)")
        if variation_steps is not None and not 1 <= variation_steps <= scheme.num_evals:
            raise UsageError(f"--variation_steps={variation_steps} must be between 1 and the number of evaluations "
                             f"({scheme.num_evals})")
        parallel_opts = dict(parallel_opts, scheme=scheme, save_iterates=save_iterates,
                             save_trajectory=save_trajectory, init_trajectory=init_trajectory)
    # Everything that changes a pixel: a folder holds images of one such setting only.
    image_settings = dict(dataset_name=dataset_name, model=model_path or cfg['model'], classifier=classifier_path,
                          resolution=resolution,
                          guidance_type=guidance_type, guidance_rate=guidance_rate, class_idx=class_idx,
                          prompt=prompt, prompt_file=file_digest([prompt_file]) if prompt_file else None,
                          settings=dict(settings, sigma_min=settings.get('sigma_min') or net.sigma_min,
                                        sigma_max=settings.get('sigma_max') or net.sigma_max))
    if predictor is not None:
        image_settings['predictor'] = file_digest(training.predictor_files(predictor_path))
    if parallel_opts is not None:
        image_settings['parallel'] = {k: v for k, v in parallel_opts.items()
                                      if k not in ('scheme', 'save_iterates', 'save_trajectory')}
    if outdir is None:
        nfe = predictor.nfe() if predictor is not None else solvers.nfe_formula(**settings)
        name = f"{settings['solver']}_nfe{nfe}_{settings['schedule_type']}"
        if predictor is not None:
            name = f"{predictor.kind}-{name}_{image_settings['predictor']}"
        outdir = os.path.join('samples', dataset_name, name + (f'_{parallel}' if parallel else ''))
    check_outdir(outdir, image_settings)
    problem = None
    if dist.get_rank() == 0:
        try:
            os.makedirs(outdir, exist_ok=True)
            probe = os.path.join(outdir, '.write_test')
            open(probe, 'w').close()
            os.unlink(probe)
        except OSError as e:
            problem = f"cannot write to --outdir={outdir} ({e.strerror}); choose a writable folder"
    problem = dist.broadcast_object(problem)        # every worker stops on it, none waits for rank 0 in vain
    if problem:
        raise UsageError(problem)
    if dist.get_rank() == 0:
        options = dict(dataset_name=dataset_name, model_path=model_path, classifier_path=classifier_path,
                       predictor_path=predictor_path,
                       seeds=seeds, batch=batch, settings=settings, images=image_settings)
        atomic_write(os.path.join(outdir, 'sample_options.json'),
                     json.dumps(options, indent=2, default=str).encode())
    dist.barrier()
    dist.print0(f'Sampling {len(seed_list)} seeds of {dataset_name} with {settings["solver"]} '
                f'({settings["num_steps"]} time points, {settings["schedule_type"]}) into {outdir}')
    summary = generate(net, seed_list, outdir, settings, batch, batch_gpu, subdirs, class_idx, save_npz, predictor,
                       device, prompts, parallel=parallel_opts)
    dist.barrier()
    if dist.get_rank() == 0:
        grid_path = write_grid(outdir, seed_list, subdirs) if grid else None
        summary['outdir'] = outdir
        lines = [f"images: {summary['images']} new, {summary['skipped']} already there"]
        p = summary.get('parallel')
        if p and summary['images']:
            lines += [f"{p['method']}: sequential rounds {p['iterations_per_batch']:g} per batch of up to {batch} "
                      f"(per image: mean {p['rounds_mean']:.2f}, max {p['rounds_max']}; the sequential solver: "
                      f"{p['sequential_rounds']})",
                      f"evaluations per image: {p['evals_per_image']:.1f} (sequential: {p['sequential_evals']})",
                      f"residual at stop: {p['residual_max']:.3g} (largest first-order RMS residual, VP units)",
                      f"wall time: {summary['wall_s']:.2f} s, {summary['images_per_s']:.1f} images/s"]
        elif summary['images']:
            jvp = summary.get('jvp_per_image')
            split = (f"{summary['nfe_per_image'] - jvp:g} plain calls + {jvp:g} forward-mode JVP passes, each "
                     "costing about 1.5-3 plain calls; " if jvp else '')
            rows = net.rows_per_eval
            lines += [f"NFE per image: {summary['nfe_per_image']:g} ({split}sequential rounds: "
                      f"{summary['sequential_rounds']:g}" + (f"; classifier-free guidance: {rows} network rows per "
                      f"evaluation, {rows * summary['nfe_per_image']:g} per image)" if rows > 1 else ")"),
                      f"wall time: {summary['wall_s']:.2f} s, {summary['images_per_s']:.1f} images/s"]
        lines.append(f'images in: {outdir}')
        if grid_path:
            lines.append(f'grid: {grid_path}')
        print('\n'.join(lines), flush=True)
    return summary


if __name__ == '__main__':
    main()
