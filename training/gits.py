"""GITS schedules for a model: the cost table from a fine teacher trajectory (cached on disk by setting, as
safetensors), then solvers/gits.py's dynamic programming for any number of steps and coeff.

    python -m training.gits --dataset_name=gmm_image --num_steps=6      # prints the grid (the --t_steps form)

sample.py --schedule_type=gits and the benchmarks go through gits_grid(). The teacher's noises (and labels or
prompts) are drawn per sample index from a seeded generator, so the table is the same for any worker count and
on every run (the reference draws them from the global RNG).
"""
import hashlib
import json
import os
import time

import torch
from safetensors.torch import load, save

import solvers
from solvers import gits as core
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write
from torch_utils.misc import run_command_line

# The reference's defaults (gits-main sample.py with its recipes' --num_steps_tea=61 --metric=dev --coeff=1.15).
DEFAULTS = dict(solver_tea='ipndm', num_steps_tea=61, metric='dev', coeff=1.15, num_warmup=256,
                fine_schedule='polynomial', fine_rho=7.0, seed=0, cache_dir=os.path.join('exps', 'gits_cache'))
TABLE_KEYS = ('solver_tea', 'num_steps_tea', 'metric', 'num_warmup', 'fine_schedule', 'fine_rho', 'seed')


def resolve(given):
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in given.items() if v is not None and k in DEFAULTS})
    if opts['metric'] not in core.METRICS:
        raise ValueError(f"unknown --metric={opts['metric']}; allowed: {', '.join(core.METRICS)}")
    if opts['solver_tea'] not in solvers.ode_solvers():
        raise ValueError(f"--solver_tea={opts['solver_tea']} is not an ODE solver; use one of "
                         f"{', '.join(solvers.ode_solvers())}")
    if opts['fine_schedule'] not in solvers.SCHEDULES:
        raise ValueError(f"unknown GITS fine schedule {opts['fine_schedule']!r}; allowed: "
                         f"{', '.join(solvers.SCHEDULES)}")
    if not opts['num_steps_tea'] >= 3 or not opts['num_warmup'] >= 1:
        raise ValueError(f"--num_steps_tea={opts['num_steps_tea']} must be >= 3 and --num_warmup="
                         f"{opts['num_warmup']} >= 1")
    if not opts['coeff'] > 0:
        raise ValueError(f"--coeff={opts['coeff']} must be > 0")
    return opts


def fine_grid(net, opts, sigma_min=None, sigma_max=None):
    return solvers.get_schedule(opts['num_steps_tea'], sigma_min or net.sigma_min, sigma_max or net.sigma_max,
                                opts['fine_schedule'], opts['fine_rho'], net=net)


def table_settings(net, opts, model_id, sigma_min=None, sigma_max=None, dtype=torch.float64, guidance=None):
    """Everything the cost table depends on (its cache key)."""
    return dict({k: opts[k] for k in TABLE_KEYS}, model=str(model_id), guidance=guidance,
                sample_shape=list(net.sample_shape), sigma_min=float(sigma_min or net.sigma_min),
                sigma_max=float(sigma_max or net.sigma_max), dtype=str(dtype))


def cache_path(cache_dir, meta):
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"gits-{meta['solver_tea']}-{meta['num_steps_tea']}-{meta['metric']}-"
                                   f"{digest}.safetensors")


def compute_table(net, opts, sigmas, dtype, device, prompts=None, batch=64):
    """The mean cost table over num_warmup teacher runs, split over the workers."""
    from training.distill import draw_batch
    rank, world = dist.get_rank(), dist.get_world_size()
    n = opts['num_warmup']
    mine = list(range(n * rank // world, n * (rank + 1) // world))
    T = len(sigmas)
    sums, dev_sum = torch.zeros(T, T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    grid = sigmas.to(device=device, dtype=dtype)
    with torch.no_grad():
        for lo in range(0, len(mine), batch):
            z, cond = draw_batch(net, opts['seed'], 0, mine[lo:lo + batch], dtype, device, prompts)
            states, slopes = core.teacher_trajectory(net, z * grid[0], grid, opts['solver_tea'], cond,
                                                     max_order=solvers.SOLVERS[opts['solver_tea']].default_order)
            s, d = core.cost_sums(states, slopes, grid, opts['metric'])
            sums, dev_sum = sums + s, dev_sum + d
    sums = dist.all_reduce_sum(sums.to(device)).cpu()
    dev_sum = dist.all_reduce_sum(dev_sum.to(device)).cpu()
    return core.cost_table(sums, dev_sum, n)


def cached_table(net, opts, model_id, sigma_min=None, sigma_max=None, dtype=torch.float64, device='cpu',
                 prompts=None, guidance=None, log=print):
    """(cost table [T, T], fine grid [T]) of this setting: read from the cache if there, else computed and saved."""
    meta = table_settings(net, opts, model_id, sigma_min, sigma_max, dtype, guidance)
    path = cache_path(opts['cache_dir'], meta)
    sigmas = fine_grid(net, opts, sigma_min, sigma_max)
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            data = load(f.read())
        if data['sigmas'].shape == sigmas.shape and torch.allclose(data['sigmas'], sigmas, rtol=1e-12, atol=0):
            log(f'GITS cost table: {path} (reused)')
            return data['cost'], data['sigmas']
    start = time.time()
    cost = compute_table(net, opts, sigmas, dtype, device, prompts)
    if dist.get_rank() == 0:
        os.makedirs(opts['cache_dir'], exist_ok=True)
        atomic_write(path, save({'cost': cost.contiguous(), 'sigmas': sigmas.contiguous()},
                                metadata={'settings': json.dumps(meta, default=str)}))
    dist.barrier()
    log(f"GITS cost table: {opts['num_warmup']} {opts['solver_tea']} runs of {opts['num_steps_tea']} points in "
        f"{time.time() - start:.1f} s, saved as {path}")
    return cost, sigmas


def gits_grid(net, num_steps, opts, model_id, sigma_min=None, sigma_max=None, dtype=torch.float64, device='cpu',
              prompts=None, guidance=None, log=print):
    """The GITS grid of num_steps time points (a decreasing float64 tensor of sigmas) and the chosen indices."""
    cost, sigmas = cached_table(net, opts, model_id, sigma_min, sigma_max, dtype, device, prompts, guidance, log)
    path = core.dp_search(cost, num_steps, opts['coeff'])
    return sigmas[path].clone(), path


def main(argv=None):
    import click
    import configs
    from models.loading import load_model
    from training.ld3 import format_grid

    @click.command(context_settings=dict(show_default=True))
    @click.option('--dataset_name', metavar='NAME|YAML', default=configs.DEFAULT_DATASET, help='Dataset config')
    @click.option('--model_path', metavar='PATH', default=None, help='Override the config\'s model source')
    @click.option('--num_steps', metavar='INT', type=click.IntRange(min=2), default=6, help='Time points of the grid')
    @click.option('--solver_tea', metavar='NAME', default=DEFAULTS['solver_tea'], help='Teacher solver')
    @click.option('--num_steps_tea', metavar='INT', type=int, default=DEFAULTS['num_steps_tea'], help='Fine grid points')
    @click.option('--metric', metavar='dev|l1|l2', default=DEFAULTS['metric'], help='Cost of a jump')
    @click.option('--coeff', metavar='FLOAT', type=float, default=DEFAULTS['coeff'], help='Weight growth per step')
    @click.option('--num_warmup', metavar='INT', type=int, default=DEFAULTS['num_warmup'], help='Teacher runs')
    @click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance')
    @click.option('--guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
    @click.option('--cache_dir', metavar='DIR', default=DEFAULTS['cache_dir'], help='Where cost tables are kept')
    def cli(dataset_name, model_path, num_steps, guidance_type, guidance_rate, **given):
        cfg = configs.load_config(dataset_name)
        net = load_model(cfg, model_path, torch.device('cpu'), guidance_type, guidance_rate)
        opts = resolve(given)
        grid, path = gits_grid(net, num_steps, opts, model_path or cfg['model'],
                               guidance=(guidance_type, guidance_rate))
        print(f'indices {path}')
        print(format_grid(grid))

    run_command_line(cli, argv, 'training.gits')


if __name__ == '__main__':
    main()
