"""Learned grids end to end on tiny real-format models: LD3 trained by train.py on a tiny EDM pickle and a tiny SD
folder (CFG and prompts), then sample.py with the learned grid; GITS's search on the SD folder with its prompts."""
import json

import pytest

from tests.conftest import run_cli
from tests.test_e2e_models import build


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['edm-uncond', 'sd'])
def test_ld3_train_then_sample_on_tiny_models(tmp_path, kind):
    config = build(kind, tmp_path)
    prompts = []
    if kind == 'sd':
        (tmp_path / 'prompts.txt').write_text('a red square\na blue circle\n')
        prompts = [f'--prompt_path={tmp_path / "prompts.txt"}']
    run_cli(['train.py', f'--dataset_name={config}', '--sampler_stu=ld3', '--solver=dpmpp', '--num_steps=3',
             '--sampler_tea=euler', '--teacher_steps=4', '--num_train=2', '--num_valid=2',
             '--main_train_batch_size=2', '--main_valid_batch_size=2', '--training_rounds_v1=1',
             '--training_rounds_v2=1', '--loss_type=L2', f'--outdir={tmp_path / "exps"}',
             f'--data_dir={tmp_path / "data"}', *prompts], cwd=str(tmp_path))
    folder = next((tmp_path / 'exps').glob('0000*'))
    meta = json.loads((folder / 'predictor.json').read_text())
    assert meta['predictor'] == 'ld3' and meta['num_steps'] == 3
    result = run_cli(['sample.py', f'--dataset_name={config}', f'--predictor_path={folder}', '--seeds=0-1',
                      '--batch=2', f'--outdir={tmp_path / "learned"}', *prompts], cwd=str(tmp_path))
    assert 'NFE per image: 2' in result.stdout
    assert (tmp_path / 'learned' / '000000' / '000001.png').is_file()
    if kind == 'sd':
        result = run_cli(['sample.py', f'--dataset_name={config}', '--sampler_stu=dpmpp', '--num_steps=3',
                          '--schedule_type=gits', '--num_warmup=2', '--num_steps_tea=5', '--seeds=0-1', '--batch=2',
                          f'--outdir={tmp_path / "gits"}', *prompts], cwd=str(tmp_path))
        assert 'GITS cost table' in result.stdout and 'NFE per image: 2' in result.stdout
        settings = json.loads((tmp_path / 'gits' / 'sample_options.json').read_text())['settings']
        assert settings['schedule_type'] == 'gits' and len(settings['t_steps']) == 3
