"""The main job on the embedded default (the analytic image mixture), end to end on a fresh machine:

1. train.py distils an EPD predictor (NFE 5) with the config's training settings,
2. sample.py generates images with it (and writes a grid),
3. its error against the exact ODE solution is printed next to every classical solver's at the same NFE, with the
   pixel-space Frechet distance to the exact data distribution.
"""
import glob
import math
import os
import subprocess
import sys

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fid            # noqa: E402
import solvers        # noqa: E402
import training       # noqa: E402
from models.analytic import image_mixture   # noqa: E402


def cli(*args):
    print('$ python ' + ' '.join(args), flush=True)
    subprocess.run([sys.executable] + [os.path.join(ROOT, args[0])] + list(args[1:]), check=True, cwd=ROOT)


def classical_settings(name, nfe):
    """num_steps and afs giving exactly `nfe` evaluations for a classical solver."""
    if solvers.SOLVERS[name].evals_per_step == 2:
        afs = nfe % 2 == 1
        return (nfe + int(afs)) // 2 + 1, afs
    return nfe + 1, False


@click.command(context_settings=dict(show_default=True))
@click.option('--kimg', metavar='FLOAT', type=float, default=None, help='Training length [default: the config\'s]')
@click.option('--num_eval', metavar='INT', type=int, default=512, help='Held-out samples for the error table')
@click.option('--num_fd', metavar='INT', type=int, default=4000, help='Samples for the pixel Frechet distance')
@click.option('--predictor', metavar='PATH|INT', default=None, help='Skip training and use this predictor')
def main(kimg, num_eval, num_fd, predictor):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if predictor is None:
        before = set(glob.glob(os.path.join(ROOT, 'exps', '0*')))
        # Every other training option comes from the gmm_image config's train section.
        cli('train.py', '--dataset_name=gmm_image', '--sampler_stu=epd', '--num_steps=4',
            *([f'--total_kimg={kimg}'] if kimg else []))
        predictor = sorted(set(glob.glob(os.path.join(ROOT, 'exps', '0*'))) - before)[-1]
    pred = training.load_predictor(predictor)
    # one folder per predictor: a folder only ever holds the images of one setting
    outdir = os.path.join('samples', f'demo-epd-{os.path.basename(os.path.normpath(predictor))}')
    cli('sample.py', f'--predictor_path={predictor}', '--seeds=0-63', '--batch=64', f'--outdir={outdir}',
        '--grid=True')

    net = image_mixture()
    nfe = pred.nfe()
    g = torch.Generator().manual_seed(2**31 - 1)     # held out: not a training or sampling seed
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    s_max, s_min = pred.settings['sigma_max'], pred.settings['sigma_min']
    exact = torch.cat([solvers.solve_exact(net, part * s_max, s_max, s_min, rtol=1e-8, atol=1e-8)
                       for part in z.split(256)])
    # Mean per-sample RMSE. A few samples in a hundred end near another mixture mode than the exact solution (errors
    # ~0.3, 10-50x the typical); they dominate the mean, so it needs hundreds of samples to settle.
    rmse = lambda x: ((x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())).mean().item()
    zf = torch.randn(num_fd, *net.sample_shape, generator=g, dtype=torch.float64)
    ref_mu, ref_sigma = fid.pixel_reference_stats(net)
    data_fd = fid.pixel_fd(net.sample_data(num_fd, g), ref_mu, ref_sigma)
    rows = [('EPD (learned)', f'{nfe} rounds, {pred.evaluations()} evals', rmse(pred.sample(net, z)),
             fid.pixel_fd(pred.sample(net, zf), ref_mu, ref_sigma))]
    for name in sorted(solvers.ode_solvers()):
        steps, afs = classical_settings(name, nfe)
        best = None
        for schedule, rho in (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2)):
            err = rmse(solvers.sample(net, z, name, steps, schedule, rho, afs=afs))
            if best is None or err < best[0]:
                best = (err, schedule)
        fd = fid.pixel_fd(solvers.sample(net, zf, name, steps, best[1], 7 if best[1] == 'polynomial' else 2,
                                         afs=afs), ref_mu, ref_sigma)
        rows.append((f'{name} ({best[1]})', f'{nfe} NFE', best[0], fd))
    print(f'\nError against the exact ODE solution ({num_eval} held-out samples, RMSE per pixel), and pixel '
          f'Frechet distance to the exact data distribution ({num_fd} samples; exact samples score {data_fd:.2f}):')
    print(f"{'solver':28s} {'cost':24s} {'RMSE':>10s} {'pixel-FD':>10s}")
    for label, cost, err, fd in rows:
        print(f'{label:28s} {cost:24s} {err:10.5f} {fd:10.2f}')
    best_classical = min(r[2] for r in rows[1:])
    print(f'\nEPD error / best classical error at NFE {nfe}: {rows[0][2] / best_classical:.2f}')
    print(f'Images: {outdir}/ (grid: {outdir}.grid.png); predictor: {predictor}')


if __name__ == '__main__':
    main()
