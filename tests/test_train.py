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
    iterations = [r['iteration'] for r in _stats(next((tmp_path / 'killed').glob('00001-*')))]
    assert iterations == list(range(1, 16))        # no iteration twice, none missing
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


def test_inception_path_that_is_not_a_detector_is_one_line(tmp_path):
    (tmp_path / 'not-inception.pkl').write_bytes(b'garbage')
    args = train_args(tmp_path)
    args[args.index('--loss=l2')] = '--loss=inception'
    result = run_cli(args + [f'--inception_path={tmp_path / "not-inception.pkl"}'], check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
    assert last.startswith('train.py: error: --inception_path=') and '--loss=rmse' in last, last


def test_default_loss_runs_offline_on_analytic_models():
    """Without --loss or a config loss, analytic models (and samples that are not RGB images) train on the final
    RMSE, which needs no detector weights; RGB image models keep the seeds' Inception-feature loss."""
    import configs
    import train
    from models.analytic import image_mixture, planar_mixture
    gmm_2d, cifar10 = configs.load_config('gmm_2d'), configs.load_config('cifar10')
    assert 'loss' not in gmm_2d['train'] and 'loss' not in cifar10['train']
    assert train.default_loss(gmm_2d, planar_mixture()) == 'rmse'
    assert train.default_loss(configs.load_config('gmm_image'), image_mixture()) == 'rmse'
    assert train.default_loss(cifar10, image_mixture()) == 'inception'          # an RGB image network
    assert train.default_loss(cifar10, planar_mixture()) == 'rmse'              # not an image
    result = run_cli(['train.py', '--dataset_name=gmm_2d', '--dry-run'])
    assert json.loads(result.stdout)['settings']['loss'] == 'rmse'


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


def test_a_learned_grid_has_its_own_defaults_under_the_config_and_the_command_line():
    from train import LEARNED_GRID_DEFAULTS, TRAIN_DEFAULTS, resolve_options
    bare = dict(dataset_name='x', sample={}, train={})
    assert resolve_options(bare, {}) == dict(TRAIN_DEFAULTS)
    learned = resolve_options(bare, dict(learn_schedule=True))
    assert learned == dict(TRAIN_DEFAULTS, **LEARNED_GRID_DEFAULTS, learn_schedule=True)
    assert learned['total_kimg'] > TRAIN_DEFAULTS['total_kimg'] and learned['lr'] > TRAIN_DEFAULTS['lr']
    amed = dict(learn_schedule=True, sampler_stu='amed')                  # chosen for EPD's tables only
    assert resolve_options(bare, amed) == dict(TRAIN_DEFAULTS, **amed)
    # The config's train section (learn_schedule there too) and the command line still win.
    cfg = dict(bare, train=dict(learn_schedule=True, lr=0.3, epd=dict(scale_dir=0.2)))
    opts = resolve_options(cfg, dict(batch=8))
    assert (opts['lr'], opts['scale_dir'], opts['batch']) == (0.3, 0.2, 8)
    assert (opts['total_kimg'], opts['coslr']) == (LEARNED_GRID_DEFAULTS['total_kimg'], LEARNED_GRID_DEFAULTS['coslr'])
    assert resolve_options(cfg, dict(learn_schedule=False)) == dict(TRAIN_DEFAULTS, lr=0.3, scale_dir=0.2)
    # A run recorded before these defaults (lr_grid null: the tables' rate) resumes at the rate it had.
    from train import recorded_values
    old = dict(settings=dict(dataset_name='x', predictor='epd', sampler_stu='epd', num_points=2, learn_schedule=True),
               lr=0.05, lr_grid=None)
    assert recorded_values(old)['lr_grid'] == 0.05


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


def _options_record(**settings):
    """A training_options.json as train.py writes it (an iPNDM-plugin run with max_order 3)."""
    s = dict(epd_settings(sampler_stu='ipndm', max_order=3), predictor='epd', guidance_type=None, guidance_rate=None,
             predict_x0=True, lower_order_final=True, dtype='float64')
    s.update(settings)
    return dict(settings=s, batch=4, batch_gpu=None, total_kimg=0.02, lr=0.05, coslr=False, seed=0, world_size=1,
                model_path=SMALL.split('=', 1)[1], prompt_path=None, dataset_config='gmm_image', plugin='epd')


def test_resume_takes_the_recorded_options_and_refuses_contradictions(tmp_path):
    from train import UsageError, resume_options
    run = tmp_path / 'exps' / '00007-gmm_image-run'
    run.mkdir(parents=True)
    (run / 'training_options.json').write_text(json.dumps(_options_record()))
    cli = dict(resume='7', outdir=str(tmp_path / 'exps'), sampler_stu=None, max_order=None, total_kimg=None,
               seed=0, lr=None, desc=None, num_points=None, plugin='epd', snap=10)
    merged = resume_options(cli, explicit={'resume', 'outdir'})
    assert merged['resume'] == str(run)
    assert (merged['sampler_stu'], merged['max_order'], merged['lr'], merged['num_points']) == ('ipndm', 3, 0.05, 3)
    assert merged['dataset_name'] == 'gmm_image' and merged['model_path'] == SMALL.split('=', 1)[1]
    # Agreeing and extending options are accepted; a contradicting one is refused naming it and both values.
    merged = resume_options(dict(cli, max_order=3, total_kimg=0.5), explicit={'resume', 'max_order', 'total_kimg'})
    assert merged['total_kimg'] == 0.5
    for name, value, recorded in (('sampler_stu', 'epd', 'ipndm'), ('max_order', 4, 3), ('lr', 0.1, 0.05),
                                  ('seed', 1, 0), ('plugin', 'amed', 'epd')):
        with pytest.raises(UsageError, match=f'--{name}={value} contradicts the run\'s {name}={recorded}'):
            resume_options(dict(cli, **{name: value}), explicit={'resume', name})
    with pytest.raises(UsageError, match='--desc'):
        resume_options(dict(cli, desc='x'), explicit={'resume', 'desc'})
    # A file, a folder that is not an experiment, an unknown number: refused.
    with pytest.raises(UsageError, match='is a file'):
        resume_options(dict(cli, resume=str(run / 'training_options.json')), explicit={'resume'})
    (tmp_path / 'README.md').write_text('not an experiment')
    with pytest.raises(UsageError, match='is not an experiment folder'):
        resume_options(dict(cli, resume=str(tmp_path)), explicit={'resume'})
    with pytest.raises(UsageError, match='no experiment 8'):
        resume_options(dict(cli, resume='8'), explicit={'resume'})


def test_resume_into_a_non_experiment_folder_is_refused_on_the_command_line(tmp_path):
    (tmp_path / 'README.md').write_text('keep me')
    for target in (tmp_path, tmp_path / 'README.md'):
        result = run_cli(train_args(tmp_path / 'exps', f'--resume={target}'), check=False)
        assert result.returncode != 0 and 'Traceback' not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith('train.py: error: --resume=') and ('not an experiment' in last or 'is a file' in last)
    assert sorted(os.listdir(tmp_path)) == ['README.md']


def _stats(folder):
    return [json.loads(line) for line in (folder / 'stats.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_amed_resume_with_a_plain_number_continues_the_run(tmp_path):
    import shutil
    # AMED with options the defaults do not give; the resumed runs name none of them.
    amed = lambda outdir, kimg: ['train.py', SMALL, '--sampler_stu=amed', '--sampler_tea=euler', '--num_steps=3',
                                 '--M=1', '--batch=4', f'--total_kimg={kimg}', '--loss=l2', '--lr=0.05',
                                 '--coslr=False', '--snap=1', f'--outdir={outdir}', '--dtype=float64']
    run_cli(amed(tmp_path / 'full', 0.02))                       # 5 iterations, uninterrupted
    run_cli(amed(tmp_path / 'short', 0.012))                     # 3 iterations
    full, short = next((tmp_path / 'full').glob('00001-*')), next((tmp_path / 'short').glob('00001-*'))
    # A run killed after iteration 5 had been logged but with its last snapshot at iteration 3.
    killed = tmp_path / 'killed'
    shutil.copytree(full, killed)
    shutil.copy(short / 'training-state.pt', killed / 'training-state.pt')
    before = _stats(killed)
    assert json.loads((short / 'predictor.json').read_text())['training'] == dict(iteration=3, total_iterations=3)
    result = run_cli(['train.py', f'--resume={killed}'])
    assert 'Resuming' in result.stdout and 'at iteration 3 of 5' in result.stdout
    # The short run, extended by --total_kimg only.
    run_cli(['train.py', '--resume=1', f'--outdir={tmp_path / "short"}', '--total_kimg=0.02'])
    reference = load_file(full / 'predictor.safetensors')
    for folder in (killed, short):
        weights = load_file(folder / 'predictor.safetensors')
        assert all(torch.equal(reference[k], weights[k]) for k in reference), folder
        stats = _stats(folder)
        assert [r['iteration'] for r in stats] == [1, 2, 3, 4, 5], folder
        secs = [r['sec'] for r in stats]
        assert secs == sorted(secs)
        meta = json.loads((folder / 'predictor.json').read_text())
        assert meta['sampler_stu'] == 'amed' and meta['training'] == dict(iteration=5, total_iterations=5)
    # The reported time covers the whole run: the resumed iterations start after the time already spent.
    assert _stats(killed)[3]['sec'] >= before[-1]['sec']
    assert json.loads((short / 'training_options.json').read_text())['total_kimg'] == 0.02
    # A contradicting option is refused in one line and changes nothing.
    result = run_cli(['train.py', f'--resume={killed}', '--sampler_stu=epd'], check=False)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert "--sampler_stu=epd contradicts the run's sampler_stu=amed" in result.stderr.strip().splitlines()[-1]
    assert [r['iteration'] for r in _stats(killed)] == [1, 2, 3, 4, 5]


def test_predictor_of_an_unfinished_run_samples_with_a_notice(tmp_path):
    pred = EPDPredictor(epd_settings(dataset_name='gmm_2d', sample_shape=[2, 1, 1]))
    training.save_predictor(pred, tmp_path / 'unfinished', progress=(30, 100))
    training.save_predictor(pred, tmp_path / 'finished', progress=(100, 100))
    assert training.load_predictor(tmp_path / 'unfinished').settings == pred.settings    # progress is not a setting
    result = run_cli(['sample.py', f'--predictor_path={tmp_path / "unfinished"}', '--seeds=0-1',
                      f'--outdir={tmp_path / "a"}'])
    notes = [line for line in result.stdout.splitlines() if 'unfinished run' in line]
    assert len(notes) == 1 and 'iteration 30 of 100' in notes[0] and str(tmp_path / 'unfinished') in notes[0]
    assert (tmp_path / 'a' / '000000' / '000001.npz').is_file()
    result = run_cli(['sample.py', f'--predictor_path={tmp_path / "finished"}', '--seeds=0-1',
                      f'--outdir={tmp_path / "b"}'])
    assert 'unfinished' not in result.stdout and 'images: 2 new' in result.stdout
