"""GITS (solvers/gits.py, training/gits.py): the dynamic programming against brute force, the cost table against
its definition, the grid on the analytic model, the cache, and sample.py --schedule_type=gits."""
import itertools
import json
import math
import os

import pytest
import torch

import solvers
from solvers import gits as core
from training import gits
from tests.conftest import run_cli

SMALL = dict(num_steps_tea=13, num_warmup=6)


def brute_force(cost, num_steps, coeff):
    T = cost.shape[0]
    best = (math.inf, None)
    for inner in itertools.combinations(range(1, T - 1), num_steps - 2):
        path = [0, *inner, T - 1]
        value = sum(coeff ** k * float(cost[a, b]) for k, (a, b) in enumerate(zip(path, path[1:])))
        if value < best[0]:
            best = (value, path)
    return best


def path_value(cost, path, coeff):
    return sum(coeff ** k * float(cost[a, b]) for k, (a, b) in enumerate(zip(path, path[1:])))


@pytest.mark.parametrize('coeff', [1.0, 1.15, 0.8])
def test_dp_finds_the_optimal_path_of_brute_force(coeff):
    gen = torch.Generator().manual_seed(3)
    for T in (5, 8):
        # signed costs as the dev metric gives, with a bias to make long jumps dearer
        cost = torch.randn(T, T, generator=gen, dtype=torch.float64) + 0.3 * (
            torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs()
        cost = core.cost_table(cost, torch.zeros(T, dtype=torch.float64), 1)
        for num_steps in range(2, T + 1):
            value, path = brute_force(cost, num_steps, coeff)
            found = core.dp_search(cost, num_steps, coeff)
            assert len(found) == num_steps and found[0] == 0 and found[-1] == T - 1
            assert all(b > a for a, b in zip(found, found[1:]))
            assert path_value(cost, found, coeff) == pytest.approx(value, rel=1e-12, abs=1e-12)
            assert found == path


def test_dp_refuses_more_points_than_the_fine_grid():
    cost = core.cost_table(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match='fine grid of 4'):
        core.dp_search(cost, 6)


def test_cost_table_matches_its_definition(gmm_image):
    """With an Euler teacher the jump to the next fine point is the teacher's own step (cost 0 for l2 and dev);
    a longer jump's l2 cost is the mean norm of one Euler step from the teacher's state, computed here directly."""
    z = torch.randn(3, *gmm_image.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = solvers.get_schedule(9, gmm_image.sigma_min, gmm_image.sigma_max, 'polynomial', 7.0)
    states, slopes = core.teacher_trajectory(gmm_image, z * 80, sigmas, 'euler')
    assert torch.allclose(states[-1], solvers.sample(gmm_image, z, 'euler', sigmas=sigmas), rtol=0, atol=1e-12)
    for metric in ('l2', 'dev'):
        sums, dev = core.cost_sums(states, slopes, sigmas, metric)
        cost = core.cost_table(sums, dev, 3)
        diag = torch.stack([cost[i, i + 1] for i in range(8)])
        assert diag.abs().max() < 1e-9 * (1 + float(cost[torch.isfinite(cost)].abs().max()))
        assert torch.isinf(cost[3, 2]) and torch.isinf(cost[4, 4])
    sums, dev = core.cost_sums(states, slopes, sigmas, 'l2')
    x = states[2]
    d = (x - gmm_image(x, sigmas[2])) / sigmas[2]
    direct = (x + (sigmas[6] - sigmas[2]) * d - states[6]).flatten(1).norm(dim=1).mean()
    assert float(sums[2, 6]) / 3 == pytest.approx(float(direct), rel=1e-10)
    dev_end = core.deviation(states[-1], states[0], states[-1])
    assert float(dev_end.abs().max()) == 0


def test_gits_grid_on_the_analytic_model_is_decreasing_with_pinned_ends(gmm_image, tmp_path):
    opts = gits.resolve(dict(SMALL, cache_dir=str(tmp_path)))
    for num_steps in (4, 6, 9):
        grid, path = gits.gits_grid(gmm_image, num_steps, opts, 'gmm_image', log=lambda *_: None)
        assert len(grid) == num_steps and path[0] == 0 and path[-1] == SMALL['num_steps_tea'] - 1
        assert grid[0] == gmm_image.sigma_max and grid[-1] == gmm_image.sigma_min
        assert bool((grid[1:] < grid[:-1]).all())
        fine = gits.fine_grid(gmm_image, opts)
        assert torch.equal(grid, fine[path])


def test_cost_table_is_cached_by_setting_and_reused(gmm_image, tmp_path, monkeypatch):
    opts = gits.resolve(dict(SMALL, cache_dir=str(tmp_path)))
    messages = []
    first, _ = gits.cached_table(gmm_image, opts, 'gmm_image', log=messages.append)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith('.safetensors') and 'saved' in messages[-1]

    def no_compute(*_, **__):
        raise AssertionError('the cached table should have been read')
    monkeypatch.setattr(gits, 'compute_table', no_compute)
    again, _ = gits.cached_table(gmm_image, opts, 'gmm_image', log=messages.append)
    assert torch.equal(first, again) and 'reused' in messages[-1]
    # coeff and the number of steps do not change the table; the metric does (a new file)
    gits.gits_grid(gmm_image, 5, dict(opts, coeff=1.3), 'gmm_image', log=messages.append)
    monkeypatch.undo()
    gits.cached_table(gmm_image, dict(opts, metric='l2'), 'gmm_image', log=messages.append)
    assert len(os.listdir(tmp_path)) == 2


def test_sample_py_schedule_type_gits(tmp_path):
    out = tmp_path / 'imgs'
    args = ['sample.py', '--sampler_stu=unipc', '--num_steps=5', '--schedule_type=gits', '--num_warmup=6',
            '--num_steps_tea=13', '--seeds=0-1', f'--outdir={out}']
    proc = run_cli(args, cwd=str(tmp_path))
    assert 'saved as' in proc.stdout and 'NFE per image: 4' in proc.stdout
    with open(out / 'sample_options.json') as f:
        settings = json.load(f)['settings']
    assert settings['schedule_type'] == 'gits' and len(settings['t_steps']) == 5
    assert settings['t_steps'][0] == 80.0 and settings['t_steps'][-1] == 0.002
    assert 'reused' in run_cli(args, cwd=str(tmp_path)).stdout
    bad = run_cli(['sample.py', '--metric=l2', '--seeds=0'], cwd=str(tmp_path), check=False)
    assert bad.returncode != 0 and '--schedule_type=gits' in bad.stdout + bad.stderr
