"""Figures: the loss curve train.py writes from stats.jsonl, and the figure helpers the benchmarks use."""
import json

import PIL.Image
import pytest

from tests.conftest import run_cli
from torch_utils.plots import loss_curve, read_stats


def write_stats(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_read_stats_keeps_the_last_record_of_each_iteration(tmp_path):
    # A resumed run writes the iterations after its last snapshot again; the later records win, in order.
    stats = tmp_path / 'stats.jsonl'
    write_stats(stats, [dict(iteration=i, kimg=i / 10, loss=1.0 / i, step_losses=[0.5 / i, 0.5 / i])
                        for i in (1, 2, 3)] + [dict(iteration=3, kimg=0.3, loss=7.0, step_losses=[3.5, 3.5]),
                                              dict(iteration=4, kimg=0.4, loss=0.2, step_losses=[0.1, 0.1])])
    records = read_stats(stats)
    assert [r['iteration'] for r in records] == [1, 2, 3, 4] and records[2]['loss'] == 7.0
    loss_curve(stats, tmp_path / 'loss.png', title='run')
    image = PIL.Image.open(tmp_path / 'loss.png')
    assert image.format == 'PNG' and image.size[0] > 300
    assert not list(tmp_path.glob('.*.tmp'))          # written under a temporary name, then renamed


def test_empty_stats_is_one_clear_error(tmp_path):
    (tmp_path / 'stats.jsonl').write_text('')
    with pytest.raises(ValueError, match='no training records'):
        loss_curve(tmp_path / 'stats.jsonl', tmp_path / 'loss.png')
    assert not (tmp_path / 'loss.png').exists()


def test_train_writes_a_loss_curve(tmp_path):
    run_cli(['train.py', '--model_path=python:tests.helpers_models:small_mixture', '--sampler_stu=epd',
             '--sampler_tea=euler', '--num_steps=3', '--M=1', '--batch=4', '--total_kimg=0.02', '--loss=l2',
             f'--outdir={tmp_path}', '--dtype=float64'])
    folder = next(tmp_path.glob('00001-*'))
    assert PIL.Image.open(folder / 'loss.png').format == 'PNG'
    assert 'loss curve in loss.png' in (folder / 'log.txt').read_text()
