"""sample.py end to end: deterministic across workers and batch sizes, resumable after SIGKILL, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import solvers
from tests.conftest import PYTHON, ROOT, run_cli


def read_tree(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(('.png', '.npz')):
                with open(os.path.join(root, f), 'rb') as fh:
                    out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


@pytest.mark.slow
def test_bytes_identical_across_workers_and_batches(tmp_path):
    common = ['sample.py', '--sampler_stu=dpmpp', '--num_steps=5', '--seeds=0-9', '--save_npz=True']
    run_cli(common + ['--batch=8', f'--outdir={tmp_path}/one'])
    run_cli(common + ['--batch=3', f'--outdir={tmp_path}/two'], nproc=2)
    one, two = read_tree(tmp_path / 'one'), read_tree(tmp_path / 'two')
    assert len(one) == 20 and sorted(one) == sorted(two)
    pngs = [k for k in one if k.endswith('.png')]
    assert len(pngs) == 10 and all(one[k] == two[k] for k in pngs)
    # Raw floats: BLAS may sum in another order for another batch size, so they agree to rounding only.
    for k in one:
        if k.endswith('.npz'):
            a, b = (np.load(tmp_path / d / k)['x'] for d in ('one', 'two'))
            assert np.abs(a - b).max() < 1e-12


@pytest.mark.slow
def test_sigkill_and_resume(tmp_path):
    args = ['sample.py', '--sampler_stu=heun', '--num_steps=12', '--seeds=0-59', '--batch=2', '--subdirs=False']
    run_cli(args + [f'--outdir={tmp_path}/full'])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.Popen([PYTHON] + args + [f'--outdir={tmp_path}/killed'], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [f for f in os.listdir(tmp_path / 'killed')] if (tmp_path / 'killed').exists() else []
        if sum(f.endswith('.png') for f in done) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_tree(tmp_path / 'killed')
    assert 0 < len(partial) < 60
    full = read_tree(tmp_path / 'full')
    # Every file present under a final name is complete.
    assert all(partial[k] == full[k] for k in partial)
    result = run_cli(args + [f'--outdir={tmp_path}/killed'])
    assert f'{len(partial)} already there' in result.stdout
    resumed = read_tree(tmp_path / 'killed')
    assert resumed == full
    leftovers = [f for f in os.listdir(tmp_path / 'killed') if f.endswith('.tmp')]
    # Temporary files of the killed run may remain (hidden); none carries a final name.
    assert all(f.startswith('.') for f in leftovers)


@pytest.mark.slow
def test_every_solver_through_cli(tmp_path):
    for name in sorted(solvers.SOLVERS):
        result = run_cli(['sample.py', f'--sampler_stu={name}', '--num_steps=4', '--seeds=0-1', '--batch=2',
                          f'--outdir={tmp_path}/{name}', '--grid=True'])
        assert os.path.isfile(tmp_path / name / '000000' / '000001.png')
        assert os.path.isfile(tmp_path / f'{name}.grid.png') and not os.path.exists(tmp_path / name / 'grid.png')
        nfe = solvers.nfe_formula(name, 4)
        assert f'NFE per image: {nfe:g}' in result.stdout
        opts = json.loads((tmp_path / name / 'sample_options.json').read_text())
        assert opts['settings']['solver'] == name


def test_2d_model_writes_npz(tmp_path):
    run_cli(['sample.py', '--dataset_name=gmm_2d', '--seeds=0-3', f'--outdir={tmp_path}', '--subdirs=False'])
    x = np.load(tmp_path / '000003.npz')['x']
    assert x.shape == (2, 1, 1)


@pytest.mark.parametrize('args,message', [
    (['--seeds=0-x'], 'malformed seeds'),
    (['--dataset_name=nope'], "unknown dataset_name 'nope'; known:"),
    (['--sampler_stu=rk4'], "unknown solver 'rk4'"),
    (['--outdir=/proc/forbidden'], 'cannot write to --outdir'),
    (['--model_path=python:tests.helpers_models:missing'], 'has no attribute'),
    (['--model_path=python:tests.helpers_models:nan_model', '--sampler_stu=euler', '--num_steps=5'],
     'NaN/inf at sigma='),
])
def test_clear_errors(tmp_path, args, message):
    out = ['--outdir', str(tmp_path / 'o')] if not any(a.startswith('--outdir') for a in args) else []
    result = run_cli(['sample.py', '--seeds=0-1'] + out + args, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith('sample.py: error:'), result.stderr
    assert 'Traceback' not in result.stderr


def test_python_model_path(tmp_path):
    run_cli(['sample.py', '--model_path=python:tests.helpers_models:small_mixture', '--seeds=0-1',
             f'--outdir={tmp_path}', '--sampler_stu=euler', '--num_steps=3'])
    assert os.path.isfile(tmp_path / '000000' / '000000.png')


def test_rerun_on_a_finished_folder_writes_nothing(tmp_path):
    args = ['sample.py', '--dataset_name=gmm_2d', '--seeds=0-3', '--batch=4', f'--outdir={tmp_path}', '--grid=True']
    run_cli(args)
    before = read_tree(tmp_path)
    result = run_cli(args)
    assert 'images: 0 new, 4 already there' in result.stdout
    assert read_tree(tmp_path) == before


def _refusal(result, setting):
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('sample.py: error:') and f'made with {setting}=' in last and 'another --outdir' in last, \
        result.stderr
    assert 'Traceback' not in result.stderr


def test_folder_of_other_settings_is_refused(tmp_path):
    base = ['sample.py', '--dataset_name=gmm_2d', '--seeds=0-1', f'--outdir={tmp_path}', '--sampler_stu=dpmpp',
            '--num_steps=6']
    run_cli(base + ['--schedule_type=logsnr'])
    before = read_tree(tmp_path)
    options = (tmp_path / 'sample_options.json').read_text()
    _refusal(run_cli(base, check=False), 'settings')
    assert 'schedule_type' in run_cli(base, check=False).stderr
    _refusal(run_cli(base[:-2] + ['--sampler_stu=ipndm', '--num_steps=6', '--schedule_type=logsnr'], check=False),
             'settings')
    _refusal(run_cli(base + ['--schedule_type=logsnr', '--afs=True'], check=False), 'settings')
    # Nothing was added or rewritten by the refused runs; the same settings extend the folder.
    assert read_tree(tmp_path) == before and (tmp_path / 'sample_options.json').read_text() == options
    result = run_cli(base + ['--schedule_type=logsnr', '--seeds=0-3'])
    assert 'images: 2 new, 2 already there' in result.stdout


def test_folder_without_recorded_settings_is_refused(tmp_path):
    (tmp_path / 'sample_options.json').write_text(json.dumps(dict(settings=dict(solver='euler'))))
    result = run_cli(['sample.py', '--dataset_name=gmm_2d', '--seeds=0-1', f'--outdir={tmp_path}'], check=False)
    assert result.returncode != 0 and 'were not recorded; choose another --outdir' in result.stderr


def test_default_folder_names_schedule_and_predictor(tmp_path):
    import training
    from tests.test_train import epd_settings
    from training.predictors import EPDPredictor
    base = ['sample.py', '--dataset_name=gmm_2d', '--seeds=0-1', '--sampler_stu=dpmpp', '--num_steps=6']
    run_cli(base + ['--schedule_type=logsnr'], cwd=tmp_path)
    run_cli(base, cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / 'samples' / 'gmm_2d')) == ['dpmpp_nfe5_logsnr', 'dpmpp_nfe5_polynomial']
    # Two predictors of the same kind and steps: different folders; an explicit shared folder is refused.
    for i in (1, 2):
        training.save_predictor(EPDPredictor(epd_settings(dataset_name='gmm_2d', sample_shape=[2, 1, 1],
                                                          scale_dir=0.01 * i)), tmp_path / f'p{i}')
        run_cli(['sample.py', f'--predictor_path={tmp_path / f"p{i}"}', '--seeds=0-1'], cwd=tmp_path)
    names = sorted(os.listdir(tmp_path / 'samples' / 'gmm_2d'))
    epd = [n for n in names if n.startswith('epd-')]
    assert len(epd) == 2 and all(n.startswith('epd-epd_nfe6_polynomial_') for n in epd), names
    shared = ['sample.py', '--seeds=0-1', f'--outdir={tmp_path / "shared"}']
    run_cli(shared + [f'--predictor_path={tmp_path / "p1"}'])
    _refusal(run_cli(shared + [f'--predictor_path={tmp_path / "p2"}'], check=False), 'predictor')
    # A classical solver into a predictor's folder: refused too.
    _refusal(run_cli(shared + ['--dataset_name=gmm_2d', '--sampler_stu=euler'], check=False), 'predictor')


def test_explicit_t_steps_grid(tmp_path):
    base = ['sample.py', '--dataset_name=gmm_2d', '--seeds=0-1', '--sampler_stu=euler']
    result = run_cli(base + ['--t_steps=[80,10,1,0.1,0.002]', f'--outdir={tmp_path / "grid"}'])
    assert 'NFE per image: 4' in result.stdout
    bad = run_cli(base + ['--t_steps=[80,100,0.002]', f'--outdir={tmp_path / "bad"}'], check=False)
    assert bad.returncode != 0 and 'strictly decreasing' in bad.stderr and 'Traceback' not in bad.stderr
    assert not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('solver', ['euler_maruyama', 'sed2'])
def test_sde_sampler_images_do_not_depend_on_the_batch(tmp_path, solver):
    """Each image draws its noise from its own seed: the PNG of a seed is byte-identical at any batch size, and
    the noise does change the image (against the deterministic Euler run of the same latents)."""
    base = ['sample.py', f'--sampler_stu={solver}', '--num_steps=5', '--seeds=0-2']
    run_cli(base + ['--batch=3', f'--outdir={tmp_path / "b3"}'])
    run_cli(base + ['--batch=1', f'--outdir={tmp_path / "b1"}'])
    run_cli(['sample.py', '--sampler_stu=euler', '--num_steps=5', '--seeds=0-2', f'--outdir={tmp_path / "ode"}'])
    for seed in range(3):
        name = os.path.join('000000', f'{seed:06d}.png')
        one, three = (tmp_path / 'b1' / name).read_bytes(), (tmp_path / 'b3' / name).read_bytes()
        assert one == three
        assert one != (tmp_path / 'ode' / name).read_bytes()


def test_summary_counts_the_network_rows_of_classifier_free_guidance(tmp_path):
    """NFE counts evaluations; under CFG each is one batched call on the conditional and unconditional halves, so
    the summary also gives the network rows per image (what the compute is)."""
    common = ['sample.py', '--dataset_name=gmm_digits', '--sampler_stu=euler', '--num_steps=6', '--seeds=0-1']
    guided = run_cli(common + ['--guidance_type=cfg', '--guidance_rate=2', f'--outdir={tmp_path / "g"}']).stdout
    assert 'NFE per image: 5 (sequential rounds: 5; classifier-free guidance: 2 network rows per evaluation, ' \
           '10 per image)' in guided, guided
    plain = run_cli(common + [f'--outdir={tmp_path / "c"}']).stdout
    assert 'NFE per image: 5 (sequential rounds: 5)' in plain, plain
