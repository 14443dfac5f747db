"""EPD with train.py's built-in defaults on a mixture no config or test was tuned on, with and without a learned grid.

The model is an image-shaped analytic mixture of another seed, number of components and rank than gmm_image
(bench_schedules' 'unseen'), given to train.py as a dataset config with no `train:` section, so every training
setting is the built-in default (NFE 5: 4 time points with AFS, teacher dpm M=3, polynomial rho 7, scales 0.05,
lr 0.01, 10 kimg). Each seed is trained twice, with --learn_schedule=False and True, and measured against the exact
ODE solution on held-out noises next to the best classical solver at NFE 5 (every solver x schedule):

    python bench/bench_robust_epd.py --seeds=0,1,2,3 --jobs=2 --out=docs/robust_epd.md

Writes the page and docs/figures/robust_epd.png; trained predictors are kept in --exps and reused.
"""
import json
import os
import shlex
import sys

import click
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_learned import (ROOT, bootstrap_ratio, classical_errors, held_out, train_all,  # noqa: E402
                           write_report)
import train          # noqa: E402
import training       # noqa: E402
from models.analytic import image_mixture   # noqa: E402

# name: (image_mixture arguments, what the model is for)
MIXTURES = {'unseen': (dict(num_components=5, rank=6, seed=31337),
                       'a 3x32x32 analytic mixture that no config or test was tuned on'),
            'gmm_image': (dict(), "gmm_image's own mixture (its config's training settings left out)"),
            'selection': (dict(num_components=6, rank=10, seed=777),
                          'a second mixture to choose settings on (neither gmm_image nor the unseen one)')}
VARIANTS = {'defaults': '', 'defaults + learned grid': '--learn_schedule=True'}


def write_config(folder, mixture):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{mixture}_mixture.yaml')
    cfg = dict(dataset_name=f'{mixture}_mixture', model=dict(family='analytic', model_path='gmm_image',
                                                             sigma_min=0.002, sigma_max=80.0, **MIXTURES[mixture][0]),
               sample=dict(dtype='float64'))
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f)
    return path


def predictor_in(folder):
    found = sorted(d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if os.path.isfile(os.path.join(folder, d, 'predictor.json')))
    return os.path.join(folder, found[-1]) if found else None


@click.command(context_settings=dict(show_default=True))
@click.option('--seeds', metavar='LIST', default='0,1,2,3', help='Training seeds')
@click.option('--mixture', metavar='NAME', type=click.Choice(list(MIXTURES)), default='unseen',
              help='The model (unseen: never tuned on)')
@click.option('--variant', 'variants', metavar='NAME=ARGS', multiple=True,
              help='Training settings to compare instead of the two defaults (extra train.py options)')
@click.option('--num_eval', metavar='INT', type=int, default=1024, help='Held-out samples')
@click.option('--exps', metavar='DIR', default=os.path.join(ROOT, 'exps', 'robust_epd'), help='Where predictors go')
@click.option('--jobs', metavar='INT', type=int, default=2, help='Trainings run at a time (one thread each if > 1)')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'robust_epd.md'), help='Markdown output')
def main(seeds, mixture, variants, num_eval, exps, jobs, out):
    seeds = [int(v) for v in seeds.split(',')]
    if any('=' not in v for v in variants):
        raise click.BadParameter('each --variant is NAME=ARGS, e.g. "lr05=--lr=0.05"', param_hint='--variant')
    variants = dict(v.split('=', 1) for v in variants) if variants else VARIANTS
    exps = os.path.join(exps, mixture)
    config = write_config(exps, mixture)
    folder = lambda variant, seed: os.path.join(exps, f"{variant.replace(' + ', '-').replace(' ', '-')}-seed{seed}")

    def command(variant, seed, _kimg, _exps):
        return [sys.executable, os.path.join(ROOT, 'train.py'), f'--dataset_name={config}', f'--seed={seed}',
                f'--outdir={folder(variant, seed)}', '--device=cpu', *shlex.split(variants[variant])]
    todo = [(v, s) for v in variants for s in seeds if predictor_in(folder(v, s)) is None]
    seconds = train_all(todo, None, exps, jobs, command=command)
    times_path = os.path.join(exps, 'training_seconds.json')
    kept = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    kept.update({f'{v}|{s}': t for (v, s), t in seconds.items()})
    with open(times_path, 'w') as f:
        json.dump(kept, f)

    params, about = MIXTURES[mixture]
    net = image_mixture(**params)
    z, per_sample = held_out(net, num_eval)
    classical = classical_errors(net, z, 5, per_sample)
    best = min(classical, key=lambda k: classical[k].mean().item())
    rows = []
    for variant in variants:
        for seed in seeds:
            path = predictor_in(folder(variant, seed))
            predictor = training.load_predictor(path)
            with torch.no_grad():
                err = per_sample(predictor.sample(net, z))
                grid = predictor.schedule(net).detach()
            lo, hi = bootstrap_ratio(err, classical[best])
            rows.append(dict(variant=variant, seed=seed, mean=err.mean().item(), median=err.median().item(),
                             ratio=err.mean().item() / classical[best].mean().item(), lo=lo, hi=hi,
                             sec=kept.get(f'{variant}|{seed}'), grid=grid.tolist()))
    figure = os.path.splitext(os.path.basename(out))[0] + '.png'
    write_figure(rows, classical[best].mean().item(), best, os.path.join(os.path.dirname(out), 'figures', figure))
    command = ' '.join(['python bench/bench_robust_epd.py', f'--mixture={mixture}', f'--seeds={",".join(map(str, seeds))}',
                        f'--jobs={jobs}'] + ([f'--num_eval={num_eval}'] if num_eval != 1024 else []) +
                       ([f'--out={os.path.relpath(out, ROOT)}'] if figure != 'robust_epd.png' else []) + [shlex.quote(f'--variant={k}={v}') for k, v in variants.items()
                                             if variants is not VARIANTS])
    lines = [f'# EPD with the built-in defaults on the {mixture} mixture (NFE 5)', '',
             f'`{command}` (regenerates this page and `figures/{figure}`). The model: `image_mixture(' +
             ', '.join(f'{k}={v}' for k, v in params.items()) + f')`, {about},',
             'given to train.py as a dataset config without a `train:` section: every training setting not listed is',
             'train.py\'s built-in default (`python train.py --help`; 4 time points with AFS = NFE 5, teacher dpm',
             'M = 3). "learned grid" (`--learn_schedule=True`): the time points train jointly with the tables (LD3\'s',
             'softmax-cumsum parametrisation in log sigma, ends pinned), starting from the hand-made grid; the teacher',
             'runs on its own hand-made grid with the student\'s points merged in. With it, the defaults of',
             ', '.join(f'`--{k}`' for k in train.LEARNED_GRID_DEFAULTS) + ' are train.py\'s learned-grid ones (' +
             ', '.join(f'{k} {v}' for k, v in train.LEARNED_GRID_DEFAULTS.items()) + ').', '',
             f'RMSE per pixel to the exact ODE solution on {num_eval} held-out noises. Best classical solver at NFE 5 '
             f'(of every solver x schedule): {best}, mean {classical[best].mean().item():.4f}. Target of the learned '
             'grid: at most 0.5x that.', '',
             '| training | seed | mean | median | mean / best classical [95%] | training s | learned grid |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        sec = f"{r['sec']:.0f}" if r['sec'] is not None else ''
        grid = ', '.join(f'{v:.4g}' for v in r['grid'])
        lines.append(f"| {r['variant']} | {r['seed']} | {r['mean']:.4f} | {r['median']:.4f} | "
                     f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {sec} | {grid} |")
    lines += ['']
    for variant in variants:
        ratios = [r['ratio'] for r in rows if r['variant'] == variant]
        lines.append(f"- {variant}: ratio to the best classical over {len(ratios)} seeds: median "
                     f"{sorted(ratios)[len(ratios) // 2]:.2f}, range {min(ratios):.2f} to {max(ratios):.2f}.")
    lines += ['', f'![EPD per seed against the best classical solver](figures/{figure})', '']
    write_report(out, lines)
    print('\n'.join(lines))


def write_figure(rows, best_mean, best, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from torch_utils.image_io import atomic_write
    fig, ax = plt.subplots(figsize=(7.5, 4))
    variants = list(dict.fromkeys(r['variant'] for r in rows))
    for i, variant in enumerate(variants):
        sub = [r for r in rows if r['variant'] == variant]
        x = [i + 0.08 * (j - (len(sub) - 1) / 2) for j in range(len(sub))]
        ax.errorbar(x, [r['ratio'] for r in sub], yerr=[[r['ratio'] - r['lo'] for r in sub],
                                                          [r['hi'] - r['ratio'] for r in sub]], fmt='o', capsize=3)
    ax.axhline(1.0, color='k', lw=1, label=f'best classical ({best}, {best_mean:.3f})')
    ax.axhline(0.5, color='k', lw=1, ls='--', label='target 0.5x')
    ax.set_xticks(range(len(variants)), [v.replace(' + ', '\n+ ') for v in variants], fontsize=8)
    ax.set_yscale('log')
    ax.set_ylabel('mean RMSE / best classical')
    ax.set_title('EPD at NFE 5, one dot per training seed (95% bootstrap intervals)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


if __name__ == '__main__':
    main()
