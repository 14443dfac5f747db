"""EPD and AMED that learn their own time grid (train.py --learn_schedule=True)."""
import json

import numpy as np
import pytest
import torch

import solvers
import training
from tests.conftest import run_cli
from tests.helpers_models import small_mixture
from tests.test_train import SMALL, epd_settings
from torch_utils.misc import randn_per_seed, seed_generators
from solvers.exact import solve_exact
from training.distill import distill_loss, teacher_grid, teacher_states
from training.predictors import AMEDPredictor, EPDPredictor


def settings(**kw):
    return epd_settings(**dict(dict(dataset_name='small', M=2, num_points=2, afs=True, scale_dir=0.1, scale_time=0.1,
                                    loss='rmse', sample_shape=[3, 8, 8]), **kw))


def test_a_learned_grid_starts_exactly_at_the_hand_made_one_and_samples_alike():
    net = small_mixture()
    plain = EPDPredictor(settings())
    learned = EPDPredictor(settings(learn_schedule=True))
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
        learned.load_state_dict(dict(plain.state_dict(), schedule_theta=learned.schedule_theta), strict=True)
    grid = plain.schedule(net)
    learned.start_grid(grid)
    assert torch.allclose(learned.schedule(net), grid, rtol=1e-12, atol=0)
    z = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(learned.sample(net, z), plain.sample(net, z), rtol=1e-9, atol=1e-9)
    assert learned.summary()['schedule_type'] == 'learned' and plain.summary()['schedule_type'] == 'polynomial'


@pytest.mark.parametrize('kind', ['epd', 'amed'])
def test_the_loss_reaches_the_grid_and_the_teacher_runs_on_it(kind):
    net = small_mixture()
    extra = dict(feature_dim=int(torch.tensor(net.sample_shape).prod())) if kind == 'amed' else {}
    cls = EPDPredictor if kind == 'epd' else AMEDPredictor
    predictor = cls(settings(sampler_stu=kind, learn_schedule=True, **extra), generator=torch.Generator())
    predictor.start_grid(solvers.get_schedule(4, 0.002, 80.0, 'polynomial', 7.0))
    if kind == 'amed':
        extra['feature_dim'] = net(torch.zeros(1, 3, 8, 8), torch.ones(1), return_bottleneck=True)[1][0].numel()
        predictor = cls(settings(sampler_stu=kind, learn_schedule=True, **extra), generator=torch.Generator())
        predictor.start_grid(solvers.get_schedule(4, 0.002, 80.0, 'polynomial', 7.0))
    z = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, _ = distill_loss(predictor, net, z, None, predictor.settings)
    loss.backward()
    g = predictor.schedule_theta.grad
    assert g is not None and torch.isfinite(g).all() and g[1:].abs().max() > 0
    # The teacher of a learned grid: its own hand-made fine grid with the student's points merged in.
    sigmas = predictor.schedule(net).detach()
    fine = solvers.get_schedule(3 * 3 + 1, 0.002, 80.0, 'polynomial', 7.0)
    grid, at = teacher_grid(sigmas, fine)
    assert torch.equal(grid[at], sigmas) and (grid.diff() < 0).all()
    x = z * 80.0
    want = solvers.SOLVERS['euler'].fn(net, x, grid, None, return_trajectory=True)[1][at]
    got = teacher_states(net, x, sigmas, None, 'euler', 2, 'polynomial', 7.0)
    assert torch.allclose(got, want, rtol=0, atol=0)


def test_the_teachers_grid_is_its_own_whatever_the_students_points():
    fine = solvers.get_schedule(10, 0.002, 80.0, 'polynomial', 7.0).double()
    # A student grid that is every third fine point leaves the fine grid as it is.
    grid, at = teacher_grid(fine[::3].clone(), fine)
    assert torch.equal(grid, fine) and at.tolist() == [0, 3, 6, 9]
    # Moved points join it; a fine point within a quarter of a gap of one gives way, so no step is tiny.
    logs = fine.log()
    near = torch.exp(logs[4] + 0.1 * (logs[3] - logs[4]))           # a tenth of the way from point 4 to point 3
    far = torch.exp(0.5 * (logs[6] + logs[7]))                      # half way between points 6 and 7
    student = torch.stack([fine[0], near, far, fine[-1]])
    grid, at = teacher_grid(student, fine)
    assert torch.equal(grid[at], student) and (grid.diff() < 0).all()
    assert len(grid) == len(fine) + 1 and not torch.isclose(grid, fine[4]).any()     # 4 gave way; 6 and 7 stay
    assert torch.isclose(grid, fine[6]).any() and torch.isclose(grid, fine[7]).any()
    steps = grid.log().diff().abs()
    assert steps.min() > 0.4 * (logs[:-1] - logs[1:]).min() and steps.max() < 1.25 * (logs[:-1] - logs[1:]).max()
    # The final state of an exact teacher would not depend on the student's grid; a good one depends on it little.
    net = small_mixture()
    x = 80.0 * torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = solve_exact(net, x, 80.0, 0.002, rtol=1e-9, atol=1e-9)
    rmse = lambda y: ((y - exact) ** 2).flatten(1).mean(1).sqrt().mean().item()
    on_hand_made = rmse(teacher_states(net, x, fine[::3], None, 'dpm', 2, 'polynomial', 7.0)[-1])
    moved = torch.tensor([80.0, 50.0, 2.5, 0.002], dtype=torch.float64)     # a learned grid that went far astray
    assert rmse(teacher_states(net, x, moved, None, 'dpm', 2, 'polynomial', 7.0)[-1]) < 1.5 * on_hand_made


@pytest.mark.slow
def test_train_learns_a_grid_that_sample_py_and_export_schedule_use(tmp_path):
    run_cli(['train.py', SMALL, '--sampler_stu=epd', '--sampler_tea=euler', '--M=2', '--num_steps=4', '--batch=8',
             '--total_kimg=0.08', '--loss=rmse', '--lr=0.05', '--learn_schedule=True', f'--outdir={tmp_path}'])
    folder = next(tmp_path.glob('00001-*-learned-afs'))
    predictor = training.load_predictor(str(folder))
    grid = predictor.schedule(None).detach()
    start = solvers.get_schedule(4, predictor.settings['sigma_min'], predictor.settings['sigma_max'], 'polynomial', 7)
    assert grid[0] == start[0] and grid[-1] == start[-1] and (grid.diff() < 0).all()
    assert (grid[1:-1] - start[1:-1]).abs().max() > 1e-6           # it moved
    proc = run_cli(['-m', 'training.export_schedule', str(folder)])
    printed = json.loads(proc.stdout.strip())
    assert torch.allclose(torch.tensor(printed, dtype=torch.float64), grid, rtol=1e-4)
    # sample.py samples with the learned grid: its images are the predictor's own on the seeds' noises.
    out = tmp_path / 'samples'
    run_cli(['sample.py', SMALL, f'--predictor_path={folder}', '--seeds=0-1', f'--outdir={out}', '--save_npz=True',
             '--dtype=float64'])
    z = randn_per_seed(seed_generators([0, 1], 'cpu'), (3, 8, 8), torch.float64, 'cpu')
    with torch.no_grad():
        want = predictor.sample(small_mixture(), z).numpy()
    got = np.stack([np.load(out / '000000' / f'00000{i}.npz')['x'] for i in (0, 1)])
    assert np.abs(got - want).max() < 1e-9
    proc = run_cli(['sample.py', SMALL, f'--predictor_path={folder}', '--schedule_type=logsnr', '--seeds=0-1',
                    f'--outdir={tmp_path / "no"}'], check=False)
    assert proc.returncode != 0 and 'schedule_type=learned' in proc.stderr


@pytest.mark.slow
def test_a_learned_grid_on_two_workers_equals_one(tmp_path):
    args = ['train.py', SMALL, '--sampler_stu=epd', '--sampler_tea=euler', '--M=1', '--num_steps=3', '--batch=4',
            '--total_kimg=0.016', '--loss=rmse', '--lr=0.05', '--learn_schedule=True', '--dtype=float64']
    run_cli(args + [f'--outdir={tmp_path / "one"}'])
    run_cli(args + [f'--outdir={tmp_path / "two"}'], nproc=2)
    a, b = (training.load_predictor(str(next((tmp_path / d).glob('00001-*')))) for d in ('one', 'two'))
    assert (a.schedule_theta - a.schedule_theta.new_ones(3)).abs().max() > 1e-6
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), (name, (p - q).abs().max().item())


@pytest.mark.slow
def test_lr_grid_is_the_rate_of_the_grid_alone(tmp_path):
    args = ['train.py', SMALL, '--sampler_stu=epd', '--sampler_tea=euler', '--M=1', '--num_steps=3', '--batch=4',
            '--total_kimg=0.016', '--loss=rmse', '--lr=0.05', '--coslr=True', '--learn_schedule=True',
            '--dtype=float64', '--lr_grid=0', f'--outdir={tmp_path}']
    run_cli(args)
    folder = next(tmp_path.glob('00001-*'))
    predictor = training.load_predictor(str(folder))
    s = predictor.settings
    start = solvers.get_schedule(3, s['sigma_min'], s['sigma_max'], s['schedule_type'], s['schedule_rho'])
    assert torch.allclose(predictor.schedule(None).detach(), start, rtol=1e-12, atol=0)   # rate 0: the grid stays
    fresh = EPDPredictor(predictor.settings, generator=torch.Generator().manual_seed(0))
    assert (predictor.r_params - fresh.r_params).abs().max() > 1e-6                         # the tables moved
    assert json.loads((folder / 'training_options.json').read_text())['lr_grid'] == 0
    proc = run_cli(args[:-4] + ['--lr_grid=0.01', f'--outdir={tmp_path / "no"}'], check=False)
    assert proc.returncode != 0 and '--learn_schedule=True' in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / 'no').exists() or not any((tmp_path / 'no').iterdir())
