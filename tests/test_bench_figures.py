"""The benchmark figures: read back from the pages' tables, drawn, and shown by a figures section that a rerun
replaces rather than repeats."""
import shutil

import PIL.Image
import pytest

from bench import figures
from tests.conftest import ROOT, run_cli

PAGE = '''# Title

intro

## first table

| solver | NFE 3 | NFE 5 |
| --- | ---: | ---: |
| euler | 1.00e-01 | **5.00e-02** |
| heun | nan | 2.0 |

## Notes

text
'''


def test_read_tables_and_the_figures_section(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text(PAGE)
    headers, rows = figures.read_tables(page)['first table']
    assert figures.nfe_columns(headers) == [3, 5]
    assert rows['euler'] == [0.1, 0.05] and rows['heun'][1] == 2.0 and rows['heun'][0] != rows['heun'][0]
    once = figures.replace_figures_section(PAGE, ['## Figures', '', 'A', ''], before_heading='## first')
    assert once.index('## Figures') < once.index('## first table')
    twice = figures.replace_figures_section(once, ['## Figures', '', 'B', ''], before_heading='## first')
    assert twice.count('## Figures') == 1 and 'B' in twice and '\nA\n' not in twice
    assert twice.replace('B', 'A') == once


def test_solver_figures_from_the_page(tmp_path):
    page = tmp_path / 'solvers.md'
    shutil.copy(f'{ROOT}/docs/solvers.md', page)
    before = page.read_text()
    run_cli(['bench/bench_solvers.py', '--figures_only=True', f'--out={page}'])
    for name in ('solvers_error_vs_nfe.png', 'solvers_trajectories_2d.png'):
        assert PIL.Image.open(tmp_path / 'figures' / name).format == 'PNG'
        assert f'](figures/{name})' in page.read_text()
    after = page.read_text()
    # The tables are untouched; a rerun replaces the figures section instead of adding another.
    assert [line for line in after.splitlines() if line.startswith('| ')] == \
        [line for line in before.splitlines() if line.startswith('| ')]
    run_cli(['bench/bench_solvers.py', '--figures_only=True', f'--out={page}'])
    assert page.read_text() == after and after.count('## Figures') == 1


@pytest.mark.slow
def test_learned_figures_from_the_page(tmp_path):
    page = tmp_path / 'learned.md'
    shutil.copy(f'{ROOT}/docs/learned.md', page)
    before = page.read_text()
    run_cli(['bench/bench_learned.py', '--figures_only=True', '--nfes=3', '--kimg=0.064', f'--exps={tmp_path / "exps"}',
             f'--out={page}'])
    for name in ('learned_vs_classical.png', 'learned_epd_tables.png'):
        assert PIL.Image.open(tmp_path / 'figures' / name).format == 'PNG'
    after = page.read_text()
    assert after.index('## Figures') < after.index('## Best classical')
    marker = '<!-- Written by hand'
    assert after[after.index(marker):] == before[before.index(marker):]      # the notes written by hand stay
    assert len(list((tmp_path / 'exps').glob('epd-nfe3/*/predictor.json'))) == 1
