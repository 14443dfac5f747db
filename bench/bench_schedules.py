"""Learned time grids (LD3, GITS) against the hand-made schedules, by the error to the exact ODE solution.

For each model (the image-shaped analytic mixture gmm_image, and the class-conditional digits gmm_digits with
classifier-free guidance 2), solver (UniPC, DPM-Solver++, iPNDM) and NFE: every hand-made schedule, the GITS grid
(training/gits.py defaults), and LD3 with and without the decoupled evaluation grid (trained in-process with
training/ld3.py from its defaults), measured on held-out noises (and labels) against the exact solution (per-sample
RMSE per pixel; mean with a 95% paired bootstrap interval of the ratio to the best hand-made schedule, and the
median), and the NFE the best hand-made schedule needs to match each learned grid:

    OMP_NUM_THREADS=1 python bench/bench_schedules.py --out=docs/schedules.md --jobs=2
    python bench/bench_schedules.py --quick=True --out=/tmp/schedules.md       # a small run, for development

Writes docs/schedules.md and docs/figures/schedules_error_vs_nfe.png. Trainings, teacher pairs, exact solutions
and GITS cost tables are kept in --work and reused (a finished training is read back, not trained again).
"""
import concurrent.futures as futures
import hashlib
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
from models.analytic import digit_mixture, image_mixture   # noqa: E402
from training import gits, ld3                              # noqa: E402
from training.distill import draw_batch                     # noqa: E402

SCHEDULES = (('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 1.0), ('time_uniform', 2.0))
SOLVERS = ('unipc', 'dpmpp', 'ipndm')
MODELS = {'gmm_image': (image_mixture, dict()),
          'gmm_digits': (digit_mixture, dict(guidance_type='cfg', guidance_rate=2.0)),
          # another seed, number of components and rank than gmm_image: no config or test was tuned on it
          'unseen': (image_mixture, dict(num_components=5, rank=6, seed=31337))}
HELD_OUT_SEED = 2 ** 31 - 1          # the held-out noises' generator seed (the teacher pairs use seed 0)
QUICK = dict(num_eval=100, ld3_nfes='5', options=dict(num_train=20, num_valid=40, training_rounds_v1=1,
                                                     training_rounds_v2=1), gits=dict(num_warmup=32))


def schedule_label(schedule, rho):
    return {'polynomial': 'polynomial (rho 7)', 'logsnr': 'logsnr', 'time_uniform': f'time_uniform (rho {rho:g})'}[
        schedule]


def model(name):
    build, kwargs = MODELS[name]
    return build(**kwargs)


def model_id(name):
    return f'{MODELS[name][0].__name__}({json.dumps(MODELS[name][1], sort_keys=True)})'


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def held_out(net, n, work, name):
    """Held-out noises and labels (a generator apart from the teacher pairs') and their exact ODE solutions."""
    z, cond = draw_batch(net, HELD_OUT_SEED, 0, list(range(n)), torch.float64, 'cpu')
    path = os.path.join(work, f'exact-{name}-{n}.pt')
    if os.path.isfile(path):
        return z, cond, torch.load(path, weights_only=True)
    parts = [solvers.solve_exact(net, z[i:i + 100] * net.sigma_max, net.sigma_max, net.sigma_min,
                                 None if cond is None else cond[i:i + 100]) for i in range(0, n, 100)]
    exact = torch.cat(parts)
    torch.save(exact, path + '.tmp')
    os.replace(path + '.tmp', path)
    return z, cond, exact


def errors(x, exact):
    return (x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())


def teacher_meta(name, o):
    return dict(dataset_name=name, teacher='unipc', teacher_steps=o['teacher_steps'], schedule_type='polynomial',
                schedule_rho=7.0, seed=0, model=model_id(name))


def train_job(args):
    """One LD3 training (run in a worker process, one thread): the per-sample held-out errors and times."""
    name, solver, nfe, decoupled, work, num_eval, opts = args
    torch.set_num_threads(1)
    key = dict(name=name, solver=solver, nfe=nfe, decoupled=decoupled, num_eval=num_eval, opts=opts)
    path = os.path.join(work, 'ld3', f'{name}-{solver}-{nfe}-{int(decoupled)}-{digest(key)}.json')
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    net = model(name)
    o = ld3.resolve(dict(opts, solver=solver))
    z, y = ld3.teacher_data(net, teacher_meta(name, o), o['num_train'] + o['num_valid'], os.path.join(work, 'data'),
                            torch.float64, 'cpu', log=lambda *_: None)
    n = o['num_train']
    cond_for = (lambda ids: draw_batch(net, 0, 0, ids, torch.float64, 'cpu')[1]) if net.label_dim else None
    settings = dict(solver=solver, num_steps=nfe + 1, sigma_min=net.sigma_min, sigma_max=net.sigma_max,
                    win_rate=o['win_rate'], decoupled=decoupled, sample_shape=list(net.sample_shape))
    start = time.time()
    predictor, trainer = ld3.train(net, settings, o, ((z[:n], y[:n]), (z[n:], y[n:])), cond_for=cond_for,
                                   log=lambda *_: None)
    seconds = time.time() - start
    zt, ct, exact = held_out(net, num_eval, work, name)
    with torch.no_grad():
        err = errors(predictor.sample(net, zt, cond=ct), exact)
    sigmas, evals = predictor.grids()
    result = dict(name=name, solver=solver, nfe=nfe, decoupled=decoupled, seconds=seconds, errors=err.tolist(),
                  grid=ld3.format_grid(sigmas), eval_grid=ld3.format_grid(evals) if evals is not None else None,
                  iterations=trainer.iterations)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f)
    os.replace(path + '.tmp', path)
    return result


def hand_made(name, nfes, work, num_eval):
    net = model(name)
    z, cond, exact = held_out(net, num_eval, work, name)
    out = {}
    for solver in SOLVERS:
        for nfe in nfes:
            for schedule, rho in SCHEDULES:
                x = solvers.sample(net, z, solver, nfe + 1, schedule, rho, cond=cond)
                out[solver, nfe, schedule_label(schedule, rho)] = errors(x, exact)
    return out


def gits_rows(name, nfes, work, num_eval, gits_opts):
    """GITS's grid per NFE (one cost table per model: it does not depend on the student solver) and its errors."""
    net = model(name)
    z, cond, exact = held_out(net, num_eval, work, name)
    o = gits.resolve(dict(gits_opts, cache_dir=os.path.join(work, 'gits')))
    start = time.time()
    gits.cached_table(net, o, model_id(name), log=lambda *_: None)
    seconds = time.time() - start
    rows = {}
    for nfe in nfes:
        grid, _ = gits.gits_grid(net, nfe + 1, o, model_id(name), log=lambda *_: None)
        for solver in SOLVERS:
            rows[solver, nfe] = dict(errors=errors(solvers.sample(net, z, solver, sigmas=grid, cond=cond), exact),
                                     grid=ld3.format_grid(grid))
    return rows, o, seconds


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
    for row, (name, (hand, gits_table, learned)) in enumerate(tables.items()):
        for col, solver in enumerate(SOLVERS):
            ax = axes[row][col]
            for schedule, rho in SCHEDULES:
                label = schedule_label(schedule, rho)
                ax.plot(nfes, [hand[solver, n, label].mean().item() for n in nfes], 'o-', lw=1, ms=3, label=label)
            ax.plot(nfes, [gits_table[solver, n]['errors'].mean().item() for n in nfes], 'v-', color='tab:gray',
                    lw=1.5, ms=5, label='GITS')
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


def learned_row(label, err, best_err, hand, solver, nfe, nfes, seconds=''):
    lo, hi = bootstrap_ratio(err, best_err)
    match = match_nfe(err.mean().item(), hand, solver, nfes)
    ratio = err.mean().item() / best_err.mean().item()
    return (f"| {solver} | {nfe} | **{label}** | {err.mean():.4f} | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{err.median():.4f} | {seconds} | {match if match else '> ' + str(nfes[-1])} |")


@click.command(context_settings=dict(show_default=True))
@click.option('--out', metavar='MD', default=os.path.join(ROOT, 'docs', 'schedules.md'), help='Markdown page')
@click.option('--models', 'model_names', metavar='LIST', default='gmm_image,gmm_digits', help='Models')
@click.option('--nfes', metavar='LIST', default='4,5,6,8,10', help='NFEs of the hand-made and GITS schedules')
@click.option('--ld3_nfes', metavar='LIST', default='4,5,6,8,10', help='NFEs at which LD3 is trained')
@click.option('--decoupled_nfes', metavar='LIST', default='4,5,6,8,10', help='NFEs at which LD3 is also trained '
              'with the decoupled grid')
@click.option('--num_eval', metavar='INT', type=int, default=400, help='Held-out noises')
@click.option('--jobs', metavar='INT', type=int, default=2, help='Trainings run at once (one thread each)')
@click.option('--work', metavar='DIR', default=os.path.join(ROOT, 'exps', 'bench_schedules'), help='Kept results')
@click.option('--options', metavar='JSON', default='{}', help='LD3 options on top of its defaults')
@click.option('--gits_options', metavar='JSON', default='{}', help='GITS options on top of its defaults')
@click.option('--quick', metavar='BOOL', type=bool, default=False, help=f'Small run for development: {QUICK}')
def main(out, model_names, nfes, ld3_nfes, decoupled_nfes, num_eval, jobs, work, options, gits_options, quick):
    torch.set_num_threads(1)
    opts, gits_opts = json.loads(options), json.loads(gits_options)
    if quick:
        num_eval, ld3_nfes, decoupled_nfes = QUICK['num_eval'], QUICK['ld3_nfes'], QUICK['ld3_nfes']
        opts, gits_opts = dict(QUICK['options'], **opts), dict(QUICK['gits'], **gits_opts)
    ints = lambda text: [int(v) for v in text.split(',') if v]
    nfes, ld3_nfes, decoupled_nfes = ints(nfes), ints(ld3_nfes), set(ints(decoupled_nfes))
    names = [n for n in model_names.split(',') if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise click.UsageError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    os.makedirs(work, exist_ok=True)
    start = time.time()
    for name in names:                   # exact solutions and teacher pairs first, then the trainings in parallel
        net = model(name)
        held_out(net, num_eval, work, name)
        o = ld3.resolve(dict(opts, solver='unipc'))
        ld3.teacher_data(net, teacher_meta(name, o), o['num_train'] + o['num_valid'], os.path.join(work, 'data'),
                         torch.float64, 'cpu')
    args = [(name, solver, nfe, dec, work, num_eval, opts) for name in names for nfe in ld3_nfes
            for solver in SOLVERS for dec in (False, True) if not dec or nfe in decoupled_nfes]
    with futures.ProcessPoolExecutor(jobs) as pool:
        learned = []
        for r in pool.map(train_job, args):
            learned.append(r)
            print(r['name'], r['solver'], r['nfe'], 'decoupled' if r['decoupled'] else '',
                  f"{torch.tensor(r['errors']).mean():.4g}", f"{r['seconds']:.0f}s", flush=True)
    tables, gits_info = {}, {}
    for name in names:
        g, g_opts, g_seconds = gits_rows(name, nfes, work, num_eval, gits_opts)
        tables[name] = (hand_made(name, nfes, work, num_eval), g, [r for r in learned if r['name'] == name])
        gits_info[name] = g_seconds
    figure(os.path.join(os.path.dirname(out), 'figures', 'schedules_error_vs_nfe.png'), tables, nfes)
    defaults = ld3.resolve(dict(opts, solver='unipc'))
    command = 'OMP_NUM_THREADS=1 python bench/bench_schedules.py' + (' --quick=True' if quick else '') + \
        (f" --options='{options}'" if options != '{}' else '') + \
        (f" --gits_options='{gits_options}'" if gits_options != '{}' else '')
    train_seconds = sum(r['seconds'] for r in learned)
    lines = ['# Learned time grids (LD3, GITS) against hand-made schedules', '',
             f'Generated by `{command}` ({(time.time() - start) / 60:.0f} min wall on 2 shared cores, of which '
             f'{train_seconds / 60:.0f} CPU-min LD3 training). Error: per-sample RMSE per pixel to the exact ODE '
             f'solution on {num_eval} held-out noises (DOP853, rtol 1e-9); mean with a 95% paired bootstrap '
             'interval of the ratio to the best hand-made schedule at the same solver and NFE, the median, and the '
             'smallest NFE at which the best hand-made schedule reaches the learned grid\'s mean error.', '',
             f"Models: {', '.join(f'`{n}` = `{MODELS[n][0].__name__}({MODELS[n][1]})`' for n in names)}. On the "
             'conditional model the held-out labels are drawn from the class prior and the guided ODE is solved '
             'exactly.', '',
             f"LD3 (training/ld3.py defaults{', with ' + json.dumps(opts) if opts else ''}): "
             f"{defaults['num_train']} training and {defaults['num_valid']} validation pairs from a UniPC teacher "
             f"with {defaults['teacher_steps']} steps (polynomial rho 7), loss {defaults['loss_type']}, rounds "
             f"{defaults['training_rounds_v1']} + {defaults['training_rounds_v2']}, batch "
             f"{defaults['main_train_batch_size']}, lr_time_1 {defaults['lr_time_1']}, start "
             f"{defaults['init_schedule']}, prior_bound 0.001 C H W / N^2, win_rate {defaults['win_rate']}. "
             f"GITS (training/gits.py defaults{', with ' + json.dumps(gits_opts) if gits_opts else ''}): "
             f"{g_opts['num_warmup']} {g_opts['solver_tea']} teacher runs on a {g_opts['fine_schedule']} grid of "
             f"{g_opts['num_steps_tea']} points, metric {g_opts['metric']}, coeff {g_opts['coeff']} (cost table "
             + ', '.join(f'{n} {s:.0f} s' for n, s in gits_info.items()) + ', 0 s when cached); one grid per NFE '
             'for every solver.', '', '![error vs NFE](figures/schedules_error_vs_nfe.png)', '']
    for name, (hand, gits_table, rows) in tables.items():
        lines += [f'## {name}', '', '| solver | NFE | schedule | mean error | ratio to best hand-made (95% CI) | '
                  'median | LD3 train s (1 thread) | hand-made NFE to match |', '|---|---|---|---|---|---|---|---|']
        for solver in SOLVERS:
            for nfe in nfes:
                cands = {k[2]: v for k, v in hand.items() if k[0] == solver and k[1] == nfe}
                best = min(cands, key=lambda k: cands[k].mean().item())
                for label, err in cands.items():
                    mark = ' (best)' if label == best else ''
                    lines.append(f'| {solver} | {nfe} | {label}{mark} | {err.mean():.4f} | | {err.median():.4f} | | |')
                lines.append(learned_row('GITS', gits_table[solver, nfe]['errors'], cands[best], hand, solver, nfe,
                                         nfes))
                for r in sorted((r for r in rows if r['solver'] == solver and r['nfe'] == nfe),
                                key=lambda r: r['decoupled']):
                    err = torch.tensor(r['errors'], dtype=torch.float64)
                    label = 'LD3' + (' + decoupled' if r['decoupled'] else '')
                    lines.append(learned_row(label, err, cands[best], hand, solver, nfe, nfes, f"{r['seconds']:.0f}"))
        lines += ['', 'GITS grids:', '']
        for nfe in nfes:
            lines.append(f"- NFE {nfe}: `{gits_table[SOLVERS[0], nfe]['grid']}`")
        lines += ['', 'LD3 grids:', '']
        for r in rows:
            lines.append(f"- {r['solver']} NFE {r['nfe']}{' decoupled' if r['decoupled'] else ''}: `{r['grid']}`"
                         + (f", evaluation grid `{r['eval_grid']}`" if r['eval_grid'] else ''))
        lines.append('')
    write_report(out, lines)
    print(f'wrote {out} in {(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
    main()
