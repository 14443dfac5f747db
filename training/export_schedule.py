"""Print a learned schedule as sample.py's --t_steps list:  python -m training.export_schedule N

N is a predictor folder, a file in it, or an experiment number in exps/ (--exps_dir). The decoupled evaluation grid
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
        if predictor.kind != 'ld3':
            raise ValueError(f"{path} is a {predictor.kind} predictor, not a learned schedule (ld3); its grid is the "
                             f"{predictor.settings['schedule_type']} schedule")
    except ValueError as e:
        print(f'export_schedule: error: {e}', file=sys.stderr)
        sys.exit(1)
    sigmas, evals = predictor.grids()
    print(format_grid(sigmas))
    if evals is not None and not bool((evals == sigmas).all()):
        print(f'note: this schedule also has a decoupled evaluation grid {format_grid(evals)}, which --t_steps does '
              'not carry; sample with --predictor_path to use it', file=sys.stderr)


if __name__ == '__main__':
    main()
