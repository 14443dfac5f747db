"""The main job on the embedded default (the class-conditional analytic digit mixture), end to end on a fresh
machine:

1. train.py distils an EPD predictor (NFE 5) for the guided model with the config's training settings,
2. sample.py generates images with it; the demo arranges them as a grid with one row per class,
3. its error against the exact ODE solution of the guided model is printed next to every classical solver's at the
   same NFE, with the exact classifier's accuracy (does the image show the digit it was asked for?) and, without
   guidance, the pixel-space Frechet distance to the exact data distribution.

`--dataset=gmm_image` runs the same on the unconditional image mixture.
"""
import glob
import math
import os
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import torch
import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs        # noqa: E402
import fid            # noqa: E402
import solvers        # noqa: E402
import training       # noqa: E402
from models.loading import load_model      # noqa: E402
from sample import batch_inputs, image_path     # noqa: E402
from torch_utils.image_io import atomic_write  # noqa: E402
from torch_utils.run_options import file_digest  # noqa: E402


def cli(*args):
    print('$ python ' + ' '.join(args), flush=True)
    subprocess.run([sys.executable] + [os.path.join(ROOT, args[0])] + list(args[1:]), check=True, cwd=ROOT)


def classical_settings(name, nfe):
    """num_steps and afs giving exactly `nfe` evaluations for a classical solver."""
    if solvers.SOLVERS[name].evals_per_step == 2:
        afs = nfe % 2 == 1
        return (nfe + int(afs)) // 2 + 1, afs
    return nfe + 1, False


def class_grid(net, outdir, seeds, per_class=8):
    """<outdir>.classes.png: one row per class (its name's digit), the first `per_class` seeds drawn for it."""
    _, cond = batch_inputs(net, seeds, torch.float64, 'cpu', None, None)
    labels = cond.argmax(dim=1).tolist()
    rows = []
    for y in range(net.label_dim):
        mine = [s for s, label in zip(seeds, labels) if label == y][:per_class]
        tiles = [np.asarray(PIL.Image.open(image_path(outdir, s, True)).convert('RGB')) for s in mine]
        h, w, _ = tiles[0].shape
        tiles += [np.zeros((h, w, 3), np.uint8)] * (per_class - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    path = os.path.normpath(os.path.abspath(outdir)) + '.classes.png'
    atomic_write(path, lambda f: PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(f, format='PNG'))
    return path


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset', metavar='NAME', type=click.Choice(['gmm_digits', 'gmm_image']), default='gmm_digits', help='Embedded analytic model')
@click.option('--guidance_rate', metavar='FLOAT', type=float, default=2.0, help='Classifier-free guidance (gmm_digits; 1 = none)')
@click.option('--kimg', metavar='FLOAT', type=float, default=None, help='Training length [default: the config\'s]')
@click.option('--num_eval', metavar='INT', type=click.IntRange(min=1), default=512, help='Held-out samples for the error table')
@click.option('--num_fd', metavar='INT', type=click.IntRange(min=2), default=4000, help='Samples for the pixel Frechet distance (unguided)')
@click.option('--num_images', metavar='INT', type=click.IntRange(min=1), default=200, help='Images sampled with the predictor')
@click.option('--predictor', metavar='PATH|INT', default=None, help='Skip training and use this predictor')
@click.option('--samples', metavar='DIR', default='samples', help='Where the image folder goes (relative: to the repository)')
def main(dataset, guidance_rate, kimg, num_eval, num_fd, num_images, predictor, samples):
    conditional = dataset == 'gmm_digits'
    guided = conditional and guidance_rate != 1
    guidance = ['--guidance_type=cfg', f'--guidance_rate={guidance_rate:g}'] if guided else []
    if predictor is None:
        before = set(glob.glob(os.path.join(ROOT, 'exps', '0*')))
        # Every other training option comes from the config's train section.
        cli('train.py', f'--dataset_name={dataset}', '--sampler_stu=epd', '--num_steps=4', *guidance,
            *([f'--total_kimg={kimg}'] if kimg else []))
        predictor = sorted(set(glob.glob(os.path.join(ROOT, 'exps', '0*'))) - before)[-1]
    pred = training.load_predictor(predictor)
    if pred.settings['dataset_name'] != dataset:
        raise click.UsageError(f"--predictor={predictor} was trained for {pred.settings['dataset_name']}, not "
                               f"{dataset}; give --dataset={pred.settings['dataset_name']}")
    # one folder per predictor (its files' digest, as sample.py names its own folders): a folder only ever holds
    # the images of one setting, also for runs of the same name in other exps/ folders
    outdir = os.path.join(samples, f'demo-epd-{os.path.basename(os.path.normpath(str(predictor)))}-'
                          f'{file_digest(training.predictor_files(predictor))}')
    cli('sample.py', f'--predictor_path={predictor}', f'--seeds=0-{num_images - 1}', '--batch=100',
        f'--outdir={outdir}', '--grid=True')

    torch.set_num_threads(1)    # the small ops of the analytic model gain nothing from more (torch_utils/distributed)
    cfg = configs.load_config(dataset)
    net = load_model(cfg, None, 'cpu', pred.settings.get('guidance_type'), pred.settings.get('guidance_rate'))
    grid = class_grid(net, os.path.join(ROOT, outdir), list(range(num_images))) if conditional else None
    nfe = pred.nfe()
    g = torch.Generator().manual_seed(2**31 - 1)     # held out: not a training or sampling seed
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    labels = torch.arange(num_eval) % net.label_dim if conditional else None      # every class equally often
    cond = torch.nn.functional.one_hot(labels, net.label_dim).double() if conditional else None
    s_max, s_min = pred.settings['sigma_max'], pred.settings['sigma_min']
    parts = list(zip(z.split(64), cond.split(64) if conditional else [None] * len(z.split(64))))
    exact = torch.cat([solvers.solve_exact(net, zp * s_max, s_max, s_min, cp, rtol=1e-8, atol=1e-8)
                       for zp, cp in tqdm.tqdm(parts, desc='exact ODE solutions', unit='batch', file=sys.stdout)])

    # Mean per-sample RMSE. A few samples in a hundred end near another mixture mode than the exact solution (errors
    # ~0.3, 10-50x the typical); they dominate the mean, so it needs hundreds of samples to settle.
    def rmse(x):
        return ((x - exact).flatten(1).norm(dim=1) / math.sqrt(exact[0].numel())).mean().item()

    def accuracy(x):     # the exact classifier on the final images: the share that shows the digit asked for
        return (net.class_log_posterior(x).argmax(dim=1) == labels).double().mean().item() if conditional else None

    fd_ref = None
    if not guided:       # the guided ODE's output distribution has no closed form; the data's has
        zf = torch.randn(num_fd, *net.sample_shape, generator=g, dtype=torch.float64)
        cond_fd = torch.stack([net.sample_labels(g, 'cpu') for _ in range(num_fd)]).double() if conditional else None
        ref_mu, ref_sigma = fid.pixel_reference_stats(net)
        data_fd = fid.pixel_fd(net.sample_data(num_fd, g), ref_mu, ref_sigma)
        fd_ref = lambda run: fid.pixel_fd(run(zf, cond_fd), ref_mu, ref_sigma)      # noqa: E731
    rows = [('exact ODE solution', 'adaptive, 8th order', 0.0, accuracy(exact), None),
            ('EPD (learned)', f'{nfe} rounds, {pred.evaluations()} evals', rmse(pred.sample(net, z, cond)),
             accuracy(pred.sample(net, z, cond)), fd_ref and fd_ref(lambda x, c: pred.sample(net, x, c)))]
    for name in tqdm.tqdm(sorted(solvers.ode_solvers()), desc='classical solvers', unit='solver', file=sys.stdout):
        steps, afs = classical_settings(name, nfe)
        best = None
        for schedule, rho in (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2)):
            x = solvers.sample(net, z, name, steps, schedule, rho, afs=afs, cond=cond)
            if best is None or rmse(x) < best[0]:
                best = (rmse(x), schedule, rho, accuracy(x))
        fd = fd_ref and fd_ref(lambda x, c: solvers.sample(net, x, name, steps, best[1], best[2], afs=afs, cond=c))
        rows.append((f'{name} ({best[1]})', f'{nfe} NFE', best[0], best[3], fd))

    model = f'{dataset}' + (f' with classifier-free guidance {guidance_rate:g}' if guided else '')
    print(f'\n{model}: error against the exact ODE solution ({num_eval} held-out samples, RMSE per pixel)'
          + (', the exact classifier\'s accuracy on the final images (each class equally often)' if conditional
             else '')
          + (f', and pixel Frechet distance to the exact data distribution ({num_fd} samples; exact samples score '
             f'{data_fd:.2f})' if fd_ref else '') + ':')
    print(f"{'solver':28s} {'cost':24s} {'RMSE':>10s}" + (f" {'accuracy':>9s}" if conditional else '')
          + (f" {'pixel-FD':>10s}" if fd_ref else ''))
    for label, cost, err, acc, fd in rows:
        print(f'{label:28s} {cost:24s} {err:10.5f}' + (f' {acc:9.3f}' if conditional else '')
              + ((f' {fd:10.2f}' if fd is not None else f" {'':>10s}") if fd_ref else ''))
    best_classical = min(r[2] for r in rows[2:])
    print(f'\nEPD error / best classical error at NFE {nfe}: {rows[1][2] / best_classical:.2f}')
    print(f'Images: {outdir}/ (grid: {outdir}.grid.png' + (f'; one row per class: {os.path.relpath(grid)}' if grid
                                                              else '') + f'); predictor: {predictor}')


if __name__ == '__main__':
    main()
