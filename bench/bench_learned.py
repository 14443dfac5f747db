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
SCHEDULES = (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2))


def classical_settings(name, nfe):
    if solvers.SOLVERS[name].evals_per_step == 2:
        afs = nfe % 2 == 1
        return (nfe + int(afs)) // 2 + 1, afs
    return nfe + 1, False


def train(student, nfe, kimg, exps, extra, schedule):
    num_steps = (nfe + 1) // 2 + 1          # with AFS: 2 (N - 1) - 1 = nfe
    before = set(glob.glob(os.path.join(exps, '0*')))
    args = [sys.executable, os.path.join(ROOT, 'train.py'), f'--sampler_stu={student}', '--sampler_tea=dpmpp',
            '--M=12', f'--num_steps={num_steps}', '--afs=True', '--loss=l2', '--batch=32', f'--total_kimg={kimg}',
            '--lr=0.05', '--coslr=True', '--dtype=float32', f'--outdir={exps}',
            f'--schedule_type={schedule[0]}', f'--schedule_rho={schedule[1]}'] + list(extra)
    if student == 'ipndm':
        args.append('--max_order=3')
    start = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return sorted(set(glob.glob(os.path.join(exps, '0*'))) - before)[-1], time.time() - start


@click.command(context_settings=dict(show_default=True))
@click.option('--nfes', metavar='LIST', default='3,5,7,9', help='NFEs (sequential rounds)')
@click.option('--students', metavar='LIST', default='epd,ipndm,amed,dpm', help='Learned solvers to train')
@click.option('--kimg', metavar='FLOAT', type=float, default=3.2, help='Training length of each predictor')
@click.option('--num_eval', metavar='INT', type=int, default=64, help='Held-out samples')
@click.option('--exps', metavar='DIR', default=os.path.join(ROOT, 'exps', 'bench'), help='Where predictors go')
@click.option('--reuse', metavar='DIR', default=None, help='Reuse predictors already in this folder')
@click.option('--schedule', metavar='TYPE:RHO', default='time_uniform:2', help='Students\' time schedule')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'learned.md'), help='Markdown output')
def main(nfes, students, kimg, num_eval, exps, reuse, schedule, out):
    nfes = [int(v) for v in nfes.split(',')]
    schedule = (schedule.split(':')[0], float(schedule.split(':')[1]))
    students = students.split(',')
    net = image_mixture()
    g = torch.Generator().manual_seed(2**31 - 1)
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    exact = solvers.solve_exact(net, z * net.sigma_max, net.sigma_max, net.sigma_min, rtol=1e-9, atol=1e-9)
    rmse = lambda x: ((x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())).mean().item()
    rows, train_times = {}, {}
    for nfe in nfes:
        for student in students:
            folder = None
            if reuse:
                for meta_path in glob.glob(os.path.join(reuse, '*', 'predictor.json')):
                    meta = json.load(open(meta_path))
                    if meta['sampler_stu'] == student and 2 * (meta['num_steps'] - 1) - meta['afs'] == nfe:
                        folder = os.path.dirname(meta_path)
            if folder is None:
                folder, seconds = train(student, nfe, kimg, exps, [], schedule)
                train_times[(student, nfe)] = seconds
            pred = training.load_predictor(folder)
            rows.setdefault(LABELS[student], {})[nfe] = rmse(pred.sample(net, z))
            print(f'{LABELS[student]} NFE {nfe}: {rows[LABELS[student]][nfe]:.5f} ({folder})', flush=True)
        for name in sorted(solvers.SOLVERS):
            steps, afs = classical_settings(name, nfe)
            for schedule, rho in SCHEDULES:
                err = rmse(solvers.sample(net, z, name, steps, schedule, rho, afs=afs))
                rows.setdefault(f'{name} ({schedule})', {})[nfe] = err
    lines = ['# Learned solvers against classical solvers', '',
             'RMSE per pixel against the exact ODE solution of the image-shaped analytic mixture (sigma 80 -> 0.002),',
             f'{num_eval} held-out samples. NFE = sequential denoiser rounds (EPD/AMED evaluate their parallel or',
             'intermediate points in the second round of each step; AFS saves the first call). Regenerate with:', '',
             '```', 'python bench/bench_learned.py ' + ' '.join(sys.argv[1:]), '```', '',
             '| solver | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|' + '---|' * len(nfes)]
    for label, errs in rows.items():
        lines.append(f'| {label} | ' + ' | '.join(f'{errs[n]:.4f}' if n in errs else '' for n in nfes) + ' |')
    lines += ['', '## Best classical solver and the learned solvers\' ratio to it', '']
    classical = {k: v for k, v in rows.items() if '(' in k and k.split(' ')[0] in solvers.SOLVERS}
    for n in nfes:
        best = min(classical, key=lambda k: classical[k][n])
        lines.append(f'- NFE {n}: best classical {best} {classical[best][n]:.4f}; ' + ', '.join(
            f'{LABELS[s]} x{rows[LABELS[s]][n] / classical[best][n]:.2f}' for s in students))
        epd_err = rows.get(LABELS['epd'], {}).get(n)
        if epd_err is not None:
            match = [m for m in range(1, 41) if any(
                rmse(solvers.sample(net, z, name, *classical_settings(name, m)[:1], sch, rho,
                                    afs=classical_settings(name, m)[1])) <= epd_err
                for name in ('dpmpp', 'unipc', 'deis', 'ipndm_v') for sch, rho in SCHEDULES)]
            lines.append(f'  - smallest classical NFE matching EPD at NFE {n}: {match[0] if match else "> 40"}')
    if train_times:
        lines += ['', '## Training time (2 CPU cores)', '']
        lines += [f'- {LABELS[s]} NFE {n}: {t:.0f} s' for (s, n), t in train_times.items()]
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
