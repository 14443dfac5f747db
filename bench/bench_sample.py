"""Throughput of sample.py on the embedded analytic model, and the share of its wall time spent outside the denoiser.

1. images/s of `sample.py` as a user runs it, with 1 process and with 2 torchrun CPU workers (gloo), read from the
   summary it prints (the sampling loop only: model loading and process start are reported separately).
2. In process, the same loop (`sample.generate`: latents, `solvers.sample`, decode, PNG writing) timed as a whole
   and inside the denoiser's calls (forward pre/post hooks), with the time of PNG writing, its fsync and latent
   drawing broken out. Writes docs/sampling.md.

    python bench/bench_sample.py --out=docs/sampling.md
"""
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import configs                                   # noqa: E402
import sample                                    # noqa: E402
from models.loading import load_model            # noqa: E402
import solvers                                   # noqa: E402
from torch_utils import misc                     # noqa: E402

COMMAND = 'python bench/bench_sample.py --out=docs/sampling.md'
LAUNCHES = [(1, os.cpu_count() or 1), (1, None), (2, None)]   # (workers, OMP_NUM_THREADS of a single process;
#                                                              None: the default, one thread)


def sample_cli(workers, seeds, batch, solver, num_steps, dtype, outdir, threads=None):
    """Run sample.py once into an empty outdir; returns (images/s of the loop, loop seconds, process seconds).
    threads: OMP_NUM_THREADS of a single process (torchrun sets 1 per worker itself)."""
    shutil.rmtree(outdir, ignore_errors=True)
    launcher = [sys.executable] if workers == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                      f'--nproc_per_node={workers}']
    args = [os.path.join(ROOT, 'sample.py'), f'--sampler_stu={solver}', f'--num_steps={num_steps}',
            f'--seeds={seeds}', f'--batch={batch}', f'--outdir={outdir}', f'--dtype={dtype}', '--device=cpu']
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='', DIST_BACKEND='gloo')
    env.pop('OMP_NUM_THREADS', None)
    if threads is not None:
        env['OMP_NUM_THREADS'] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise click.ClickException(f'sample.py failed with {workers} workers:\n{proc.stdout}\n{proc.stderr}')
    match = re.search(r'wall time: ([\d.]+) s, ([\d.]+) images/s', proc.stdout)
    if match is None:
        raise click.ClickException(f'no throughput line in the output of sample.py:\n{proc.stdout}')
    return float(match.group(2)), float(match.group(1)), wall


class Stopwatch:
    """Accumulated seconds, entered as a context or wrapped around a function."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.count += 1

    def wrap(self, fn):
        def timed(*args, **kwargs):
            with self():
                return fn(*args, **kwargs)
        return timed


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def time_in_process(seeds, batch, solver, num_steps, dtype, outdir):
    """Seconds of the whole generate loop and of its parts ("solver": inside solvers.sample but outside the
    denoiser; "quantize": the conversion to uint8)."""
    cfg = configs.load_config(configs.DEFAULT_DATASET)
    settings = sample.resolve_settings(cfg, dict(solver=solver, num_steps=num_steps, dtype=dtype))
    net = load_model(cfg, None, torch.device('cpu'))
    denoiser, png, fsync, latents, solve, quantize = (Stopwatch() for _ in range(6))
    starts = []

    def before(module, args):
        starts.append(time.perf_counter())

    def after(module, args, output):
        denoiser.seconds += time.perf_counter() - starts.pop()
        denoiser.count += 1

    with torch.no_grad():                          # one-time allocations stay out of the measurement
        net(torch.zeros(batch, *net.sample_shape, dtype=sample.DTYPES[dtype]), net.sigma_max)
    shutil.rmtree(outdir, ignore_errors=True)
    handles = [net.register_forward_pre_hook(before), net.register_forward_hook(after)]
    try:
        with patched(sample, 'save_png', png.wrap(sample.save_png)), \
                patched(sample, 'randn_per_seed', latents.wrap(misc.randn_per_seed)), \
                patched(os, 'fsync', fsync.wrap(os.fsync)), \
                patched(solvers, 'sample', solve.wrap(solvers.sample)), \
                patched(sample, 'to_uint8', quantize.wrap(sample.to_uint8)):
            start = time.perf_counter()
            summary = sample.generate(net, misc.parse_int_list(seeds), outdir, settings, batch, progress=False)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    assert summary['images'] == len(misc.parse_int_list(seeds))
    return dict(total=total, denoiser=denoiser.seconds, calls=denoiser.count, png=png.seconds, fsync=fsync.seconds,
                latents=latents.seconds, solver=solve.seconds - denoiser.seconds, quantize=quantize.seconds,
                images=summary['images'], nfe=summary['nfe_per_image'])


def describe_machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f'{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}'


@click.command(context_settings=dict(show_default=True))
@click.option('--out', metavar='PATH', default='docs/sampling.md', help='Markdown report to write')
@click.option('--seeds', metavar='LIST', default='0-255', help='Seeds per run')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Total batch size')
@click.option('--solver', metavar='NAME', default='dpmpp', help='Solver')
@click.option('--nfe', metavar='INT', type=click.IntRange(min=1), default=5, help='Denoiser evaluations per image (one per step)')
@click.option('--dtypes', metavar='LIST', default='float64,float32', help='Sampling dtypes to measure (float64: the analytic config\'s)')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=1, help='Torch threads of the in-process measurement')
@click.option('--repeats', metavar='INT', type=click.IntRange(min=1), default=2, help='Runs per setting; the fastest is reported')
def main(out, seeds, batch, solver, nfe, dtypes, threads, repeats):
    """Throughput of sample.py with 1 and 2 CPU workers, and the time outside the denoiser."""
    if solvers.SOLVERS[solver].evals_per_step != 1:
        raise click.BadParameter('choose a solver with one evaluation per step', param_hint='--solver')
    num_steps = nfe + 1
    num_images = len(misc.parse_int_list(seeds))
    dtypes = dtypes.split(',')
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix='bench_sample_')
    try:
        throughput = {}
        for dtype in dtypes:
            for workers, omp_threads in LAUNCHES:
                runs = [sample_cli(workers, seeds, batch, solver, num_steps, dtype, os.path.join(tmp, 'cli'),
                                   omp_threads) for _ in range(repeats)]
                throughput[dtype, workers, omp_threads] = max(runs) + ([r[0] for r in runs],)
                print(f'{dtype} {workers} worker(s), threads {omp_threads or "default"}: '
                      + ', '.join(f'{r[0]:.1f}' for r in runs) + ' images/s '
                      f'(process wall {min(r[2] for r in runs):.1f} s)', flush=True)
        shares = {}
        torch.set_num_threads(threads)
        for dtype in dtypes:
            runs = [time_in_process(seeds, batch, solver, num_steps, dtype, os.path.join(tmp, 'inproc'))
                    for _ in range(repeats)]
            best = min(runs, key=lambda r: r['total'] - r['denoiser'])
            shares[dtype] = best
            outside = 1 - best['denoiser'] / best['total']
            print(f'{dtype} in process: total {best["total"]:.2f} s, denoiser {best["denoiser"]:.2f} s '
                  f'({best["calls"]} calls), outside {100 * outside:.1f} % (PNG {best["png"]:.2f} s of which fsync '
                  f'{best["fsync"]:.2f} s, latents {best["latents"]:.2f} s, solver {best["solver"]:.2f} s)', flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    write_report(out, dict(seeds=seeds, images=num_images, batch=batch, solver=solver, nfe=nfe, num_steps=num_steps,
                           repeats=repeats, threads=threads), throughput, shares, load_before, load_after)
    print(f'wrote {out}')


def write_report(path, run, throughput, shares, load_before, load_after):
    loads = ', '.join(f'{v:.2f}' for v in load_before), ', '.join(f'{v:.2f}' for v in load_after)
    cores = os.cpu_count()
    loaded = max(load_before[0], load_after[0]) > 0.5 * cores
    lines = ['# Sampling throughput', '',
             f'Generated by `{COMMAND}`; rerun it to regenerate this file.', '',
             f'Machine: {describe_machine()}. Load average (1, 5, 15 min) {loads[0]} before and {loads[1]} after '
             'the benchmark' + (f': the machine was shared with other processes (a load above {cores} means more '
                                'runnable work than cores), so these numbers are lower and noisier than on an idle '
                                'machine.' if loaded else '.'), '',
             f"Setting: the default dataset (`{configs.DEFAULT_DATASET}`, the analytic 3x32x32 mixture), "
             f"`--sampler_stu={run['solver']} --num_steps={run['num_steps']}` (NFE {run['nfe']}), "
             f"`--seeds={run['seeds']}` ({run['images']} images), `--batch={run['batch']}`, CPU. Best of "
             f"{run['repeats']} runs each (all runs in parentheses).", '',
             '## Images per second', '',
             'As printed by `sample.py` (the sampling loop: latents, solver, decode, PNG files; not the start of the '
             'processes or the loading of the model). 2 workers: `python -m torch.distributed.run --standalone '
             f"--nproc_per_node=2 sample.py ...` (gloo); each worker takes half of every batch of {run['batch']}. "
             'torchrun gives '
             'each worker one intra-op thread, and a single process gets one too unless OMP_NUM_THREADS says '
             'otherwise (docs/threads.md); the first column sets it to every core.', '',
             '| dtype | 1 worker, all cores | 1 worker, 1 thread (default) | 2 workers (1 thread each) | 2 workers vs 1 | process wall, '
             'left to right |', '| --- | ---: | ---: | ---: | ---: | ---: |']
    for dtype in shares:
        one, single, two = (throughput[dtype, w, t] for w, t in LAUNCHES)
        spread = lambda r: f'{r[0]:.1f} (' + ', '.join(f'{v:.0f}' for v in r[3]) + ')'
        lines.append(f'| {dtype} | {spread(one)} | {spread(single)} | {spread(two)} | {two[0] / one[0]:.2f}x | '
                     f'{one[2]:.1f} / {single[2]:.1f} / {two[2]:.1f} s |')
    first = next(iter(shares))
    one, single, two = (throughput[first, w, t][0] for w, t in LAUNCHES)
    lines += ['', f'{first}: two single-thread workers give {two / single:.2f}x the throughput of one single-thread '
              f'process; a single process with every core reaches {one / single:.2f}x of the '
              'single-thread one' + (', as its threads wait for each other on cores taken by other processes.'
                                     if one < single else '.')]
    lines += ['', '## Time outside the denoiser (batch {})'.format(run['batch']), '',
              'One process with {} torch thread(s), `sample.generate` called in process on the same seeds (after '
              'one warm-up call of the denoiser), timed as a whole; the time inside the denoiser is summed between '
              'forward pre- and post-hooks (`time.perf_counter`). "PNG" is `save_png` (encoding plus the atomic '
              'write with its fsync), "solver" the solver\'s own arithmetic (inside `solvers.sample`, outside the '
              'denoiser), "latents" the per-seed noise draws, "uint8" the conversion of the images, "rest" the '
              'remainder (hooks, bookkeeping). Shares are of the whole loop; the last column leaves PNG writing out '
              'of both sides.'.format(run['threads']), '',
              '| dtype | loop | in denoiser | outside | PNG (fsync) | solver | latents | uint8 | rest | outside, '
              'without PNG |', '| --- |' + ' ---: |' * 9]
    for dtype, r in shares.items():
        outside = r['total'] - r['denoiser']
        rest = outside - r['png'] - r['latents'] - r['solver'] - r['quantize']
        pct = lambda v: f"{100 * v / r['total']:.1f} %"
        no_png = 100 * (outside - r['png']) / (r['total'] - r['png'])
        lines.append(f"| {dtype} | {r['total']:.2f} s | {r['denoiser']:.2f} s | **{pct(outside)}** | {pct(r['png'])} "
                     f"({pct(r['fsync'])}) | {pct(r['solver'])} | {pct(r['latents'])} | {pct(r['quantize'])} | "
                     f"{pct(rest)} | {no_png:.1f} % |")
    lines.append('')
    over = {d: r for d, r in shares.items() if 1 - r['denoiser'] / r['total'] > 0.05}
    if over:
        parts = []
        for dtype, r in over.items():
            outside = r['total'] - r['denoiser']
            parts.append(f"{dtype}: {100 * outside / r['total']:.1f} % outside, of which PNG writing "
                         f"{100 * r['png'] / outside:.0f} % (fsync alone {100 * r['fsync'] / outside:.0f} %), the "
                         f"solver's arithmetic {100 * r['solver'] / outside:.0f} % and latent drawing "
                         f"{100 * r['latents'] / outside:.0f} %")
        lines += ['The target of under 5 % outside the denoiser is missed for ' + '; '.join(parts) + '. The '
                  'analytic denoiser is cheap (tens of ms per batch of 64), so the fixed per-image costs weigh far '
                  'more than with a neural network, whose calls take orders of magnitude longer while the PNG '
                  'writing stays the same. Most of it is the fsync that `atomic_write` issues for every image (it '
                  'makes resumed runs safe); the PNG encoding itself is the smaller part.', '']
    else:
        lines += ['The time outside the denoiser is under 5 % for every dtype measured.', '']
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


if __name__ == '__main__':
    main()
