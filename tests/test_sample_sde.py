"""sample.py with the stochastic samplers: their options and the 2nd-SED seed's spellings, refusals, the summary's
counts, and byte-identical images across workers, batch sizes and resume points."""
import json
import os

import pytest

from tests.conftest import run_cli
from tests.helpers_models import write_edm_pickle


class Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def cli(args, check=True):
    """sample.py in this process (no interpreter start-up): for the quick checks."""
    from click.testing import CliRunner
    import sample
    result = Result(CliRunner().invoke(sample.main, [a for a in args if a != 'sample.py']))
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
    return result

SDE_SAMPLERS = ['edm_sde', 'euler_maruyama', 'sed2', 'sed_ref']


def pngs(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith('.png'):
                with open(os.path.join(root, f), 'rb') as fh:
                    out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


def refused(result, *words):
    """One line on stderr naming the problem, non-zero exit, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and lines[0].startswith('sample.py: error:'), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_seed_command_line_runs_the_reference_sampler(tmp_path):
    """The seed's generate.py spellings: --network (an EDM pickle, no config needed), --steps, --rho,
    --randn_like; without --sampler_stu it runs sed_ref, one network call per grid point."""
    pkl = write_edm_pickle(tmp_path / 'net.pkl')
    out = tmp_path / 'seed'
    result = run_cli(['sample.py', f'--network={pkl}', '--steps=6', '--randn_like=ddb', '--rho=3', '--seeds=0-2',
                      '--subdirs=True', f'--outdir={out}'])
    assert 'sampling with sed_ref' in result.stdout
    assert 'NFE per image: 6 (sequential rounds: 6)' in result.stdout
    assert sorted(pngs(out)) == [f'000000/{s:06d}.png' for s in range(3)]
    settings = json.loads((out / 'sample_options.json').read_text())['images']['settings']
    assert (settings['solver'], settings['num_steps'], settings['schedule_rho'], settings['randn_like'],
            settings['dtype'], settings['S_max']) == ('sed_ref', 6, 3.0, 'ddb', 'float64', float('inf'))
    # --model_path with a config is the same run: same images
    cfg = tmp_path / 'edm.yaml'
    cfg.write_text(f'dataset_name: edm\nmodel:\n  family: edm\n  model_path: {pkl}\n  sigma_min: 0.002\n'
                   '  sigma_max: 80.0\nsample:\n  dtype: float64\n')
    run_cli(['sample.py', f'--dataset_name={cfg}', '--sampler_stu=sed_ref', '--num_steps=6', '--randn_like=ddb',
             '--schedule_rho=3', '--seeds=0-2', f'--outdir={tmp_path / "cfg"}'])
    assert pngs(tmp_path / 'cfg') == pngs(out)
    refused(run_cli(['sample.py', f'--network={pkl}', f'--model_path={pkl}', f'--outdir={tmp_path / "x"}'],
                    check=False), '--network', '--model_path')


def test_summary_reports_jvp_passes(tmp_path):
    result = cli(['sample.py', '--dataset_name=gmm_2d', '--sampler_stu=sed2', '--num_steps=5', '--seeds=0-1',
                      f'--outdir={tmp_path / "a"}'])
    # lagged drift: one plain call before the first step, then one JVP pass per step
    assert 'NFE per image: 5 (1 plain calls + 4 forward-mode JVP passes' in result.stdout
    result = cli(['sample.py', '--dataset_name=gmm_2d', '--sampler_stu=sed2', '--num_steps=5', '--seeds=0-1',
                      '--jvp=fd', f'--outdir={tmp_path / "b"}'])
    # finite differences: one batched call of two rows per image and step, no JVP pass
    assert 'NFE per image: 9 (sequential rounds: 5)' in result.stdout
    result = cli(['sample.py', '--dataset_name=gmm_2d', '--sampler_stu=edm_sde', '--S_churn=10',
                      '--num_steps=5', '--seeds=0-1', f'--outdir={tmp_path / "c"}'])
    assert 'NFE per image: 8 (sequential rounds: 8)' in result.stdout


@pytest.mark.parametrize('args,words', [
    (['--sampler_stu=euler', '--S_churn=5'], ['--S_churn applies to edm_sde', 'deterministic ODE solver']),
    (['--sampler_stu=dpmpp', '--randn_like=ddb'], ['--randn_like applies to sed2, sed_ref']),
    (['--sampler_stu=edm_sde', '--beta=1'], ['--beta applies to euler_maruyama, sed2']),
    (['--sampler_stu=edm_sde', '--S_churn=-1'], ['S_churn=-1.0 must be >= 0']),
    (['--sampler_stu=edm_sde', '--S_churn=5', '--S_min=2', '--S_max=1'], ['S_min=2.0 must be <= S_max=1.0']),
    (['--sampler_stu=sed_ref', '--S_max=1'], ['needs randn_like=ddb']),
    (['--dataset_name=gmm_digits', '--guidance_type=cg', '--guidance_rate=2', '--sampler_stu=sed2', '--jvp=jvp'],
     ['cannot give a forward-mode JVP', '--jvp=fd']),
])
def test_bad_stochastic_options_are_refused(tmp_path, args, words):
    result = cli(['sample.py', '--num_steps=4', '--seeds=0-1', f'--outdir={tmp_path / "out"}'] + args,
                     check=False)
    refused(result, *words)
    assert not (tmp_path / 'out').exists()


def test_unknown_randn_like_is_refused(tmp_path):
    result = cli(['sample.py', '--sampler_stu=sed2', '--randn_like=dbb', f'--outdir={tmp_path / "out"}'],
                     check=False)
    assert result.returncode != 0 and "'dbb' is not one of 'db', 'ddb'" in result.stderr
    assert 'Traceback' not in result.stderr


def test_folder_records_the_stochastic_options(tmp_path):
    """A folder holds one setting: another S_churn (or the same one spelt out) is seen by the collision check."""
    base = ['sample.py', '--dataset_name=gmm_2d', '--sampler_stu=edm_sde', '--num_steps=4', '--seeds=0-1',
            '--save_npz=True', f'--outdir={tmp_path / "out"}']
    cli(base + ['--S_churn=5'])
    refused(cli(base + ['--S_churn=6'], check=False), "'S_churn': 5.0", "'S_churn': 6.0")
    again = cli(base + ['--S_churn=5', '--S_noise=1'])      # S_noise 1 is the default: same images
    assert 'images: 0 new, 2 already there' in again.stdout
    refused(cli(base, check=False), "'S_churn': 0.0")


@pytest.mark.slow
@pytest.mark.parametrize('solver', SDE_SAMPLERS)
def test_sde_images_identical_across_workers_batches_and_resume(tmp_path, solver):
    """2 torchrun workers at batch 3 vs 1 worker at batch 4 resuming a folder that already holds two of the
    seeds (written at batch 2): the same PNG bytes for every seed (a small 3x8x8 mixture, float64)."""
    common = ['sample.py', '--model_path=python:tests.helpers_models:small_mixture', f'--sampler_stu={solver}',
              '--num_steps=4', '--schedule_rho=7']
    if solver == 'sed_ref':
        common += ['--randn_like=ddb', '--S_max=1']       # its second-order branch too
    cli(common + ['--seeds=2,4', '--batch=2', f'--outdir={tmp_path / "one"}'])          # in this process
    resumed = cli(common + ['--seeds=0-5', '--batch=4', f'--outdir={tmp_path / "one"}'])
    assert 'images: 4 new, 2 already there' in resumed.stdout
    run_cli(common + ['--seeds=0-5', '--batch=3', f'--outdir={tmp_path / "two"}'], nproc=2)
    one = pngs(tmp_path / 'one')
    assert len(one) == 6 and len(set(one.values())) == 6
    assert pngs(tmp_path / 'two') == one


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['edm-uncond', 'adm-cg', 'sd'])
def test_every_sde_sampler_end_to_end_on_tiny_models(tmp_path, kind):
    """Each SDE sampler through sample.py on a tiny EDM pickle, a classifier-guided ADM (no forward-mode AD: sed2
    takes the finite difference, two rows per image and step) and a tiny SD folder (prompts, CFG)."""
    from tests.test_e2e_models import build
    config = build(kind, tmp_path)
    prompt = ['--prompt=a red square'] if kind == 'sd' else []
    for solver in SDE_SAMPLERS:
        out = tmp_path / solver
        result = cli(['sample.py', f'--dataset_name={config}', f'--sampler_stu={solver}', '--num_steps=3',
                      '--schedule_type=polynomial', '--seeds=0-1', f'--outdir={out}', *prompt])
        assert sorted(pngs(out)) == ['000000/000000.png', '000000/000001.png'], result.stdout
        if solver == 'sed2':
            expect = 'NFE per image: 5 (sequential rounds: 3)' if kind == 'adm-cg' else \
                'NFE per image: 3 (1 plain calls + 2 forward-mode JVP passes'
            assert expect in result.stdout, result.stdout
