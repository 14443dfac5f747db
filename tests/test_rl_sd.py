"""The RL stage end to end on a tiny Stable Diffusion folder (CFG, prompts from a CSV) with a tiny HPS-shaped
reward file (an open_clip state dict of an architecture given by its JSON config): distil, rollout, update, export,
sample."""
import json

import numpy as np
import PIL.Image
import pytest
from safetensors.torch import load_file

import training
from tests.conftest import run_cli
from tests.test_e2e_models import build
from tests.test_fid import tiny_open_clip


@pytest.mark.slow
def test_rl_on_tiny_sd_with_prompts_and_an_hps_file(tmp_path):
    config = build('sd', tmp_path)
    (tmp_path / 'prompts.csv').write_text('caption\na red square\na blue circle\na green line\na dog\n')
    run_cli(['train.py', f'--dataset_name={config}', '--sampler_stu=epd', '--sampler_tea=euler', '--num_steps=3',
             '--M=1', '--batch=2', '--total_kimg=0.004', '--loss=l2', f'--prompt_file={tmp_path / "prompts.csv"}',
             f'--outdir={tmp_path / "distil"}'])
    distilled = next((tmp_path / 'distil').glob('0000*-*'))
    arch, _, weights = tiny_open_clip(tmp_path, 'tiny-hps-rl', 3, 'hps.safetensors')

    args = ['-m', 'training.rl', '--device=cpu', '--max-steps', '2',
            '--override', f'data.predictor_snapshot={distilled}', '--override', f'data.prompt_csv={tmp_path}/prompts.csv',
            '--override', f'run.output_root={tmp_path / "exps"}', '--override', 'reward.type=hps',
            '--override', f'reward.weights_path={weights}', '--override', f'reward.arch={arch}',
            '--override', 'ppo.rollout_batch_size=4', '--override', 'ppo.rloo_k=2', '--override', 'ppo.minibatch_size=2',
            '--override', 'ppo.hidden_dim=8', '--override', 'ppo.learning_rate=0.05',
            '--override', 'logging.save_interval=1', '--override', 'logging.eval_images=2']
    # The predictor names its dataset ('tiny'), not where its config lies: without the config, one line says so.
    proc = run_cli(args, check=False)
    assert proc.returncode != 0 and 'set model.dataset_name to the YAML config' in proc.stderr, proc.stderr
    run_cli(args + ['--override', f'model.dataset_name={config}'])
    run_dir = next((tmp_path / 'exps').glob("0000*-rl-*"))
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2]
    # HPS is a cosine of image and prompt features: every reward lies in [-1, 1] and is not constant.
    assert all(-1 <= r['reward_mean'] <= 1 and -1 <= r['heldout_reward'] <= 1 for r in rows), rows
    assert rows[0]['reward_std'] > 0, rows[0]
    # The update moved the policy off its zero-initialised head, i.e. away from the distilled table.
    policy = load_file(run_dir / 'checkpoints' / 'policy-step000002.safetensors')
    assert policy['output.weight'].abs().max() > 0 or policy['output.bias'].abs().max() > 0
    assert rows[-1]['kl'] > 0

    exported = training.load_predictor(str(run_dir))
    assert exported.settings['rl_step'] == 2 and exported.settings['sampler_stu'] == 'epd'
    outs = []
    for name in ('a', 'b'):
        proc = run_cli(['sample.py', f'--predictor_path={run_dir}', f'--dataset_name={config}', '--seeds=0-1',
                        '--batch=2', f'--prompt_file={tmp_path / "prompts.csv"}', f'--outdir={tmp_path / name}'])
        assert 'images: 2 new' in proc.stdout, proc.stdout
        outs.append(np.asarray(PIL.Image.open(tmp_path / name / '000000' / '000001.png')))
    assert np.array_equal(*outs)                       # the exported policy mean samples deterministically
