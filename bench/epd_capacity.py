"""How well can EPD fit the exact solution at a given NFE? Full-batch Adam on a fixed pool of samples with exact
targets (no teacher error, no batch noise): an upper bound on what distillation can reach, next to the best
classical solver at the same NFE on the same held-out samples.

    python bench/epd_capacity.py --schedule=logsnr:1 --scale=0.3 --objective=norm --steps=200
"""
import math
import os
import sys

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import solvers                                   # noqa: E402
from models.analytic import image_mixture        # noqa: E402
from training.predictors import EPDPredictor     # noqa: E402


@click.command(context_settings=dict(show_default=True))
@click.option('--num_steps', metavar='INT', default=4, help='EPD time points (NFE = 2 (N - 1) - 1 with AFS)')
@click.option('--points', metavar='INT', default=2, help='Parallel points per step')
@click.option('--schedule', metavar='TYPE:RHO', default='logsnr:1', help='EPD time grid')
@click.option('--scale', metavar='FLOAT', type=float, default=0.3, help='scale_dir = scale_time')
@click.option('--objective', metavar='sq|norm', type=click.Choice(['sq', 'norm']), default='norm',
              help='Per-sample squared error or its square root (the metric) at the final point')
@click.option('--lr', metavar='FLOAT', type=float, default=0.05, help='Adam learning rate')
@click.option('--steps', metavar='INT', type=int, default=200, help='Full-batch Adam steps')
@click.option('--pool', metavar='INT', type=int, default=64, help='Training samples (and as many held out)')
def main(num_steps, points, schedule, scale, objective, lr, steps, pool):
    torch.manual_seed(0)
    net = image_mixture()
    kind, rho = schedule.split(':')
    g = torch.Generator().manual_seed(5)
    z_train = torch.randn(pool, *net.sample_shape, generator=g, dtype=torch.float64)
    z_test = torch.randn(pool, *net.sample_shape, generator=g, dtype=torch.float64)
    settings = dict(dataset_name='gmm_image', sampler_stu='epd', sampler_tea='exact', num_steps=num_steps, M=0,
                    num_points=points, afs=True, scale_dir=scale, scale_time=scale, fcn=False, loss='l2', alpha=0,
                    schedule_type=kind, schedule_rho=float(rho), sigma_min=net.sigma_min, sigma_max=net.sigma_max,
                    max_order=None, sample_shape=list(net.sample_shape))
    pred = EPDPredictor(settings)
    sigmas = pred.schedule(net)
    target = solvers.solve_exact(net, z_train * sigmas[0], sigmas[0], sigmas[-1], rtol=1e-8, atol=1e-8)
    exact_test = solvers.solve_exact(net, z_test * sigmas[0], sigmas[0], sigmas[-1], rtol=1e-8, atol=1e-8)
    rmse = lambda x, ref: ((x - ref).flatten(1).norm(dim=1) / math.sqrt(ref[0].numel())).mean().item()
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    for step in range(steps + 1):
        x = pred.sample(net, z_train)
        per_sample = ((x - target) ** 2).flatten(1).sum(1)
        loss = (per_sample.sqrt() if objective == 'norm' else per_sample).mean()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                print(f'step {step:4d}  train RMSE {rmse(x, target):.4f}  held-out RMSE '
                      f'{rmse(pred.sample(net, z_test), exact_test):.4f}', flush=True)
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    nfe = pred.nfe()
    best = None
    for name, info in ((n, solvers.SOLVERS[n]) for n in solvers.ode_solvers()):
        afs = info.evals_per_step == 2 and nfe % 2 == 1
        n = (nfe + int(afs)) // 2 + 1 if info.evals_per_step == 2 else nfe + 1
        for sched, r in (('polynomial', 7), ('logsnr', 1), ('time_uniform', 2)):
            err = rmse(solvers.sample(net, z_test, name, n, sched, r, afs=afs), exact_test)
            if best is None or err < best[0]:
                best = (err, name, sched)
    print(f'best classical at NFE {nfe}: {best[1]} ({best[2]}) {best[0]:.4f}')


if __name__ == '__main__':
    main()
