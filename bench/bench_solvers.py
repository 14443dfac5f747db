"""Accuracy of every registered solver against the exact ODE solution of the image-shaped Gaussian mixture.

For a batch of seeded latents, the probability-flow ODE is solved exactly once (DOP853 in float64) from sigma_max
to sigma_min; every solver is then run at a fixed number of denoiser evaluations (NFE) on several schedules and
scored by the RMSE per pixel against that solution. Writes markdown tables into docs/solvers.md and figures into
docs/figures/ (error vs NFE per schedule; 2-D trajectories on gmm_2d against the exact ODE paths).

    python bench/bench_solvers.py --out=docs/solvers.md --compare_3m=True
    python bench/bench_solvers.py --figures_only=True     # figures from the page's tables (seconds)
"""
import math
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers                                   # noqa: E402
from bench import figures                        # noqa: E402
from models.analytic import image_mixture        # noqa: E402

NFES = (3, 4, 5, 6, 8, 10, 15, 20)
SCHEDULES = [('polynomial', 7.0, 'polynomial, rho = 7'), ('logsnr', None, 'logsnr (uniform in log sigma)'),
             ('time_uniform', 2.0, 'time_uniform, rho = 2'), ('flowmatch', None, 'flowmatch (shift 1)')]
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
COMMAND = 'python bench/bench_solvers.py --out=docs/solvers.md --compare_3m=True'
FIGURES_COMMAND = 'python bench/bench_solvers.py --figures_only=True'
TRAJECTORY_NFE = 6


def settings_for_nfe(name, nfe):
    """num_steps and afs that give exactly `nfe` evaluations: one per step, or two per step with AFS saving the
    first evaluation when the count is odd."""
    info = solvers.SOLVERS[name]
    if info.evals_per_step == 1:
        return dict(num_steps=nfe + 1, afs=False)
    if info.evals_per_step == 2:
        return dict(num_steps=nfe // 2 + 1, afs=False) if nfe % 2 == 0 else dict(num_steps=(nfe + 1) // 2 + 1,
                                                                                  afs=True)
    raise ValueError(f'{name}: {info.evals_per_step} evaluations per step is not handled')


def rmse(a, b):
    return ((a - b).to(torch.float64).pow(2).mean().sqrt()).item()


def run_grid(net, latents, exact, names):
    """{(schedule, solver, nfe): (rmse, seconds per image)}, with every run's NFE counted and checked."""
    results = {}
    batch = latents.shape[0]
    with torch.no_grad():
        net(latents, 1.0)                          # first-call allocations stay out of the timings
    for schedule, rho, _ in SCHEDULES:
        for name in names:
            for nfe in NFES:
                opts = settings_for_nfe(name, nfe)
                assert solvers.nfe_formula(name, **opts) == nfe
                start = time.perf_counter()
                with torch.no_grad(), solvers.count_calls(net) as counter:
                    out = solvers.sample(net, latents, solver=name, schedule_type=schedule,
                                         schedule_rho=rho if rho is not None else 7.0, **opts)
                seconds = time.perf_counter() - start
                counted = counter.nfe(batch)
                assert counted == nfe, f'{name} at NFE {nfe} ({opts}) made {counted} evaluations per sample'
                results[schedule, name, nfe] = (rmse(out, exact), seconds / batch)
            row = ' '.join(f'{results[schedule, name, n][0]:9.2e}' for n in NFES)
            print(f'{schedule:13s} {name:8s} {row}', flush=True)
    return results


# -- side experiment: the two DPM-Solver++(3M) variants ------------------------------------------------------------

CROSSOVER_NFES = (3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60, 80)
VARIANT_LABELS = {'phi3': 'phi3 (default: diff-sampler, k-diffusion, diffusers)', '2phi3': '2phi3 (third order)'}


def dpmpp_3m(net, x, sigmas, second_difference_weight):
    """DPM-Solver++(3M), data prediction, written out independently of solvers/classical.py: weight 1 on the second
    divided difference is the variant 'phi3', weight 2 the variant '2phi3' (both checked against solvers.dpmpp
    below). Warm start at orders 1 and 2; no lower-order final steps (the grids here are long)."""
    history = []                                                   # (lambda, D), newest first
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        denoised = net(x, s_cur)
        history = [(-torch.log(s_cur), denoised)] + history[:2]
        h = torch.log(s_cur / s_next)                              # step in lambda = -log sigma
        em1 = torch.expm1(-h)                                      # e^{-h} - 1
        x_next = (s_next / s_cur) * x - em1 * denoised
        if len(history) >= 2:
            lam0, (lam1, m1) = history[0][0], history[1]
            r0 = (lam0 - lam1) / h
            slope0 = (denoised - m1) / r0                          # first divided difference, in units of h
            if len(history) == 2:
                x_next = x_next - 0.5 * em1 * slope0
            else:
                lam2, m2 = history[2]
                r1 = (lam1 - lam2) / h
                slope1 = (m1 - m2) / r1
                curvature = (slope0 - slope1) / (r0 + r1)          # second divided difference, in units of h^2
                first = slope0 + r0 / (r0 + r1) * (slope0 - slope1)
                w2 = em1 / h + 1                                   # phi_2 of the data-prediction update
                w3 = w2 / h - 0.5                                  # phi_3
                x_next = x_next + w2 * first - second_difference_weight * w3 * curvature
        x = x_next
    return x


def graded_grid(n, warm, sigma_min, sigma_max):
    """n equal steps in log sigma, preceded by `warm` warm-up steps of length h^2 (as in tests/test_convergence.py),
    so that the lower-order start does not cap the measured order."""
    span = math.log(sigma_max / sigma_min)
    h = span / n
    lam = [j * h ** 2 for j in range(warm + 1)]
    lam += torch.linspace(lam[-1], span, n + 1, dtype=torch.float64)[1:].tolist()
    return sigma_max * torch.exp(-torch.tensor(lam, dtype=torch.float64))


def measure_3m_orders(net, seed, steps=(40, 80, 160)):
    """Errors and observed orders of the two 3M variants on graded and on plain log-uniform grids over sigma in
    [0.1, 20] (float64)."""
    lo, hi = 0.1, 20.0
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *net.sample_shape, generator=g, dtype=torch.float64) * hi
    exact = solvers.solve_exact(net, x, hi, lo, rtol=1e-12, atol=1e-12)
    # The independent rewrite must be the library's solver, step for step, for both weights.
    sigmas = graded_grid(steps[0], 2, lo, hi)
    for variant, weight in (('phi3', 1.0), ('2phi3', 2.0)):
        with torch.no_grad():
            mine = dpmpp_3m(net, x, sigmas, weight)
            library = solvers.SOLVERS['dpmpp'].fn(net, x, sigmas, max_order=3, lower_order_final=False,
                                                  variant=variant)
        assert torch.allclose(mine, library, rtol=0, atol=1e-12), f'3M rewrite differs from solvers.dpmpp {variant}'
    rows = []
    for label, weight, warm in [('2phi3', 2.0, 2), ('phi3 (default)', 1.0, 2),
                                ('2phi3, no graded warm-up', 2.0, 0), ('phi3, no graded warm-up', 1.0, 0)]:
        errors = []
        for n in steps:
            with torch.no_grad():
                out = dpmpp_3m(net, x, graded_grid(n, warm, lo, hi), weight)
            errors.append(rmse(out, exact))
        orders = [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]
        rows.append((label, errors, orders))
        print(f'3M {label:30s} errors ' + ' '.join(f'{e:.3e}' for e in errors) + '  orders '
              + ' '.join(f'{o:.2f}' for o in orders), flush=True)
    return steps, rows


def measure_3m_crossover(net, latents, exact):
    """{(schedule, variant): [RMSE at each of CROSSOVER_NFES]} for solvers.sample's dpmpp at its defaults
    (max_order 3, lower-order final steps), the same latents and exact solution as the main tables."""
    table = {}
    for schedule, rho, _ in SCHEDULES:
        for variant in VARIANT_LABELS:
            row = []
            for nfe in CROSSOVER_NFES:
                with torch.no_grad():
                    out = solvers.sample(net, latents, 'dpmpp', nfe + 1, schedule,
                                         rho if rho is not None else 7.0, variant=variant)
                row.append(rmse(out, exact))
            table[schedule, variant] = row
            print(f'3M {schedule:13s} {variant:6s} ' + ' '.join(f'{e:9.2e}' for e in row), flush=True)
    return table


def crossover_nfe(phi3, two_phi3):
    """The smallest tested NFE from which 2phi3's error stays below phi3's at every larger tested NFE (None if it
    does not)."""
    for k in range(len(CROSSOVER_NFES)):
        if all(b < a for a, b in zip(phi3[k:], two_phi3[k:])):
            return CROSSOVER_NFES[k]
    return None


# -- report -----------------------------------------------------------------------------------------------------

def fmt(value):
    return 'nan' if not math.isfinite(value) else f'{value:.2e}'


def write_report(path, names, results, batch, seed, exact_seconds, threads, load, comparison):
    lines = ['# Solver accuracy on the image-shaped Gaussian mixture', '',
             f'Generated by `{COMMAND}` (batch {batch}, seed {seed}); rerun it to regenerate this file.', '',
             'Model: `models/analytic.py:image_mixture()` (3x32x32, 8 components, exact denoiser). Reference: the '
             f'exact probability-flow ODE solution from sigma = {SIGMA_MAX:g} to {SIGMA_MIN:g} by '
             '`solvers.solve_exact` (DOP853, float64, rtol = atol = 1e-10, '
             f'{exact_seconds:.1f} s for the batch). Entries: RMSE per pixel of the final sample (data in [-1, 1]) '
             'against it; the solvers run in float64, so rounding plays no part.', '',
             'NFE = denoiser evaluations per sample, counted with `solvers.count_calls` for every entry. Solvers '
             'with one evaluation per step use NFE + 1 time points; `heun` and `dpm` (two per step) use NFE/2 + 1 '
             'time points for even NFE, and (NFE+1)/2 + 1 with the analytical first step (AFS) for odd NFE. '
             'Multistep solvers run at their default maximum order with lower-order final steps, `dpmpp` and '
             '`unipc` at their default variants `phi3` and `bh2` (the defaults of `solvers.sample`).', '']
    for schedule, _, title in SCHEDULES:
        lines += [f'## {title}', '', '| solver | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |',
                  '| --- |' + ' ---: |' * len(NFES)]
        for name in names:
            row = []
            best = {n: min(results[schedule, m, n][0] for m in names) for n in NFES}
            for n in NFES:
                value = results[schedule, name, n][0]
                row.append(f'**{fmt(value)}**' if value == best[n] else fmt(value))
            lines.append(f'| {name} | ' + ' | '.join(row) + ' |')
        lines.append('')
    lines += ['## Best solver per NFE', '',
              '| NFE | best overall (schedule) | RMSE | best on polynomial rho = 7 | RMSE |', '| ---: | --- | ---: | --- | ---: |']
    for n in NFES:
        finite = [(v[0], s, m) for (s, m, k), v in results.items() if k == n and math.isfinite(v[0])]
        err, sched, name = min(finite)
        poly = min((results['polynomial', m, n][0], m) for m in names)
        lines.append(f'| {n} | {name} ({sched}) | {err:.2e} | {poly[1]} | {poly[0]:.2e} |')
    lines += ['', '## Wall time', '',
              f'Milliseconds per image (median over the four schedules; batch {batch}, float64, torch threads: {threads}, '
              f'load average {load} at the end). The denoiser dominates, so time grows with the NFE for every '
              'solver; on a shared machine single entries vary by tens of percent.', '',
              '| solver | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |', '| --- |' + ' ---: |' * len(NFES)]
    for name in names:
        times = [statistics.median(results[s, name, n][1] for s, _, _ in SCHEDULES) for n in NFES]
        lines.append(f'| {name} | ' + ' | '.join(f'{1e3 * t:.2f}' for t in times) + ' |')
    lines.append('')
    if {'dpmpp', 'unipc'} <= set(names):
        rises = [(s, m, results[s, m, 10][0], results[s, m, 15][0]) for s, _, _ in SCHEDULES for m in ('dpmpp', 'unipc')
                 if results[s, m, 15][0] > results[s, m, 10][0]]
        if rises:
            lines += ['## Lower-order final steps stop at 15 steps', '', 'As in diffusers, `lower_order_final` lowers the '
                      'order of the last steps only for runs of fewer than 15 steps. At NFE 15 (15 steps) the final '
                      'step runs at full order; on schedules whose last step is long in log sigma it then costs more '
                      'than the extra evaluations gain: ' + '; '.join(f'{m} on {s} {a:.2e} at NFE 10 vs {b:.2e} at NFE 15'
                                                                       for s, m, a, b in rises) + '.', '']
    lines += ['## Notes on orders', '',
              '**DPM-Solver++(3M): two variants.** In data prediction, one step integrates D against the kernel '
              'e^{u-h} over u in [0, h] (h the step in log sigma). Expanding D = D0 + u D1 + (u^2/2) D2, the three '
              'terms get the weights -(e^{-h} - 1), h phi_2 and -h^2 phi_3, with phi_2 = (e^{-h} - 1)/h + 1 and '
              'phi_3 = (phi_2 - 1/2)/h as written in the code. The multistep update does not estimate h^2 D2 but the '
              'second divided difference of the past outputs in units of h, which tends to h^2 D2 / 2 (a Newton '
              'coefficient), so the weight that cancels the h^3 term of the local error is 2 phi_3: `--variant=2phi3` '
              'is third order. The published update, used by diff-sampler (which produced the seeds\' tables), '
              'k-diffusion (`sample_dpmpp_3m_sde` at eta = 0) and diffusers (`DPMSolverMultistepScheduler`, order 3), '
              'weights it by phi_3 alone: it adds half the curvature correction and is second order in the limit. '
              '`--variant=phi3` is that update and the default, so published numbers reproduce '
              '(`tests/test_dpmpp_variants.py` checks it against diffusers\' scheduler on its own grid to float32 '
              'rounding and against every third-order step of k-diffusion\'s update to float64 rounding; k-diffusion '
              'differs only in its one second-order warm-up step, which uses the phi_2 ("heun") form where '
              'diff-sampler, diffusers\' default and `solvers.dpmpp` use the midpoint form). `tests/test_convergence.py` '
              'measures orders 3 and 2. The table below measures both weights with an independent rewrite of the '
              'update in the bench script (which agrees with `solvers.dpmpp` to 1e-12 for both variants).', '']
    if comparison is None:
        lines += [f'(Run with `--compare_3m=True` to measure it; `{COMMAND}` does.)', '']
    else:
        (steps, rows), crossover = comparison
        lines += ['RMSE against the exact solution over sigma in [0.1, 20] on log-uniform grids of N steps '
                  '(float64, 2 samples); "graded" grids make the two warm-up steps h^2 long, as the convergence '
                  'test does. Order = log2 of the error ratio between N and 2N.', '',
                  '| variant (weight on the 2nd divided difference) | ' + ' | '.join(f'N = {n}' for n in steps) + ' | '
                  + ' | '.join(f'order {steps[k]}->{steps[k + 1]}' for k in range(len(steps) - 1)) + ' |',
                  '| --- |' + ' ---: |' * (2 * len(steps) - 1)]
        for label, errors, orders in rows:
            lines.append(f'| {label} | ' + ' | '.join(f'{e:.3e}' for e in errors) + ' | '
                         + ' | '.join(f'{o:.2f}' for o in orders) + ' |')
        lines += ['', '**Where the third-order variant starts to pay.** RMSE of `dpmpp` at its defaults (max_order 3, '
                  'lower-order final steps) against the exact solution, same latents and model as the tables above, '
                  'for both variants; the lower of each pair is bold. NFE 3 and 4 take no third-order step, so the '
                  'variants agree there. "2phi3 from" is the smallest tested NFE from which 2phi3 is lower at every '
                  'larger tested NFE.', '',
                  '| schedule | variant | ' + ' | '.join(f'NFE {n}' for n in CROSSOVER_NFES) + ' | 2phi3 from |',
                  '| --- | --- |' + ' ---: |' * (len(CROSSOVER_NFES) + 1)]
        for schedule, _, title in SCHEDULES:
            a, b = crossover[schedule, 'phi3'], crossover[schedule, '2phi3']
            cross = crossover_nfe(a, b)
            for variant, row, other in (('phi3', a, b), ('2phi3', b, a)):
                cells = [f'**{fmt(v)}**' if v < w else fmt(v) for v, w in zip(row, other)]
                last = (f'NFE {cross}' if cross is not None else 'not up to NFE 80') if variant == 'phi3' else ''
                lines.append(f'| {title} | {VARIANT_LABELS[variant]} | ' + ' | '.join(cells) + f' | {last} |')
        lines.append('')
    lines += ['**Warm-up limits the global order.** A k-step method needs k past outputs, so its first steps are '
              'taken at orders 1, 2, ...; with `lower_order_final` the last steps of short runs drop back too. A '
              'first-order step of length h leaves a local error of order h^2 that later steps carry to the end, so '
              'on a grid of equal steps the global error of any multistep method is at best O(h^2), however high '
              'its nominal order. The nominal order shows only when the warm-up steps are made shorter (length h^2 '
              'in the convergence test and above). At the small NFEs of the tables the warm-up and final steps are '
              'a large share of the run, which is one reason why orders 3 and 4 gain less over order 2 than their '
              'nominal orders suggest.', '',
              '**iPNDM on non-uniform grids.** iPNDM applies the Adams-Bashforth weights derived for equal steps '
              '(e.g. 55/24, -59/24, 37/24, -9/24) to the slopes whatever the step sizes. Those weights reproduce '
              'the integral of a polynomial slope only when the past steps are as long as the current one; on all '
              'four schedules here (none has equal steps in sigma) the step ratio changes from step to step, the '
              'interpolant is wrong at first order in the step variation, and the method is second order in the '
              'limit (`tests/test_convergence.py` measures 2 for max_order 3 and 4). `ipndm_v` recomputes the '
              'weights from the actual nodes (variable-step Adams-Bashforth) and keeps its nominal order on any '
              'grid. At practical step counts the fixed weights can still do well (see the tables): the error '
              'constants matter there as much as the asymptotic order.', '']
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def write_figures(out, names, results=None):
    """The page's figures: from `results` when just measured, else from the tables on the page; then the page's
    figures section, which shows them."""
    if results is None:
        tables = figures.read_tables(out)
        missing = [title for _, _, title in SCHEDULES if title not in tables]
        if missing:
            raise SystemExit(f"{out} has no table for {', '.join(missing)}; run {COMMAND} first")
        nfes = figures.nfe_columns(tables[SCHEDULES[0][2]][0])
        panels = {title: {n: v for n, v in tables[title][1].items() if n in names} for _, _, title in SCHEDULES}
    else:
        nfes = list(NFES)
        panels = {title: {n: [results[s, n, k][0] for k in NFES] for n in names} for s, _, title in SCHEDULES}
    figures.error_vs_nfe(panels, nfes, figures.figure_path(out, 'solvers_error_vs_nfe.png'))
    errors = figures.trajectories_2d(figures.figure_path(out, 'solvers_trajectories_2d.png'), names,
                                     settings_for_nfe, nfe=TRAJECTORY_NFE)
    section = [figures.FIGURES_HEADING, '',
               f'Regenerate the figures alone with `{FIGURES_COMMAND}`: it reads the tables below and recomputes the '
               '2-D trajectories (seconds).', '',
               '![RMSE against the exact solution vs NFE, one panel per schedule](figures/solvers_error_vs_nfe.png)', '',
               'RMSE per pixel against the exact solution against NFE (both axes logarithmic), every solver, one panel '
               'per schedule: the tables below as lines.', '',
               '![Solver trajectories on gmm_2d against the exact ODE paths](figures/solvers_trajectories_2d.png)', '',
               f'The 2-D mixture `gmm_2d` (six elongated Gaussians on a ring, density in grey): the states of every '
               f'solver at NFE {TRAJECTORY_NFE} (polynomial schedule, rho = 7) from the same 10 latents, over the exact '
               'ODE paths (black; x marks the exact end point). The paths start at radius ~80 and come in nearly '
               'straight; the view shows the last part, where they bend towards a mode. End-point RMSE: '
               + ', '.join(f'{n} {e:.3f}' for n, e in errors.items()) + '.', '']
    with open(out) as f:
        text = f.read()
    figures.write_page(out, figures.replace_figures_section(text, section, before_heading='## ' + SCHEDULES[0][2]))


@click.command(context_settings=dict(show_default=True))
@click.option('--out', metavar='PATH', default='docs/solvers.md', help='Markdown report to write')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=16, help='Latents per run')
@click.option('--seed', metavar='INT', type=int, default=0, help='Seed of the latents')
@click.option('--solvers', 'names', metavar='LIST', default=None, help='Comma-separated solvers [default: every registered solver]')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=1, help='Torch intra-op threads (1 keeps timings steady on a shared machine)')
@click.option('--compare_3m', metavar='BOOL', type=bool, default=False, help='Also measure the two DPM-Solver++(3M) variants: orders, and error vs NFE up to 80')
@click.option('--figures_only', metavar='BOOL', type=bool, default=False, help='Only redraw the figures, from the tables already on the --out page')
def main(out, batch, seed, names, threads, compare_3m, figures_only):
    """Accuracy against the exact solution for every solver, NFE and schedule; writes a markdown report."""
    torch.set_num_threads(threads)
    names = names.split(',') if names else solvers.ode_solvers()
    if figures_only:
        write_figures(out, names)
        print(f'wrote the figures of {out}')
        return
    net = image_mixture(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *net.sample_shape, generator=g, dtype=torch.float64)
    start = time.perf_counter()
    exact = solvers.solve_exact(net, latents * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN, rtol=1e-10, atol=1e-10)
    exact_seconds = time.perf_counter() - start
    print(f'exact solution: {exact_seconds:.1f} s; RMSE per pixel at NFE ' + ' '.join(f'{n:>9d}' for n in NFES))
    results = run_grid(net, latents, exact, names)
    comparison = (measure_3m_orders(net, seed), measure_3m_crossover(net, latents, exact)) if compare_3m else None
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    write_report(out, names, results, batch, seed, exact_seconds, torch.get_num_threads(), load, comparison)
    write_figures(out, names, results)
    print(f'wrote {out} and its figures')


if __name__ == '__main__':
    main()
