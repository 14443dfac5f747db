"""bench/demo.py (the README's main command) end to end on a tiny training run."""
import json

import PIL.Image
import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_on_the_digits_with_a_given_predictor(tmp_path):
    run_cli(['train.py', '--dataset_name=gmm_digits', '--guidance_type=cfg', '--guidance_rate=2',
             '--sampler_stu=epd', '--num_steps=4', '--total_kimg=0.004', '--batch=4', f'--outdir={tmp_path}'])
    predictor = next(tmp_path.glob('00001-gmm_digits-*'))
    assert json.loads((predictor / 'predictor.json').read_text())['guidance_rate'] == 2
    result = run_cli(['bench/demo.py', f'--predictor={predictor}', '--num_eval=10', '--num_images=40',
                      f'--samples={tmp_path / "samples"}'])
    out = result.stdout
    assert 'gmm_digits with classifier-free guidance 2: error against the exact ODE solution' in out, out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(('EPD (learned)', 'exact ODE', 'deis ('))}
    assert float(rows['exact'][-2]) == 0.0 and float(rows['exact'][-1]) == 1.0      # RMSE 0, accuracy 1
    assert 0 <= float(rows['EPD'][-1]) <= 1 and 'EPD error / best classical error at NFE 5:' in out
    grid = PIL.Image.open(next(tmp_path.glob('samples/demo-epd-*.classes.png')))
    assert grid.size == (8 * 32, 10 * 32)            # one row per digit, 8 images a row
