"""Distil a learned solver (EPD, EPD-Plugin on iPNDM, AMED, AMED-Plugin) from a teacher solver's trajectories.

    torchrun --standalone --nproc_per_node=2 train.py --dataset_name=gmm_image --sampler_stu=epd --num_steps=4
"""
import json
import math
import os
import re
import sys
import time

import click
import torch

import configs
import models
import solvers
import training
from models.loading import load_model
from training.distill import TEACHERS, distill_loss, draw_batch
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write

STUDENTS = ('epd', 'ipndm', 'amed', 'euler', 'dpm', 'dpmpp')   # ipndm: EPD-Plugin; euler/dpm/dpmpp: AMED-Plugin
STATE_FILE = 'training-state.pt'


# Options a dataset config's `train:` section may set; the command line overrides both.
TRAIN_DEFAULTS = dict(sampler_stu='epd', sampler_tea='dpm', num_steps=4, M=3, num_points=2, afs=True, scale_dir=0.05,
                      scale_time=0.05, fcn=False, loss='inception', alpha=10.0, schedule_type='polynomial',
                      schedule_rho=7.0, predict_x0=True, lower_order_final=True, prompt_path=None, batch=64,
                      total_kimg=10.0, lr=0.01, coslr=False, dtype='float32')


class UsageError(Exception):
    pass


def resolve_options(cfg, given, plugin='epd'):
    """Training options: the built-in defaults, then the dataset config's `train:` section, then its `epd:` or
    `amed:` subsection for the predictor being trained, then the command line (options given as None were not
    given). The training dtype falls back to the config's sampling dtype."""
    section = dict(cfg['train'])
    per_kind = {kind: dict(section.pop(kind) or {}) for kind in ('epd', 'amed') if kind in section}
    unknown = sorted(set(section).union(*per_kind.values()) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)} in the train section of the {cfg['dataset_name']} "
                         f"config; allowed: {', '.join(TRAIN_DEFAULTS)} (and epd:, amed: subsections of them)")
    given = {k: v for k, v in given.items() if v is not None}
    opts = dict(TRAIN_DEFAULTS, dtype=cfg['sample'].get('dtype', TRAIN_DEFAULTS['dtype']))
    opts.update(section)
    opts.update(per_kind.get(predictor_kind(given.get('sampler_stu', opts['sampler_stu']), plugin), {}))
    opts.update(given)
    return opts


def predictor_kind(sampler_stu, plugin):
    if sampler_stu == 'epd':
        return 'epd'
    if sampler_stu == 'amed':
        return 'amed'
    if sampler_stu == 'ipndm':
        return 'amed' if plugin == 'amed' else 'epd'
    return 'amed'        # euler, dpm, dpmpp: AMED-Plugin


def next_run_dir(outdir, name):
    """Create and return outdir/NNNNN-name with the next free number; mkdir claims the number, so runs started at
    the same moment get different folders."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        ids = [int(m.group(1)) for d in os.listdir(outdir) if (m := re.match(r'(\d+)-', d))]
        path = os.path.join(outdir, f'{max(ids, default=0) + 1:05d}-{name}')
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


class Logger:
    def __init__(self, path):
        self.file = open(path, 'a') if path else None

    def __call__(self, line):
        if dist.get_rank() == 0:
            print(line, flush=True)
            if self.file:
                self.file.write(line + '\n')
                self.file.flush()


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', metavar='NAME', default=configs.DEFAULT_DATASET, help='Dataset config (configs/NAME.yaml or a YAML path)')
@click.option('--model_path', metavar='PATH|URL|python:MOD:FN', default=None, help='Override the config\'s model source')
@click.option('--sampler_stu', metavar='NAME', type=click.Choice(STUDENTS), default=None, help='Student: epd, ipndm (EPD-Plugin, or AMED-Plugin with --plugin=amed), amed, euler/dpm/dpmpp (AMED-Plugin) [default: epd]')
@click.option('--plugin', metavar='epd|amed', type=click.Choice(['epd', 'amed']), default='epd', help='For --sampler_stu=ipndm: which predictor plugs in')
@click.option('--sampler_tea', metavar='NAME', type=click.Choice(TEACHERS), default=None, help='Teacher solver [default: dpm]')
@click.option('--num_steps', metavar='INT', type=click.IntRange(min=2), default=None, help='Student time points [default: 4]')
@click.option('--M', 'M', metavar='INT', type=click.IntRange(min=0), default=None, help='Teacher points inserted per student step [default: 3]')
@click.option('--num_points', metavar='INT', type=click.IntRange(min=1), default=None, help='EPD parallel points per step (K) [default: 2]')
@click.option('--afs', metavar='BOOL', type=bool, default=None, help='Analytical first step [default: True]')
@click.option('--scale_dir', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=None, help='Direction scale range [1-s, 1+s] [default: 0.05]')
@click.option('--scale_time', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=None, help='Time scale range [1-s, 1+s] [default: 0.05]')
@click.option('--fcn', metavar='BOOL', type=bool, default=None, help='EPD: no direction scale on the final step [default: False]')
@click.option('--loss', metavar='l2|inception|rmse', type=click.Choice(['l2', 'inception', 'rmse']), default=None, help='Objective: per-step L2, final Inception features, final RMSE [default: inception]')
@click.option('--alpha', metavar='FLOAT', type=float, default=None, help='Weight of the Inception-feature loss [default: 10]')
@click.option('--inception_path', metavar='PATH', default=None, help='Inception-v3 detector for --loss=inception')
@click.option('--schedule_type', metavar='NAME', type=click.Choice(solvers.SCHEDULES), default=None, help='Time schedule [default: polynomial]')
@click.option('--schedule_rho', metavar='FLOAT', type=float, default=None, help='Schedule exponent [default: 7]')
@click.option('--sigma_min', metavar='FLOAT', type=float, default=None, help='[default: the model\'s]')
@click.option('--sigma_max', metavar='FLOAT', type=float, default=None, help='[default: the model\'s]')
@click.option('--max_order', metavar='INT', type=int, default=None, help='Multistep order (iPNDM plugins, multistep teachers)')
@click.option('--predict_x0', metavar='BOOL', type=bool, default=None, help='DPM-Solver++ teacher: data prediction [default: True]')
@click.option('--lower_order_final', metavar='BOOL', type=bool, default=None, help='DPM-Solver++ teacher option [default: True]')
@click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance (models that support it)')
@click.option('--guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
@click.option('--prompt_path', metavar='PATH', default=None, help='Prompts for text-to-image models (lines or CSV)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=None, help='Total batch size [default: 64]')
@click.option('--batch-gpu', 'batch_gpu', metavar='INT', type=click.IntRange(min=1), default=None, help='Per-worker cap (gradient accumulation)')
@click.option('--total_kimg', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None, help='Training length in thousands of samples [default: 10]')
@click.option('--lr', metavar='FLOAT', type=float, default=None, help='Adam learning rate [default: 0.01]')
@click.option('--coslr', metavar='BOOL', type=bool, default=None, help='Cosine learning-rate schedule [default: False]')
@click.option('--seed', metavar='INT', type=int, default=0, help='Random seed')
@click.option('--snap', metavar='INT', type=click.IntRange(min=1), default=10, help='Save the training state every N iterations')
@click.option('--outdir', metavar='DIR', default='exps', help='Where experiment folders go')
@click.option('--desc', metavar='STR', default=None, help='Extra text for the folder name')
@click.option('--resume', metavar='DIR|INT', default=None, help='Continue an experiment from its last saved state')
@click.option('--dtype', metavar='NAME', type=click.Choice(['float32', 'float64']), default=None, help='Training dtype [default: float32]')
@click.option('--device', metavar='DEV', default=None, help='[default: cuda if available]')
@click.option('-n', '--dry-run', 'dry_run', is_flag=True, help='Print the options and exit')
def main(**kwargs):
    """Distil a learned-solver predictor into exps/NNNNN-<dataset>-<steps>-<nfe>-<stu>-<tea>-<M>-<schedule>[-afs]."""
    try:
        run(**kwargs)
    except (UsageError, ValueError, models.ModelError, OSError) as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        dist.shutdown()
        sys.exit(1)
    dist.shutdown()


def run(dataset_name, model_path, sampler_stu, plugin, sampler_tea, num_steps, M, num_points, afs, scale_dir,
        scale_time, fcn, loss, alpha, inception_path, schedule_type, schedule_rho, sigma_min, sigma_max, max_order,
        predict_x0, lower_order_final, guidance_type, guidance_rate, prompt_path, batch, batch_gpu, total_kimg, lr,
        coslr, seed, snap, outdir, desc, resume, dtype, device, dry_run):
    dist.init()
    device = torch.device(device) if device else dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = configs.load_config(dataset_name)
    opts = resolve_options(cfg, {k: v for k, v in locals().items() if k in TRAIN_DEFAULTS}, plugin)
    sampler_stu, sampler_tea, num_steps, M, num_points, afs = (opts[k] for k in (
        'sampler_stu', 'sampler_tea', 'num_steps', 'M', 'num_points', 'afs'))
    scale_dir, scale_time, fcn, loss, alpha, schedule_type, schedule_rho = (opts[k] for k in (
        'scale_dir', 'scale_time', 'fcn', 'loss', 'alpha', 'schedule_type', 'schedule_rho'))
    predict_x0, lower_order_final, prompt_path, batch, total_kimg, lr, coslr, dtype = (opts[k] for k in (
        'predict_x0', 'lower_order_final', 'prompt_path', 'batch', 'total_kimg', 'lr', 'coslr', 'dtype'))
    if batch % world:
        raise UsageError(f"--batch={batch} must be divisible by the number of workers ({world})")
    net = load_model(cfg, model_path, device, guidance_type, guidance_rate)
    kind = predictor_kind(sampler_stu, plugin)
    settings = dict(predictor=kind, dataset_name=cfg['dataset_name'], sampler_stu=sampler_stu, sampler_tea=sampler_tea,
                    num_steps=num_steps, M=M, num_points=num_points if kind == 'epd' else 1, afs=afs,
                    scale_dir=scale_dir, scale_time=scale_time, fcn=fcn, loss=loss, alpha=alpha,
                    schedule_type=schedule_type, schedule_rho=schedule_rho,
                    sigma_min=sigma_min or net.sigma_min, sigma_max=sigma_max or net.sigma_max,
                    max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                    guidance_type=guidance_type, guidance_rate=guidance_rate,
                    sample_shape=list(net.sample_shape), dtype=dtype)
    solvers.check_options('euler', num_steps, schedule_type, settings['sigma_min'], settings['sigma_max'])
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt_file=prompt_path, dataset_name=cfg['dataset_name'])
    if kind == 'amed':
        # The bottleneck's size, from one call on a real (drawn) input.
        with torch.no_grad():
            probe, probe_cond = draw_batch(net, seed, 0, [0], torch.float32, device, prompts)
            _, feature = net(probe, torch.ones(1, device=device), probe_cond, return_bottleneck=True)
        settings['feature_dim'] = int(feature.reshape(1, -1).shape[1])
    feature_net = None
    if loss == 'inception':
        from models.inception import load_inception, missing_detector_message
        path = inception_path or os.environ.get('FID_INCEPTION_PATH')
        if not path or not os.path.isfile(path):
            raise UsageError('--loss=inception needs the Inception-v3 detector, and none is available offline: '
                             + missing_detector_message(path or 'inception-2015-12-05.pkl')
                             + ' (or train with --loss=l2)')
        feature_net = load_inception(path, device=device)
    nfe = 2 * (num_steps - 1) - int(afs)
    name = f"{cfg['dataset_name']}-{num_steps}-{nfe}-{sampler_stu}-{sampler_tea}-{M}-{schedule_type}" + \
        ('-afs' if afs else '') + (f'-{desc}' if desc else '')
    options = dict(settings=settings, batch=batch, batch_gpu=batch_gpu, total_kimg=total_kimg, lr=lr, coslr=coslr,
                   seed=seed, world_size=world, model_path=model_path, prompt_path=prompt_path)
    if dry_run:
        dist.print0(json.dumps(dict(options, run_dir=os.path.join(outdir, 'NNNNN-' + name)), indent=2))
        return
    if resume is not None:
        run_dir = training.resolve_predictor_path(resume, outdir)
    else:
        run_dir = dist.broadcast_object(next_run_dir(outdir, name) if rank == 0 else None)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if resume is None:
            atomic_write(os.path.join(run_dir, 'training_options.json'),
                         json.dumps(dict(options, run_dir=run_dir), indent=2).encode())
    dist.barrier()
    log = Logger(os.path.join(run_dir, 'log.txt'))

    torch_dtype = torch.float64 if dtype == 'float64' else torch.float32
    predictor = training.PREDICTORS[kind](settings, generator=torch.Generator().manual_seed(seed)).to(device)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    total_iters = max(1, math.ceil(total_kimg * 1000 / batch))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_iters, eta_min=lr * 0.01) \
        if coslr else None
    start_iter = 0
    state_path = os.path.join(run_dir, STATE_FILE)
    if resume is not None and os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)   # tensors and plain containers only
        predictor.load_state_dict(state['predictor'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None and state.get('scheduler'):
            scheduler.load_state_dict(state['scheduler'])
        start_iter = int(state['iteration'])
        log(f'Resuming {run_dir} at iteration {start_iter} of {total_iters}')
    else:
        log(f'Training {kind} ({sampler_stu}, teacher {sampler_tea}, {num_steps} time points, NFE {nfe}) into {run_dir}')

    per_rank = batch // world
    cap = batch_gpu or per_rank
    start = time.time()
    for it in range(start_iter, total_iters):
        optimizer.zero_grad(set_to_none=True)
        step_losses = torch.zeros(num_steps - 1, dtype=torch.float64, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for lo in range(0, per_rank, cap):
            idx = list(range(rank * per_rank + lo, rank * per_rank + min(lo + cap, per_rank)))
            latents, cond = draw_batch(net, seed, it, idx, torch_dtype, device, prompts)
            loss_value, per_step = distill_loss(predictor, net, latents, cond, settings, feature_net, batch)
            loss_value.backward()
            step_losses += per_step.to(torch.float64)
            total += loss_value.detach().to(torch.float64)
        # Sum the gradients of the global-batch-normalised loss over workers: the same update as one process.
        for p in predictor.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = torch.nan_to_num(dist.all_reduce_sum(p.grad), nan=0.0, posinf=1e5, neginf=-1e5)
        step_losses = dist.all_reduce_sum(step_losses)
        total = dist.all_reduce_sum(total)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        done = it + 1
        if rank == 0:
            stats = dict(iteration=done, kimg=done * batch / 1000, loss=total.item(),
                         step_losses=[round(v, 8) for v in step_losses.tolist()], lr=optimizer.param_groups[0]['lr'],
                         sec=round(time.time() - start, 3))
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
            if done % max(1, total_iters // 20) == 0 or done == total_iters:
                log(f"iter {done}/{total_iters} kimg {stats['kimg']:.3f} loss {stats['loss']:.6g} "
                    f"time {stats['sec']:.1f}s")
            if done % snap == 0 or done == total_iters:
                state = dict(predictor=predictor.state_dict(), optimizer=optimizer.state_dict(), iteration=done,
                             scheduler=scheduler.state_dict() if scheduler is not None else None)
                atomic_write(state_path, lambda f: torch.save(state, f))
                training.save_predictor(predictor, run_dir)
        dist.barrier()
    if rank == 0:
        training.save_predictor(predictor, run_dir)
        log(f'Done: predictor in {run_dir} ({time.time() - start:.1f} s)')


if __name__ == '__main__':
    main()
