"""Learned solvers against the classical ones on the image-shaped analytic mixture.

For each NFE (sequential rounds) the bench trains the learned solvers with train.py (or reuses --reuse folders),
then measures every solver's error against the exact ODE solution on held-out seeds:

    python bench/bench_learned.py --nfes=3,5,7,9 --students=epd,ipndm,amed,dpm --out=docs/learned.md
"""
import glob
import json
import math
import os
import subprocess
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import solvers        # noqa: E402
import training       # noqa: E402
from models.analytic import image_mixture   # noqa: E402

LABELS = {'epd': 'EPD', 'ipndm': 'EPD-Plugin (iPNDM)', 'amed': 'AMED-Solver', 'dpm': 'AMED-Plugin (DPM-2)',
          'euler': 'AMED-Plugin (Euler)'}
SCHEDULES = (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2))   # the rho each schedule is used with


def classical_settings(name, nfe):
    if solvers.SOLVERS[name].evals_per_step == 2:
        afs = nfe % 2 == 1
        return (nfe + int(afs)) // 2 + 1, afs
    return nfe + 1, False


def train(student, nfe, kimg, exps, extra):
    """Train with the gmm_image config's training settings (what `train.py` gives a user by default)."""
    num_steps = (nfe + 1) // 2 + 1          # with AFS: 2 (N - 1) - 1 = nfe
    before = set(glob.glob(os.path.join(exps, '0*')))
    args = [sys.executable, os.path.join(ROOT, 'train.py'), f'--sampler_stu={student}', f'--num_steps={num_steps}',
            '--afs=True', f'--outdir={exps}'] + ([f'--total_kimg={kimg}'] if kimg else []) + list(extra)
    if student == 'ipndm':
        args.append('--max_order=3')
    start = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return sorted(set(glob.glob(os.path.join(exps, '0*'))) - before)[-1], time.time() - start


def bootstrap_ratio(err_a, err_b, draws=2000, seed=0):
    """95% interval of mean(err_a) / mean(err_b) over resamplings of the held-out samples (paired)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(err_a), (draws, len(err_a)), generator=g)
    ratios = err_a[idx].mean(1) / err_b[idx].mean(1)
    return torch.quantile(ratios, 0.025).item(), torch.quantile(ratios, 0.975).item()


@click.command(context_settings=dict(show_default=True))
@click.option('--nfes', metavar='LIST', default='3,5,7,9', help='NFEs (sequential rounds)')
@click.option('--students', metavar='LIST', default='epd,ipndm,amed,dpm', help='Learned solvers to train')
@click.option('--kimg', metavar='FLOAT', type=float, default=None, help='Training length [default: the config\'s]')
@click.option('--num_eval', metavar='INT', type=int, default=1024, help='Held-out samples')
@click.option('--exps', metavar='DIR', default=os.path.join(ROOT, 'exps', 'bench'), help='Where predictors go')
@click.option('--reuse', metavar='DIR', default=None, help='Reuse predictors already in this folder')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'learned.md'), help='Markdown output')
def main(nfes, students, kimg, num_eval, exps, reuse, out):
    nfes = [int(v) for v in nfes.split(',')]
    students = students.split(',')
    net = image_mixture()
    g = torch.Generator().manual_seed(2**31 - 1)          # not a training seed: train.py draws from (seed, it, i)
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    exact = torch.cat([solvers.solve_exact(net, part * net.sigma_max, net.sigma_max, net.sigma_min, rtol=1e-9,
                                           atol=1e-9) for part in z.split(256)])
    per_sample = lambda x: (x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())
    rows, train_times = {}, {}
    for nfe in nfes:
        for student in students:
            folder = None
            if reuse:
                for meta_path in sorted(glob.glob(os.path.join(reuse, '*', 'predictor.json'))):
                    meta = json.load(open(meta_path))
                    if meta['sampler_stu'] == student and 2 * (meta['num_steps'] - 1) - meta['afs'] == nfe:
                        folder = os.path.dirname(meta_path)
            if folder is None:
                folder, seconds = train(student, nfe, kimg, exps, [])
                train_times[(student, nfe)] = seconds
            pred = training.load_predictor(folder)
            with torch.no_grad():
                rows.setdefault(LABELS[student], {})[nfe] = per_sample(pred.sample(net, z))
            print(f'{LABELS[student]} NFE {nfe}: {rows[LABELS[student]][nfe].mean():.5f} ({folder})', flush=True)
        for name in sorted(solvers.SOLVERS):
            steps, afs = classical_settings(name, nfe)
            for schedule, rho in SCHEDULES:
                rows.setdefault(f'{name} ({schedule})', {})[nfe] = per_sample(
                    solvers.sample(net, z, name, steps, schedule, rho, afs=afs))
    lines = ['# Learned solvers against classical solvers', '',
             'RMSE per pixel against the exact ODE solution of the image-shaped analytic mixture (sigma 80 -> 0.002),',
             f'mean over {num_eval} held-out samples. NFE = sequential denoiser rounds (EPD/AMED evaluate their parallel',
             'or intermediate points in the second round of each step; AFS saves the first call). The learned solvers',
             'are trained with the `gmm_image` config\'s training settings. Regenerate with:', '',
             '```', 'python bench/bench_learned.py ' + ' '.join(sys.argv[1:]), '```', '',
             '| solver | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|' + '---|' * len(nfes)]
    for label, errs in rows.items():
        lines.append(f'| {label} | ' + ' | '.join(f'{errs[n].mean():.4f}' if n in errs else '' for n in nfes) + ' |')
    lines += ['', '## Best classical solver and the learned solvers\' ratio to it', '',
              'Ratios of mean errors; the interval is a 95% bootstrap interval over the held-out samples.', '']
    classical = {k: v for k, v in rows.items() if k.split(' ')[0] in solvers.SOLVERS}
    for n in nfes:
        best = min(classical, key=lambda k: classical[k][n].mean())
        parts = []
        for s in students:
            lo, hi = bootstrap_ratio(rows[LABELS[s]][n], classical[best][n])
            parts.append(f'{LABELS[s]} x{rows[LABELS[s]][n].mean() / classical[best][n].mean():.2f} '
                         f'[{lo:.2f}, {hi:.2f}]')
        lines.append(f'- NFE {n}: best classical {best} {classical[best][n].mean():.4f}; ' + ', '.join(parts))
        if LABELS['epd'] in rows and n in rows[LABELS['epd']]:
            epd_err = rows[LABELS['epd']][n].mean().item()
            match = next((m for m in range(1, 41) if any(
                per_sample(solvers.sample(net, z, name, classical_settings(name, m)[0], sch, rho,
                                          afs=classical_settings(name, m)[1])).mean() <= epd_err
                for name in solvers.SOLVERS for sch, rho in SCHEDULES)), None)
            lines.append(f'  - smallest classical NFE matching EPD at NFE {n}: {match or "> 40"}')
    lines += ['', '## How the error is made up', '',
              'Samples whose error exceeds 0.1 end near another mixture mode than the exact solution (typical errors',
              'are 10-50x smaller); they dominate the mean, which is why the held-out set is large.', '',
              '| solver | NFE | mean | median | samples > 0.1 |', '|---|---|---|---|---|']
    for n in nfes:
        ranked = sorted(classical, key=lambda k: classical[k][n].mean())[:3]
        for label in [LABELS[s] for s in students] + ranked:
            e = rows[label][n]
            lines.append(f'| {label} | {n} | {e.mean():.4f} | {e.median():.4f} | {(e > 0.1).float().mean():.1%} |')
    if train_times:
        lines += ['', '## Training time (2 CPU cores)', '']
        lines += [f'- {LABELS[s]} NFE {n}: {t:.0f} s' for (s, n), t in train_times.items()]
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
