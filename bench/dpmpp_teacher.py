"""What the choice of DPM-Solver++(3M) variant changes in docs/learned.md: the classical dpmpp rows and the
distillation teacher (gmm_image's train section: dpmpp with M = 9), for both variants, on the same 1024 held-out
samples and exact solutions as bench/bench_learned.py. Prints markdown:

    python bench/dpmpp_teacher.py
"""
import os
import sys

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import solvers                                                      # noqa: E402
from bench_learned import SCHEDULES, classical_settings, held_out     # noqa: E402
from models.analytic import image_mixture                            # noqa: E402

VARIANTS = ('phi3', '2phi3')
# The student grids of gmm_image's train section: EPD's subsection and the section's own (AMED).
TEACHER_GRIDS = (('polynomial', 20.0, 'EPD grid (polynomial, rho 20)'), ('logsnr', 1.0, 'AMED grid (logsnr)'))


@click.command(context_settings=dict(show_default=True))
@click.option('--nfes', metavar='LIST', default='3,5,7,9', help='NFEs (as in docs/learned.md)')
@click.option('--num_eval', metavar='INT', type=int, default=1024, help='Held-out samples')
@click.option('--M', 'M', metavar='INT', type=int, default=9, help='Teacher steps per student step')
def main(nfes, num_eval, M):
    """Mean RMSE to the exact solution of dpmpp's two variants, as a classical solver and as the teacher."""
    torch.set_num_threads(1)
    nfes = [int(n) for n in nfes.split(',')]
    net = image_mixture().eval().requires_grad_(False)
    z, per_sample = held_out(net, num_eval)
    lines = [f'Mean RMSE per pixel to the exact solution, {num_eval} held-out samples (`python bench/dpmpp_teacher.py`).',
             '', '| dpmpp | variant | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|---|' + '---|' * len(nfes)]
    with torch.no_grad():
        for schedule, rho in SCHEDULES:
            for variant in VARIANTS:
                row = []
                for nfe in nfes:
                    steps, afs = classical_settings('dpmpp', nfe)
                    x = solvers.sample(net, z, 'dpmpp', steps, schedule, rho, afs=afs, variant=variant)
                    row.append(per_sample(x).mean().item())
                lines.append(f'| classical ({schedule}) | {variant} | ' + ' | '.join(f'{e:.4f}' for e in row) + ' |')
                print(lines[-1], flush=True)
        for schedule, rho, title in TEACHER_GRIDS:
            for variant in VARIANTS:
                row = []
                for nfe in nfes:
                    num_steps = (nfe + 1) // 2 + 1            # the learned solvers' grids (AFS), as bench_learned
                    # The teacher's grid, as training.distill.teacher_states builds it: (M + 1)(N - 1) + 1 points.
                    fine = solvers.get_schedule((M + 1) * (num_steps - 1) + 1, net.sigma_min, net.sigma_max,
                                                schedule, rho, net=net).to(torch.float64)
                    final = solvers.SOLVERS['dpmpp'].fn(net, z * fine[0], fine, max_order=3, variant=variant)
                    row.append(per_sample(final).mean().item())
                lines.append(f'| teacher M={M}, {title} | {variant} | ' + ' | '.join(f'{e:.5f}' for e in row) + ' |')
                print(lines[-1], flush=True)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
