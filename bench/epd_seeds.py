"""How much EPD's error depends on the training seed, on the image-shaped analytic mixture.

Trains EPD at one NFE with several seeds (and optionally other training settings), then measures each predictor
against the exact ODE solution on bench_learned's held-out samples, next to the best classical solver:

    python bench/epd_seeds.py --nfe=5 --seeds=0,1,2,3 --variant="config=" \\
        --variant="poly5=--schedule_type=polynomial --schedule_rho=5" --jobs=2 --out=docs/epd_seeds.md
"""
import json
import os
import shlex
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_learned import (ROOT, bootstrap_ratio, classical_errors, find_predictor, held_out, train_all,  # noqa: E402
                           train_command, write_report)
import training       # noqa: E402
from models.analytic import image_mixture   # noqa: E402


@click.command(context_settings=dict(show_default=True))
@click.option('--nfe', metavar='INT', type=int, default=5, help='NFE (sequential rounds)')
@click.option('--seeds', metavar='LIST', default='0,1,2,3', help='Training seeds')
@click.option('--variant', 'variants', metavar='NAME=ARGS', multiple=True, default=['config='],
              help='Training settings to compare: a name and extra train.py options (empty: the config\'s)')
@click.option('--num_eval', metavar='INT', type=int, default=1024, help='Held-out samples')
@click.option('--exps', metavar='DIR', default=os.path.join(ROOT, 'exps', 'epd_seeds'), help='Where predictors go')
@click.option('--jobs', metavar='INT', type=int, default=1, help='Trainings run at a time (one thread each if > 1)')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'epd_seeds.md'), help='Markdown output')
def main(nfe, seeds, variants, num_eval, exps, jobs, out):
    seeds = [int(v) for v in seeds.split(',')]
    if any('=' not in v for v in variants):
        raise click.BadParameter('each --variant is NAME=ARGS, e.g. "poly5=--schedule_rho=5"', param_hint='--variant')
    variants = dict(v.split('=', 1) for v in variants)
    folder = lambda name, seed: os.path.join(exps, f'{name}-seed{seed}')
    command = lambda name, seed, kimg, _: train_command(
        'epd', nfe, kimg, folder(name, seed), [f'--seed={seed}'] + shlex.split(variants[name]))
    todo = [(name, seed) for name in variants for seed in seeds if not find_predictor(folder(name, seed), 'epd', nfe)]
    train_all(todo, None, exps, jobs, command=command)          # a rerun reuses the predictors already trained

    net = image_mixture()
    z, per_sample = held_out(net, num_eval)
    classical = classical_errors(net, z, nfe, per_sample)
    best = min(classical, key=lambda k: classical[k].mean())
    base = classical[best]
    lines = ['# EPD across training seeds', '',
             f'EPD at NFE {nfe} trained with each seed and setting below, measured as in learned.md: RMSE per pixel '
             f'against the exact ODE', f'solution, {num_eval} held-out samples; "switched" = error > 0.1 (the sample '
             'ends near another mixture mode). Regenerate with:', '',
             '```', 'python bench/epd_seeds.py ' + ' '.join(shlex.quote(a) for a in sys.argv[1:]), '```', '',
             f'Best classical solver at NFE {nfe}: {best}, mean {base.mean():.4f}, median {base.median():.4f}, '
             f'switched {(base > 0.1).float().mean():.1%}.', '',
             '| setting | seed | mean | median | switched | mean / best classical [95%] | training s |',
             '|---|---|---|---|---|---|---|']
    ratios = {}
    for name in variants:
        for seed in seeds:
            path = find_predictor(folder(name, seed), 'epd', nfe)
            with torch.no_grad():
                e = per_sample(training.load_predictor(path).sample(net, z))
            with open(os.path.join(path, 'stats.jsonl')) as f:
                sec = json.loads(f.read().splitlines()[-1])['sec']
            lo, hi = bootstrap_ratio(e, base)
            ratios.setdefault(name, []).append(e.mean().item() / base.mean().item())
            label = f'{name}: `{variants[name]}`' if variants[name] else f'{name} (the dataset config)'
            lines.append(f'| {label} | {seed} | {e.mean():.4f} | {e.median():.4f} | {(e > 0.1).float().mean():.1%} | '
                         f'{ratios[name][-1]:.2f} [{lo:.2f}, {hi:.2f}] | {sec:.0f} |')
            print(lines[-1], flush=True)
    lines += ['', '## Per setting', '']
    lines += [f'- {name}: ratio to the best classical solver over seeds: median {torch.tensor(r).median():.2f}, '
              f'range {min(r):.2f}-{max(r):.2f}; at most 0.5 in {sum(v <= 0.5 for v in r)} of {len(r)} seeds'
              for name, r in ratios.items()]
    write_report(out, lines)
    print('\n'.join(lines[-len(ratios):]))


if __name__ == '__main__':
    main()
