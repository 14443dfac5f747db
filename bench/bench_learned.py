"""Learned solvers against the classical ones on the image-shaped analytic mixture.

For each NFE (sequential rounds) the bench trains the learned solvers with train.py (or reuses --reuse folders),
then measures every solver's error against the exact ODE solution on held-out seeds:

    python bench/bench_learned.py --nfes=3,5,7,9 --students=epd,ipndm,amed,dpm --out=docs/learned.md

It also draws docs/figures/learned_vs_classical.png and docs/figures/learned_epd_tables.png; with
--figures_only=True it redraws them from the page's table and the EPD predictors (trained if missing) only.
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
from bench import figures                    # noqa: E402
from models.analytic import image_mixture   # noqa: E402

LABELS = {'epd': 'EPD', 'ipndm': 'EPD-Plugin (iPNDM)', 'amed': 'AMED-Solver', 'dpm': 'AMED-Plugin (DPM-2)',
          'euler': 'AMED-Plugin (Euler)'}
SCHEDULES = (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2))   # the rho each schedule is used with


def classical_settings(name, nfe):
    if solvers.SOLVERS[name].evals_per_step == 2:
        afs = nfe % 2 == 1
        return (nfe + int(afs)) // 2 + 1, afs
    return nfe + 1, False


def train_command(student, nfe, kimg, exps, extra=()):
    """train.py with the gmm_image config's training settings (what a user gets by default), into its own folder."""
    num_steps = (nfe + 1) // 2 + 1          # with AFS: 2 (N - 1) - 1 = nfe
    args = [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset_name=gmm_image', f'--sampler_stu={student}',
            f'--num_steps={num_steps}',
            '--afs=True', f'--outdir={os.path.join(exps, f"{student}-nfe{nfe}")}']
    return (args + ([f'--total_kimg={kimg}'] if kimg else []) + (['--max_order=3'] if student == 'ipndm' else [])
            + list(extra))


def train_all(jobs, kimg, exps, parallel, command=train_command):
    """Run the trainings, `parallel` at a time (each on one thread then); returns their wall times."""
    env = dict(os.environ, OMP_NUM_THREADS='1') if parallel > 1 else dict(os.environ)
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running[job] = (subprocess.Popen(command(*job, kimg, exps), cwd=ROOT, env=env,
                                             stdout=subprocess.DEVNULL), time.time())
        time.sleep(1)
        for job, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f'training {job} failed (exit {proc.returncode})')
                seconds[job] = time.time() - start
                del running[job]
    return seconds


def find_predictor(folder, student, nfe):
    for meta_path in sorted(glob.glob(os.path.join(folder, '**', 'predictor.json'), recursive=True)):
        meta = json.load(open(meta_path))
        if meta['sampler_stu'] == student and 2 * (meta['num_steps'] - 1) - meta['afs'] == nfe:
            return os.path.dirname(meta_path)
    return None


def held_out(net, num_eval):
    """Held-out latents (seeded apart from training: train.py draws from (seed, it, i)) and a function giving each
    sample's RMSE per pixel to the exact ODE solution from them."""
    g = torch.Generator().manual_seed(2**31 - 1)
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    exact = torch.cat([solvers.solve_exact(net, part * net.sigma_max, net.sigma_max, net.sigma_min, rtol=1e-9,
                                           atol=1e-9) for part in z.split(256)])
    return z, lambda x: (x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())


def classical_errors(net, z, nfe, per_sample):
    """Per-sample errors of every classical solver x schedule at this NFE, keyed 'name (schedule)'."""
    errors = {}
    for name in sorted(solvers.ode_solvers()):
        steps, afs = classical_settings(name, nfe)
        for schedule, rho in SCHEDULES:
            errors[f'{name} ({schedule})'] = per_sample(solvers.sample(net, z, name, steps, schedule, rho, afs=afs))
    return errors


NOTES_MARKER = '<!-- Written by hand from here on; regenerating the page keeps it. -->'


def write_report(out, lines):
    """Write the generated lines to out, keeping any hand-written notes below NOTES_MARKER in the existing file;
    through a temporary name, so an interrupted run leaves the old page whole."""
    notes = ''
    if os.path.exists(out):
        with open(out) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = '\n' + old[old.index(NOTES_MARKER):]
    tmp = out + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n' + notes)
    os.replace(tmp, out)


def bootstrap_ratio(err_a, err_b, draws=2000, seed=0):
    """95% interval of mean(err_a) / mean(err_b) over resamplings of the held-out samples (paired)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(err_a), (draws, len(err_a)), generator=g)
    ratios = err_a[idx].mean(1) / err_b[idx].mean(1)
    return torch.quantile(ratios, 0.025).item(), torch.quantile(ratios, 0.975).item()


FIGURES_COMMAND = 'python bench/bench_learned.py --figures_only=True'


def epd_predictors(nfes, reuse, exps, kimg, jobs):
    """{nfe: the EPD predictor} from --reuse or the bench's own folders, training the missing ones."""
    found = {n: (find_predictor(reuse, 'epd', n) if reuse else None) or
             find_predictor(os.path.join(exps, f'epd-nfe{n}'), 'epd', n) for n in nfes}
    missing = [('epd', n) for n, folder in found.items() if folder is None]
    if missing:
        print(f"training EPD for NFE {', '.join(str(n) for _, n in missing)} (train.py, the gmm_image config)")
        train_all(missing, kimg, exps, jobs)
        found.update({n: find_predictor(os.path.join(exps, f'epd-nfe{n}'), 'epd', n) for _, n in missing})
    return {n: training.load_predictor(folder) for n, folder in found.items()}


def write_figures(out, rows, nfes, students, predictors):
    """The page's two figures and the section that shows them (inserted into the page, or replaced there)."""
    learned = [LABELS[s] for s in students if LABELS[s] in rows]
    figures.learned_vs_classical(rows, nfes, learned, figures.figure_path(out, 'learned_vs_classical.png'))
    figures.epd_tables(predictors, figures.figure_path(out, 'learned_epd_tables.png'))
    section = [figures.FIGURES_HEADING, '',
               f'Regenerate the figures alone with `{FIGURES_COMMAND}`: it reads the table above and the EPD '
               'predictors in `exps/bench/`, training them there with the config\'s settings when missing. Training '
               'is seeded, but a predictor retrained after the code has changed is not bit-identical to the one the '
               'table measured: rerun the whole bench to draw both from the same predictors.', '',
               '![Learned solvers against the classical solvers by NFE](figures/learned_vs_classical.png)', '',
               'The table above as lines (log-log): the learned solvers (thick) against each classical solver at its '
               'best schedule for each NFE (dashed) and the best classical solver per NFE (black bars).', '',
               '![The learned EPD tables per step](figures/learned_epd_tables.png)', '',
               'What EPD learned, per step (columns: NFE): where its K points sit inside the step (r = 0 is the '
               'step\'s start, 1 its end, in log sigma; marker area = weight), the simplex weights, and the '
               'direction scales c (filled) and time scales a (open; 1 = no scaling).', '']
    with open(out) as f:
        text = f.read()
    figures.write_page(out, figures.replace_figures_section(text, section, before_heading='## Best classical'))


def rows_from_page(out, nfes):
    tables = figures.read_tables(out)
    heading = next(iter(tables), None)
    if heading is None:
        raise SystemExit(f'{out} has no table; run the bench without --figures_only first')
    headers, rows = tables[heading]
    columns = figures.nfe_columns(headers)
    if not set(nfes) <= set(columns):
        raise SystemExit(f"{out} has no columns for NFE {', '.join(str(n) for n in sorted(set(nfes) - set(columns)))}")
    return {label: [values[columns.index(n)] for n in nfes] for label, values in rows.items()}


@click.command(context_settings=dict(show_default=True))
@click.option('--nfes', metavar='LIST', default='3,5,7,9', help='NFEs (sequential rounds)')
@click.option('--students', metavar='LIST', default='epd,ipndm,amed,dpm', help='Learned solvers to train')
@click.option('--kimg', metavar='FLOAT', type=float, default=None, help='Training length [default: the config\'s]')
@click.option('--num_eval', metavar='INT', type=int, default=1024, help='Held-out samples')
@click.option('--exps', metavar='DIR', default=os.path.join(ROOT, 'exps', 'bench'), help='Where predictors go')
@click.option('--reuse', metavar='DIR', default=None, help='Reuse predictors already in this folder')
@click.option('--jobs', metavar='INT', type=int, default=1, help='Trainings run at a time (one thread each if > 1)')
@click.option('--out', metavar='PATH', default=os.path.join(ROOT, 'docs', 'learned.md'), help='Markdown output')
@click.option('--figures_only', metavar='BOOL', type=bool, default=False, help='Only redraw the figures, from the --out page\'s table and the EPD predictors')
def main(nfes, students, kimg, num_eval, exps, reuse, jobs, out, figures_only):
    nfes = [int(v) for v in nfes.split(',')]
    students = students.split(',')
    if figures_only:
        write_figures(out, rows_from_page(out, nfes), nfes, students, epd_predictors(nfes, reuse, exps, kimg, jobs))
        print(f'wrote the figures of {out}')
        return
    net = image_mixture()
    z, per_sample = held_out(net, num_eval)
    rows = {}
    todo = [(s, n) for n in nfes for s in students if not (reuse and find_predictor(reuse, s, n))]
    train_all(todo, kimg, exps, jobs)
    train_times = {}
    for nfe in nfes:
        for student in students:
            folder = find_predictor(reuse, student, nfe) if reuse else None
            folder = folder or find_predictor(os.path.join(exps, f'{student}-nfe{nfe}'), student, nfe)
            pred = training.load_predictor(folder)
            with open(os.path.join(folder, 'stats.jsonl')) as f:      # train.py's own clock, excluding start-up
                train_times[(student, nfe)] = json.loads(f.read().splitlines()[-1])['sec']
            with torch.no_grad():
                rows.setdefault(LABELS[student], {})[nfe] = per_sample(pred.sample(net, z))
            print(f'{LABELS[student]} NFE {nfe}: {rows[LABELS[student]][nfe].mean():.5f} ({folder})', flush=True)
        for label, errors in classical_errors(net, z, nfe, per_sample).items():
            rows.setdefault(label, {})[nfe] = errors
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
                for name in solvers.ode_solvers() for sch, rho in SCHEDULES)), None)
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
        where = f'{jobs} trainings at a time, one thread each' if jobs > 1 else 'one training at a time'
        lines += ['', f'## Training time (2 CPU cores, {where}; from each run\'s stats.jsonl)', '']
        lines += [f'- {LABELS[s]} NFE {n}: {t:.0f} s' for (s, n), t in train_times.items()]
    write_report(out, lines)
    means = {label: [errs[n].mean().item() if n in errs else float('nan') for n in nfes] for label, errs in rows.items()}
    if 'epd' in students:
        write_figures(out, means, nfes, students, epd_predictors(nfes, reuse, exps, kimg, jobs))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
