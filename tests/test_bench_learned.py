"""bench/epd_seeds.py's code path on a few held-out samples and two-iteration trainings."""
import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_epd_seeds_bench_trains_each_seed_and_reports_it(tmp_path):
    out = tmp_path / 'seeds.md'
    args = ['bench/epd_seeds.py', '--nfe=3', '--seeds=0,1', '--variant=short=--total_kimg=0.064 --batch=32',
            '--num_eval=4', f'--exps={tmp_path / "exps"}', f'--out={out}']
    run_cli(args)
    rows = [line.split(' | ') for line in out.read_text().splitlines() if line.startswith('| short')]
    assert [r[1] for r in rows] == ['0', '1']
    # Different seeds draw different batches, so they train different predictors.
    options = [json.loads(p.read_text()) for p in sorted((tmp_path / 'exps').glob('*/*/*/training_options.json'))]
    assert [o['seed'] for o in options] == [0, 1]
    assert rows[0][2] != rows[1][2]
    # A rerun reuses the trained predictors, reports the same figures and keeps the notes written by hand below
    # the marker.
    from bench.bench_learned import NOTES_MARKER
    notes = f'{NOTES_MARKER}\n\n## What these mean\n\nseed 1 is worse.\n'
    first = out.read_text()
    out.write_text(first + '\n' + notes)
    run_cli(args)
    assert out.read_text() == first + '\n' + notes
    assert len(list((tmp_path / 'exps').glob('*/*/*/predictor.json'))) == 2
    assert not list(tmp_path.glob('*.tmp'))
