"""Print a learned schedule as sample.py's --t_steps list:  python -m training.export_schedule N

N is a predictor folder, a file in it, or an experiment number in exps/ (--exps_dir): a learned schedule (LD3), or
an EPD/AMED predictor trained with --learn_schedule=True. The decoupled evaluation grid
(if the schedule has one) is printed to stderr: --t_steps carries the grid only, --predictor_path carries both.
"""
import sys

import click

import training
from training.ld3 import format_grid


@click.command()
@click.argument('path')
@click.option('--exps_dir', default=training.EXPS_DIR, help='Where experiment numbers are looked up')
def main(path, exps_dir):
    try:
        predictor = training.load_predictor(path, exps_dir)
        if predictor.kind != 'ld3' and not predictor.settings.get('learn_schedule'):
            raise ValueError(f"{path} is a {predictor.kind} predictor without a learned grid (trained without "
                             f"--learn_schedule); its grid is the {predictor.settings['schedule_type']} schedule")
    except ValueError as e:
        print(f'export_schedule: error: {e}', file=sys.stderr)
        sys.exit(1)
    if predictor.kind == 'ld3':
        sigmas, evals = predictor.grids()
    else:   # an EPD/AMED grid: --t_steps gives the grid, not the tables that go with it
        sigmas, evals = predictor.schedule(None).detach(), None
        print(f'note: {predictor.kind} was trained on this grid; --t_steps gives the grid to a classical solver, '
              '--predictor_path samples with the tables too', file=sys.stderr)
    print(format_grid(sigmas))
    if evals is not None and not bool((evals == sigmas).all()):
        print(f'note: this schedule also has a decoupled evaluation grid {format_grid(evals)}, which --t_steps does '
              'not carry; sample with --predictor_path to use it', file=sys.stderr)


if __name__ == '__main__':
    main()
