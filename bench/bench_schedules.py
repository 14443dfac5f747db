"""Learned time grids (LD3) against the hand-made schedules, by the error to the exact ODE solution.

For each model (the image-shaped analytic mixture, and a mixture that no config or test was tuned on), solver and
NFE: every hand-made schedule, and LD3 with and without the decoupled evaluation grid (trained in-process with
training/ld3.py from its defaults), measured on held-out noises against the exact solution (per-sample RMSE per
pixel; mean with a 95% bootstrap interval, and the median):

    python bench/bench_schedules.py --out=docs/schedules.md --jobs=2

Writes docs/schedules.md and docs/figures/schedules_error_vs_nfe.png.
"""
import concurrent.futures as futures
import json
import math
import os
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import solvers                                               # noqa: E402
from bench.bench_learned import bootstrap_ratio, write_report   # noqa: E402
from models.analytic import image_mixture                  # noqa: E402
from training import ld3                                    # noqa: E402

SCHEDULES = (('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 1.0), ('time_uniform', 2.0))
SOLVERS = ('unipc', 'dpmpp', 'ipndm')
# The unseen mixture: other seed, number of components and rank than gmm_image (8 components, rank 16, seed 2024).
MODELS = {'gmm_image': dict(), 'unseen': dict(num_components=5, rank=6, seed=31337)}


def schedule_label(schedule, rho):
    return {'polynomial': 'polynomial (rho 7)', 'logsnr': 'logsnr', 'time_uniform': f'time_uniform (rho {rho:g})'}[
        schedule]


def model(name):
    return image_mixture(**MODELS[name])


def held_out(net, n, work, name):
    """Held-out noises (a generator apart from the teacher pairs') and their exact ODE solutions (cached)."""
    z = torch.randn(n, *net.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2**31 - 1))
    path = os.path.join(work, f'exact-{name}-{n}.pt')
    if os.path.isfile(path):
        return z, torch.load(path, weights_only=True)
    exact = torch.cat([solvers.solve_exact(net, part * net.sigma_max, net.sigma_max, net.sigma_min)
                       for part in z.split(100)])
    torch.save(exact, path + '.tmp')
    os.replace(path + '.tmp', path)
    return z, exact


def errors(x, exact):
    return (x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())


def train_job(args):
    """One LD3 training (run in a worker process, one thread): returns the per-sample held-out errors and times."""
    name, solver, nfe, decoupled, work, num_eval, opts = args
    torch.set_num_threads(1)
    net = model(name)
    o = ld3.resolve(dict(opts, solver=solver))
    meta = dict(dataset_name=name, teacher='unipc', teacher_steps=o['teacher_steps'], schedule_type='polynomial',
                schedule_rho=7.0, seed=0, model=json.dumps(MODELS[name]))
    z, y = ld3.teacher_data(net, meta, o['num_train'] + o['num_valid'], os.path.join(work, 'data'),
                            torch.float64, 'cpu', log=lambda *_: None)
    n = o['num_train']
    settings = dict(solver=solver, num_steps=nfe + 1, sigma_min=net.sigma_min, sigma_max=net.sigma_max,
                    win_rate=o['win_rate'], decoupled=decoupled, sample_shape=list(net.sample_shape))
    start = time.time()
    predictor, trainer = ld3.train(net, settings, o, ((z[:n], y[:n]), (z[n:], y[n:])), log=lambda *_: None)
    seconds = time.time() - start
    zt, exact = held_out(net, num_eval, work, name)
    with torch.no_grad():
        err = errors(predictor.sample(net, zt), exact)
    sigmas, evals = predictor.grids()
    return dict(name=name, solver=solver, nfe=nfe, decoupled=decoupled, seconds=seconds, errors=err.tolist(),
                grid=ld3.format_grid(sigmas), eval_grid=ld3.format_grid(evals) if evals is not None else None,
                iterations=trainer.iterations)


def hand_made(name, nfes, work, num_eval):
    net = model(name)
    z, exact = held_out(net, num_eval, work, name)
    out = {}
    for solver in SOLVERS:
        for nfe in nfes:
            for schedule, rho in SCHEDULES:
                x = solvers.sample(net, z, solver, nfe + 1, schedule, rho)
                out[solver, nfe, schedule_label(schedule, rho)] = errors(x, exact)
    return out


def match_nfe(target, rows, solver, nfes):
    """The smallest NFE at which the best hand-made schedule's mean error is <= target (None if none is)."""
    for nfe in nfes:
        if min(v.mean().item() for (s, n, _), v in rows.items() if s == solver and n == nfe) <= target:
            return nfe
    return None


def figure(path, tables, nfes):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(tables), len(SOLVERS), figsize=(4.2 * len(SOLVERS), 3.4 * len(tables)),
                             squeeze=False)
    for row, (name, (hand, learned)) in enumerate(tables.items()):
        for col, solver in enumerate(SOLVERS):
            ax = axes[row][col]
            for schedule, rho in SCHEDULES:
                label = schedule_label(schedule, rho)
                ax.plot(nfes, [hand[solver, n, label].mean().item() for n in nfes], 'o-', lw=1, ms=3, label=label)
            for dec, style in ((False, 's--'), (True, 'D-')):
                pts = sorted((r['nfe'], torch.tensor(r['errors'])) for r in learned
                             if r['solver'] == solver and r['decoupled'] == dec)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1].mean().item() for p in pts], style, color='k', lw=1.5,
                            ms=5, label='LD3' + (' + decoupled grid' if dec else ''))
            ax.set_yscale('log')
            ax.set_title(f'{name}: {solver}')
            ax.set_xlabel('NFE')
            ax.set_ylabel('mean RMSE to the exact ODE solution')
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + '.tmp.png', dpi=110)
    os.replace(path + '.tmp.png', path)


@click.command()
@click.option('--out', default=os.path.join(ROOT, 'docs', 'schedules.md'))
@click.option('--nfes', default='4,5,6,8,10', help='NFEs of the hand-made schedules')
@click.option('--ld3_nfes', default='4,5,6', help='NFEs at which LD3 is trained on gmm_image')
@click.option('--unseen_nfes', default='5', help='NFEs at which LD3 is trained on the unseen mixture')
@click.option('--num_eval', default=400, help='Held-out noises')
@click.option('--jobs', default=2, help='Trainings run at once (one thread each)')
@click.option('--work', default=os.path.join(ROOT, 'exps', 'bench_schedules'))
@click.option('--options', default='{}', help='LD3 options (JSON) on top of its defaults')
def main(out, nfes, ld3_nfes, unseen_nfes, num_eval, jobs, work, options):
    torch.set_num_threads(1)
    nfes = [int(v) for v in nfes.split(',')]
    opts = json.loads(options)
    os.makedirs(work, exist_ok=True)
    plan = {'gmm_image': [int(v) for v in ld3_nfes.split(',') if v],
            'unseen': [int(v) for v in unseen_nfes.split(',') if v]}
    for name in plan:                        # exact solutions and teacher pairs first, then the trainings in parallel
        held_out(model(name), num_eval, work, name)
    args = [(name, solver, nfe, dec, work, num_eval, opts) for name, ns in plan.items() for nfe in ns
            for solver in SOLVERS for dec in (False, True)]
    first = {}
    for a in args:
        first.setdefault(a[0], a)
    for a in first.values():                  # one job per model makes its teacher pairs before the others read them
        net = model(a[0])
        o = ld3.resolve(dict(opts, solver='unipc'))
        ld3.teacher_data(net, dict(dataset_name=a[0], teacher='unipc', teacher_steps=o['teacher_steps'],
                                   schedule_type='polynomial', schedule_rho=7.0, seed=0, model=json.dumps(MODELS[a[0]])),
                         o['num_train'] + o['num_valid'], os.path.join(work, 'data'), torch.float64, 'cpu')
    with futures.ProcessPoolExecutor(jobs) as pool:
        learned = list(pool.map(train_job, args))
    for r in learned:
        print(r['name'], r['solver'], r['nfe'], r['decoupled'], f"{torch.tensor(r['errors']).mean():.4g}",
              f"{r['seconds']:.0f}s", flush=True)
    tables = {name: (hand_made(name, nfes, work, num_eval), [r for r in learned if r['name'] == name])
              for name in plan}
    figure(os.path.join(os.path.dirname(out), 'figures', 'schedules_error_vs_nfe.png'), tables, nfes)
    defaults = ld3.resolve(dict(opts, solver='unipc'))
    lines = ['# Learned time grids (LD3) against hand-made schedules', '',
             f'Generated by `python bench/bench_schedules.py` (options: `{json.dumps(opts)}`). Error: per-sample RMSE '
             f'per pixel to the exact ODE solution on {num_eval} held-out noises (DOP853, rtol 1e-9); mean with a '
             '95% paired bootstrap interval of the ratio to the best hand-made schedule at the same solver and NFE, '
             'and the median.', '',
             f"LD3 settings (training/ld3.py defaults): {defaults['num_train']} training and {defaults['num_valid']} "
             f"validation pairs from a UniPC teacher with {defaults['teacher_steps']} steps (polynomial rho 7), "
             f"loss {defaults['loss_type']}, rounds {defaults['training_rounds_v1']} + "
             f"{defaults['training_rounds_v2']}, batch {defaults['main_train_batch_size']}, lr_time_1 "
             f"{defaults['lr_time_1']}, start {defaults['init_schedule']}, prior_bound 0.001 C H W / N^2, win_rate "
             f"{defaults['win_rate']}. The unseen mixture is `image_mixture({MODELS['unseen']})`: no config or "
             'test has been tuned on it.', '', '![error vs NFE](figures/schedules_error_vs_nfe.png)', '']
    for name, (hand, rows) in tables.items():
        lines += [f'## {name}', '', '| solver | NFE | schedule | mean error | ratio to best hand-made (95% CI) | '
                  'median | train s (1 thread) | hand-made NFE to match |', '|---|---|---|---|---|---|---|---|']
        for solver in SOLVERS:
            for nfe in nfes:
                cands = {k[2]: v for k, v in hand.items() if k[0] == solver and k[1] == nfe}
                best = min(cands, key=lambda k: cands[k].mean().item())
                for label, err in cands.items():
                    mark = ' (best)' if label == best else ''
                    lines.append(f'| {solver} | {nfe} | {label}{mark} | {err.mean():.4f} | | {err.median():.4f} | | |')
                for r in sorted((r for r in rows if r['solver'] == solver and r['nfe'] == nfe),
                                key=lambda r: r['decoupled']):
                    err = torch.tensor(r['errors'], dtype=torch.float64)
                    lo, hi = bootstrap_ratio(err, cands[best])
                    match = match_nfe(err.mean().item(), hand, solver, nfes)
                    ratio = err.mean().item() / cands[best].mean().item()
                    lines.append(f"| {solver} | {nfe} | **LD3{' + decoupled' if r['decoupled'] else ''}** | "
                                 f"{err.mean():.4f} | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | {err.median():.4f} | "
                                 f"{r['seconds']:.0f} | {match if match else '> ' + str(nfes[-1])} |")
        lines += ['', 'Learned grids:', '']
        for r in rows:
            lines.append(f"- {r['solver']} NFE {r['nfe']}{' decoupled' if r['decoupled'] else ''}: `{r['grid']}`"
                         + (f", evaluation grid `{r['eval_grid']}`" if r['eval_grid'] else ''))
        lines.append('')
    write_report(out, lines)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
