"""train.py and the learned solvers: counted calls, distributed = single process, resume after a kill, and
sampling with the trained predictor."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

import solvers
import training
from tests.conftest import PYTHON, ROOT, run_cli
from training.predictors import AMEDPredictor, EPDPredictor

SMALL = '--model_path=python:tests.helpers_models:small_mixture'


def epd_settings(**kw):
    s = dict(dataset_name='gmm_image', sampler_stu='epd', sampler_tea='euler', num_steps=4, M=1, num_points=3,
             afs=False, scale_dir=0.05, scale_time=0.05, fcn=False, loss='l2', alpha=10, schedule_type='polynomial',
             schedule_rho=7, sigma_min=0.002, sigma_max=80.0, max_order=3, sample_shape=[3, 32, 32])
    s.update(kw)
    return s


@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('K', [1, 2, 4])
@pytest.mark.parametrize('student', ['epd', 'ipndm'])
def test_epd_counted_calls(gmm_image, afs, K, student):
    pred = EPDPredictor(epd_settings(afs=afs, num_points=K, sampler_stu=student))
    with solvers.count_calls(gmm_image) as counter:
        x = pred.sample(gmm_image, torch.randn(3, 3, 32, 32))
    assert torch.isfinite(x).all()
    assert counter.calls == 2 * 3 - afs == pred.nfe()                   # sequential rounds
    assert counter.nfe(3) == 3 * (1 + K) - afs == pred.evaluations()    # every parallel point counts


@pytest.mark.parametrize('base', ['amed', 'euler', 'dpm', 'ipndm', 'dpmpp'])
def test_amed_counted_calls_and_feature(gmm_image, base):
    pred = AMEDPredictor(epd_settings(sampler_stu=base, afs=True, feature_dim=64))
    with solvers.count_calls(gmm_image) as counter:
        x = pred.sample(gmm_image, torch.randn(2, 3, 32, 32))
    assert torch.isfinite(x).all() and counter.calls == 5


def test_epd_reduces_to_dpm2_and_conditions_repeat(gmm_image):
    # K = 1, r = 1/2, no scales: EPD's step is exactly DPM-Solver-2's midpoint step.
    pred = EPDPredictor(epd_settings(num_points=1, scale_dir=0, scale_time=0))
    with torch.no_grad():
        pred.r_params.zero_()
    z = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = solvers.sample(gmm_image, z, 'dpm', 4)
    assert torch.allclose(pred.sample(gmm_image, z), ref, atol=1e-10)

    class LabelCheck(torch.nn.Module):      # the K probes of each sample must see that sample's label
        sample_shape, sigma_min, sigma_max, label_dim = (3, 32, 32), 0.002, 80.0, 3

        def forward(self, x, sigma, cond=None, return_bottleneck=False):
            assert cond is not None and cond.shape[0] == x.shape[0]
            return x * 0 + cond.argmax(1).reshape(-1, 1, 1, 1).to(x)
    cond = torch.eye(3)[[0, 2]]
    x = EPDPredictor(epd_settings(num_points=3)).sample(LabelCheck(), z.float(), cond=cond)
    assert torch.isfinite(x).all()


def train_args(outdir, *extra):
    return ['train.py', SMALL, '--sampler_stu=epd', '--sampler_tea=euler', '--num_steps=3', '--M=1', '--batch=4',
            '--total_kimg=0.02', '--loss=l2', '--lr=0.05', f'--outdir={outdir}', '--dtype=float64', *extra]


@pytest.mark.slow
def test_two_workers_train_the_same_predictor(tmp_path):
    run_cli(train_args(tmp_path / 'one'))
    run_cli(train_args(tmp_path / 'two'), nproc=2)
    run_cli(train_args(tmp_path / 'acc', '--batch-gpu=1'))
    weights = [load_file(next((tmp_path / d).glob('00001-*/predictor.safetensors'))) for d in ('one', 'two', 'acc')]
    for other in weights[1:]:
        for k in weights[0]:
            assert torch.allclose(weights[0][k], other[k], rtol=1e-9, atol=1e-12), k
    first = json.loads(next((tmp_path / 'one').glob('00001-*/stats.jsonl')).read_text().splitlines()[-1])
    assert first['iteration'] == 5


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    args = train_args(tmp_path / 'full', '--total_kimg=0.06', '--snap=1')
    run_cli(args)
    killed = train_args(tmp_path / 'killed', '--total_kimg=0.06', '--snap=1')
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.Popen([PYTHON] + killed, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    stats = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / 'killed').glob('00001-*/stats.jsonl'))
        if found and len(found[0].read_text().splitlines()) >= 4:
            stats = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stats is not None, 'the run ended before it could be killed'
    run_cli(train_args(tmp_path / 'killed', '--total_kimg=0.06', '--snap=1', '--resume=1'))
    a = load_file(next((tmp_path / 'full').glob('00001-*/predictor.safetensors')))
    b = load_file(next((tmp_path / 'killed').glob('00001-*/predictor.safetensors')))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize('student,extra', [('epd', []), ('ipndm', ['--max_order=3']), ('amed', []),
                                           ('euler', []), ('dpm', []), ('dpmpp', []), ('ipndm', ['--plugin=amed'])])
def test_train_then_sample(tmp_path, student, extra):
    exps = tmp_path / 'exps'
    args = train_args(exps, *extra)
    args[2] = f'--sampler_stu={student}'
    run_cli(args)
    folder = next(exps.glob('00001-*'))
    meta = json.loads((folder / 'predictor.json').read_text())
    assert meta['sampler_stu'] == student
    for f in ('training_options.json', 'log.txt', 'stats.jsonl', 'predictor.safetensors'):
        assert (folder / f).is_file()
    out = tmp_path / 'samples'
    result = run_cli(['sample.py', SMALL, '--predictor_path=1', '--seeds=0-3', f'--outdir={out}'], cwd=tmp_path)
    assert 'NFE per image: ' in result.stdout and (out / '000000' / '000003.png').is_file()
    pred = training.load_predictor(folder)
    assert pred.settings['num_steps'] == 3


def test_predictor_refuses_other_dataset(tmp_path):
    pred = EPDPredictor(epd_settings(sample_shape=[3, 8, 8]))
    training.save_predictor(pred, tmp_path / 'p')
    result = run_cli(['sample.py', '--dataset_name=gmm_2d', f'--predictor_path={tmp_path / "p"}',
                      f'--outdir={tmp_path / "o"}'], check=False)
    assert result.returncode != 0 and 'trained for dataset' in result.stderr
    result = run_cli(['sample.py', f'--predictor_path={tmp_path / "p"}', f'--outdir={tmp_path / "o"}'], check=False)
    assert result.returncode != 0 and 'samples of shape (3, 8, 8)' in result.stderr


def test_inception_loss_without_detector_is_a_clear_error(tmp_path):
    args = train_args(tmp_path)
    args[args.index('--loss=l2')] = '--loss=inception'
    result = run_cli(args, check=False, env={'FID_INCEPTION_PATH': str(tmp_path / 'none.pkl')})
    assert result.returncode != 0 and '--loss=l2' in result.stderr and 'Traceback' not in result.stderr


def test_predictor_files_hold_no_code(tmp_path):
    pred = EPDPredictor(epd_settings())
    training.save_predictor(pred, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['predictor.json', 'predictor.safetensors']
    loaded = training.load_predictor(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(pred.state_dict().values(), loaded.state_dict().values()))


def test_amed_dpmpp_plugin_without_learning_is_dpmpp_on_the_interleaved_grid(gmm_image):
    # r = 1/2, c = a = 1 for every step: the plugin is plain DPM-Solver++ on the grid with the geometric midpoints.
    z = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sigmas = solvers.get_schedule(4, 0.002, 80.0)
    half = lambda feature, t_cur, t_next: tuple(torch.full((feature.shape[0],), v, dtype=torch.float64)
                                                for v in (0.5, 1.0, 1.0))
    from solvers.learned import amed
    out = amed(gmm_image, z * 80, sigmas, params=half, base='dpmpp', max_order=3)
    fine = torch.stack([sigmas[:-1], (sigmas[:-1] * sigmas[1:]).sqrt()], 1).reshape(-1)
    fine = torch.cat([fine, sigmas[-1:]])
    ref = solvers.SOLVERS['dpmpp'].fn(gmm_image, z * 80, fine, max_order=3)
    assert torch.allclose(out, ref, atol=1e-10)


def test_training_options_come_from_the_config_then_the_command_line(tmp_path):
    from train import TRAIN_DEFAULTS, UsageError, resolve_options
    cfg = dict(dataset_name='x', sample={'dtype': 'float64'}, train={'lr': 0.3, 'loss': 'rmse', 'M': 9})
    opts = resolve_options(cfg, dict(lr=None, M=2, batch=None))
    assert (opts['lr'], opts['loss'], opts['M'], opts['batch'], opts['dtype']) == (0.3, 'rmse', 2,
                                                                                   TRAIN_DEFAULTS['batch'], 'float64')
    with pytest.raises(UsageError, match='unknown key.*lrate'):
        resolve_options(dict(cfg, train={'lrate': 1}), {})
    with pytest.raises(UsageError, match='unknown key.*rate'):
        resolve_options(dict(cfg, train={'amed': {'rate': 1}}), {})
    # The predictor's own subsection: AMED's network (AMED-Solver, the AMED plugins) vs EPD's tables.
    per_kind = dict(cfg, train=dict(cfg['train'], amed={'lr': 0.02}))
    assert resolve_options(per_kind, dict(sampler_stu='dpm'))['lr'] == 0.02
    assert resolve_options(per_kind, dict(sampler_stu='ipndm'), plugin='amed')['lr'] == 0.02
    assert resolve_options(per_kind, dict(sampler_stu='ipndm'))['lr'] == 0.3
    assert resolve_options(per_kind, dict(sampler_stu='amed', lr=0.5))['lr'] == 0.5
    # The dry run shows what a user gets from the embedded default's config: EPD's subsection sets its
    # own grid and scale ranges, AMED keeps the section's and takes its own learning rate.
    def dry_run(*args):
        shown = json.loads(run_cli(['train.py', '-n', '--M=4', f'--outdir={tmp_path}', *args]).stdout)
        s = shown['settings']
        return s['M'], s['loss'], s['schedule_type'], s['schedule_rho'], s['scale_dir'], shown['lr']
    assert dry_run() == (4, 'rmse', 'polynomial', 20, 0.5, 0.1)
    assert dry_run('--sampler_stu=amed') == (4, 'rmse', 'logsnr', 1, 0.3, 0.01)
    assert dry_run('--schedule_rho=7')[3] == 7


def test_rmse_objective_is_the_final_error_to_the_exact_solution(gmm_image):
    from training.distill import distill_loss
    pred = EPDPredictor(epd_settings(sampler_tea='exact', loss='rmse', num_points=2, afs=True))
    with torch.no_grad():
        pred.r_params.add_(0.3)                          # away from the symmetric start
    z = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, _ = distill_loss(pred, gmm_image, z, None, pred.settings)
    exact = solvers.solve_exact(gmm_image, z * 80.0, 80.0, 0.002, rtol=1e-9, atol=1e-9)
    rmse = ((pred.sample(gmm_image, z) - exact).flatten(1).norm(dim=1) / (3 * 32 * 32) ** 0.5).mean()
    assert abs(loss.item() - rmse.item()) < 1e-5 * rmse.item()
