"""Options that would be silently ignored or replaced are refused, by train.py and sample.py alike, in one line
and before anything is written."""
import json
import os

import pytest
import torch

import solvers
import training
from training.predictors import AMEDPredictor, EPDPredictor


def run_cli(args, check=True):
    """Run train.py's or sample.py's command line in this process (the refusals come before any work, and a
    subprocess would spend its time importing torch)."""
    from click.testing import CliRunner
    import sample
    import train
    main = {'train.py': train.main, 'sample.py': sample.main}[args[0]]
    result = CliRunner().invoke(main, [str(a) for a in args[1:]])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check:
        assert result.exit_code == 0, result.output
    return result


def _last_error(result, script):
    assert result.exit_code != 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'{script}: error:'), result.stderr
    return last


@pytest.mark.parametrize('kw,message', [
    (dict(sigma_min=0.0), 'sigma_min=0.0 must be a finite noise level > 0'),
    (dict(sigma_max=float('inf')), 'sigma_max=inf must be a finite noise level > 0'),
    (dict(sigma_min=1.0, sigma_max=0.5), 'must satisfy 0 < sigma_min < sigma_max'),
    (dict(schedule_rho=0.0), 'schedule_rho=0.0 must be a finite number > 0'),
    (dict(schedule_rho=float('nan')), 'schedule_rho=nan must be a finite number > 0'),
    (dict(solver='ipndm', max_order=9), "max_order=9 is out of range for solver 'ipndm'; allowed: 1-4"),
    (dict(num_steps=2, afs=True), 'makes no denoiser evaluation'),
])
def test_check_options_refuses(kw, message):
    opts = dict(dict(solver='euler', num_steps=4, schedule_type='polynomial', schedule_rho=7.0), **kw)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        solvers.check_options(**opts)
    # The one entry point applies the same checks.
    net = torch.nn.Identity()
    net.sigma_min, net.sigma_max = 0.002, 80.0
    with pytest.raises(ValueError):
        solvers.sample(net, torch.zeros(1, 2), **opts)


def test_check_options_accepts_what_runs():
    solvers.check_options('euler', 2)                                   # one Euler step: one evaluation
    solvers.check_options('euler', 2, afs=True, denoise_to_zero=True)   # AFS step, then the final denoising
    solvers.check_options('heun', 2, afs=True)                          # the AFS step's second evaluation
    solvers.check_options('ipndm', 3, sigma_min=None, sigma_max=80.0, schedule_rho=None, max_order=4)


# Each refused by train.py and by sample.py, with the same words (the last once the model's sigma_max is known).
SHARED = [
    (['--sigma_min=0'], 'sigma_min=0.0 must be a finite noise level > 0'),
    (['--sigma_max=nan'], 'sigma_max=nan must be a finite noise level > 0'),
    (['--schedule_rho=-1'], 'schedule_rho=-1.0 must be a finite number > 0'),
    (['--sampler_stu=ipndm', '--max_order=9'], "max_order=9 is out of range for solver 'ipndm'; allowed: 1-4"),
    (['--sigma_min=90'], 'sigma_min=90.0 and sigma_max=80.0 must satisfy 0 < sigma_min < sigma_max'),
]


@pytest.mark.parametrize('args,message', SHARED)
@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_both_scripts_refuse_the_same_options(tmp_path, script, args, message):
    out = tmp_path / 'out'
    last = _last_error(run_cli([script, f'--outdir={out}', '--seeds=0-1' if script == 'sample.py' else '-n']
                               + args, check=False), script)
    assert message in last
    assert not out.exists()


def test_train_max_order_must_suit_a_multistep_solver_of_the_run(tmp_path):
    last = _last_error(run_cli(['train.py', '-n', '--sampler_tea=heun', '--max_order=2'], check=False), 'train.py')
    assert '--max_order=2 applies to neither the student epd nor the teacher heun' in last
    last = _last_error(run_cli(['train.py', '-n', '--sampler_stu=ipndm', '--sampler_tea=dpmpp', '--max_order=4'],
                               check=False), 'train.py')
    assert "max_order=4 is out of range for solver 'dpmpp'; allowed: 1-3" in last
    shown = json.loads(run_cli(['train.py', '-n', '--sampler_stu=ipndm', '--max_order=4',
                                '--sampler_tea=heun']).stdout)
    assert shown['settings']['max_order'] == 4


def test_sample_refuses_zero_evaluations(tmp_path):
    last = _last_error(run_cli(['sample.py', '--sampler_stu=euler', '--num_steps=2', '--afs=True', '--seeds=0-1',
                                f'--outdir={tmp_path / "o"}'], check=False), 'sample.py')
    assert 'makes no denoiser evaluation' in last and not (tmp_path / 'o').exists()


def _tiny_edm_config(tmp_path):
    """An unconditional EDM pickle (whose loader takes any option) and a dataset YAML naming it."""
    from models import edm
    from models import edm_networks as en
    torch.manual_seed(0)
    net = en.VPPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=16,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    edm.save_persistence_pickle(tmp_path / 'edm.pkl', net)
    yaml = tmp_path / 'tiny_edm.yaml'
    yaml.write_text(f"dataset_name: tiny_edm\nmodel:\n  family: edm\n  model_path: {tmp_path / 'edm.pkl'}\n")
    return yaml


def test_guidance_on_a_model_without_conditions_is_refused(tmp_path):
    yaml = _tiny_edm_config(tmp_path)
    for script, extra in (('sample.py', ['--seeds=0-1', '--sampler_stu=euler', '--num_steps=3']),
                          ('train.py', ['--loss=l2', '--sampler_tea=euler', '--total_kimg=0.004', '--batch=4'])):
        for guidance in (['--guidance_type=cfg'], ['--guidance_rate=2']):
            last = _last_error(run_cli([script, f'--dataset_name={yaml}', f'--outdir={tmp_path / "o"}', *extra,
                                        *guidance], check=False), script)
            # Refused by the loader (the family takes no guidance) or, for a loader that accepts the option, by
            # load_model (the model has no conditions): one line naming the option either way.
            assert ('has no conditions' in last or 'take no guidance' in last) and guidance[0].lstrip('-') in last, last
    assert not (tmp_path / 'o').exists()
    # A python: model whose factory takes no guidance: one line, not a TypeError.
    last = _last_error(run_cli(['sample.py', '--model_path=python:tests.helpers_models:small_mixture',
                                '--guidance_type=cfg', f'--outdir={tmp_path / "o"}'], check=False), 'sample.py')
    assert 'cannot take the option(s) guidance_type' in last
    # Without guidance the same model samples.
    run_cli(['sample.py', f'--dataset_name={yaml}', '--seeds=0-1', '--sampler_stu=euler', '--num_steps=3',
             f'--outdir={tmp_path / "ok"}'])
    assert (tmp_path / 'ok' / '000000' / '000001.png').is_file()


def _save(tmp_path, name, cls=EPDPredictor, **kw):
    from tests.test_train import epd_settings
    settings = epd_settings(dataset_name='gmm_2d', sample_shape=[2, 1, 1], **kw)
    if cls is AMEDPredictor:
        settings['feature_dim'] = 1
    training.save_predictor(cls(settings), tmp_path / name)
    return tmp_path / name


def test_predictor_fixes_its_solver_options(tmp_path):
    from sample import UsageError, check_predictor_options
    epd = training.load_predictor(_save(tmp_path, 'epd'))
    plugin = training.load_predictor(_save(tmp_path, 'ipndm', sampler_stu='ipndm', max_order=None))
    amed = training.load_predictor(_save(tmp_path, 'amed', AMEDPredictor, sampler_stu='dpmpp'))
    # Options that agree with the predictor are accepted (0.002 typed = 0.002 recorded).
    check_predictor_options(epd, dict(solver='epd', num_steps=4, sigma_min=0.002, schedule_rho=7, afs=False), 'p')
    check_predictor_options(plugin, dict(max_order=3), 'p')          # the plugin's order when none was recorded
    check_predictor_options(amed, dict(predict_x0=True, max_order=3), 'p')
    for pred, given, message in ((epd, dict(num_steps=6), "--num_steps=6 contradicts the predictor's num_steps=4"),
                                 (epd, dict(solver='dpmpp'), "--sampler_stu=dpmpp contradicts the predictor's"),
                                 (epd, dict(schedule_type='logsnr'), 'schedule_type=polynomial'),
                                 (epd, dict(afs=True), "--afs=True contradicts the predictor's afs=False"),
                                 (epd, dict(max_order=2), '--max_order does not apply'),
                                 (epd, dict(variant='bh1'), '--variant does not apply'),
                                 (plugin, dict(max_order=2), "--max_order=2 contradicts the predictor's max_order=3"),
                                 (amed, dict(predict_x0=False), 'predict_x0=True')):
        with pytest.raises(UsageError, match=message):
            check_predictor_options(pred, given, 'p')


def test_sample_refuses_solver_options_that_contradict_the_predictor(tmp_path):
    path = _save(tmp_path, 'epd')
    base = ['sample.py', f'--predictor_path={path}', '--seeds=0-1', f'--outdir={tmp_path / "o"}']
    last = _last_error(run_cli(base + ['--num_steps=6'], check=False), 'sample.py')
    assert "--num_steps=6 contradicts the predictor's num_steps=4" in last
    last = _last_error(run_cli(base + ['--t_steps=[80,1,0.002]'], check=False), 'sample.py')
    assert '--t_steps does not apply' in last
    assert not (tmp_path / 'o').exists()
    result = run_cli(base + ['--num_steps=4', '--schedule_type=polynomial'])
    assert 'images: 2 new' in result.stdout


@pytest.mark.parametrize('script,args,message', [
    ('sample.py', ['--classifier_path=c.pt'], '--classifier_path given, but family analytic models take no separate'),
    ('train.py', ['--classifier_path=c.pt'], '--classifier_path given, but family analytic models take no separate'),
    ('sample.py', ['--prompt_path=p.txt'], '--prompt/--prompt_file given, but gmm_image is not a text-to-image'),
    ('train.py', ['--prompt_file=p.txt'], '--prompt_path given, but gmm_image is not a text-to-image model'),
])
def test_the_seeds_option_names_are_accepted_and_checked_in_both_scripts(tmp_path, script, args, message):
    """classifier_path and prompt_path/prompt_file are options of both scripts; where they cannot apply they are
    refused, not ignored (the e2e tests use them where they do apply)."""
    extra = ['--seeds=0-1', '--sampler_stu=euler', '--num_steps=3'] if script == 'sample.py' else \
        ['--loss=l2', '--total_kimg=0.004', '--batch=4', f'--outdir={tmp_path / "o"}']
    last = _last_error(run_cli([script, '--dataset_name=gmm_image', *extra, *args], check=False), script)
    assert message in last, last


def test_cpu_thread_default(monkeypatch):
    from torch_utils import distributed
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert distributed.default_cpu_threads() == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert distributed.default_cpu_threads() == 3
    monkeypatch.setenv('OMP_NUM_THREADS', 'many')      # unreadable: the default, not a crash
    assert distributed.default_cpu_threads() == 1


def test_launch_checks_its_variables_before_setting_up(tmp_path):
    """`bash launch.sh evaluate` without IMAGES says so at once: no environment is created, no torch imported."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ('IMAGES', 'REF', 'PREDICTOR')}
    env['VENV'] = str(tmp_path / 'venv')
    for target, variable in (('evaluate', 'IMAGES'), ('rl', 'PREDICTOR')):
        proc = subprocess.run(['bash', os.path.join(root, 'launch.sh'), target], env=env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode != 0 and f'set {variable}=' in proc.stderr, proc.stderr
        assert not (tmp_path / 'venv').exists()


@pytest.mark.slow
@pytest.mark.parametrize('script,args', [
    ('sample.py', ['--sampler_stu=nope', '--seeds=0-3']),                           # refused by every worker alike
    ('sample.py', ['--seeds=0-3', '--outdir={blocked}/samples']),                   # found by rank 0 only
    ('train.py', ['--loss=l2', '--total_kimg=0.004', '--batch=4', '--outdir={blocked}/exps']),
])
def test_torchrun_prints_an_error_once_and_every_worker_stops(tmp_path, script, args):
    from tests.conftest import run_cli as run_subprocess
    (tmp_path / 'file').write_text('')
    args = [a.format(blocked=tmp_path / 'file') for a in args]
    proc = run_subprocess([script, *args], nproc=2, check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if f'{script}: error' in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    # no worker's traceback (torchrun's own report of the failed workers follows, as for any failed run)
    import re
    assert '[rank1]' not in proc.stderr and not re.search(r'File "[^"]*/(sample|train)\.py"', proc.stderr), proc.stderr
