"""Configs and model/predictor files a new user gets wrong, in sample.py and train.py: one line naming the problem
(and the file) and the fix, a non-zero exit, no traceback, no output folder."""
import os

import pytest

from tests.conftest import run_cli
from tests.helpers_models import write_converted_model, write_edm_pickle, write_predictor


def check_refused(script, args, expect, tmp_path):
    outdir = tmp_path / 'out'
    extra = [f'--outdir={outdir}', '--seeds=0'] if script == 'sample.py' else [f'--outdir={outdir}', '-n']
    result = run_cli([script, *args, *extra], cwd=str(tmp_path), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith(f'{script}: error: ') and expect in lines[0], lines[0]
    assert not outdir.exists()
    return lines[0]


def write_yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('files')
    edm = write_edm_pickle(root / 'tiny.pkl')
    converted = write_converted_model(root / 'conv')
    # Truncated copies: the JSON is intact, the weights stop halfway.
    with open(converted, 'rb') as f:
        data = f.read()
    with open(root / 'cut.safetensors', 'wb') as f:
        f.write(data[:len(data) // 2])
    (root / 'cut.json').write_text((root / 'conv.json').read_text())
    predictor = write_predictor(root / 'pred')
    cut_pred = write_predictor(root / 'pred_cut')
    with open(os.path.join(cut_pred, 'predictor.safetensors'), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(cut_pred, 'predictor.safetensors')) // 2)
    bad_json = write_predictor(root / 'pred_json')
    with open(os.path.join(bad_json, 'predictor.json'), 'w') as f:
        f.write('{"predictor": "epd", "na\x01me": 1}')
    return dict(edm=edm, cut=str(root / 'cut.safetensors'), predictor=predictor, cut_pred=cut_pred,
                bad_json=bad_json)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['sample.py', 'train.py'])
def test_guidance_on_a_model_without_guidance(tmp_path, files, script):
    check_refused(script, ['--guidance_type=cfg'], 'gmm_image is unconditional: it takes no guidance', tmp_path)
    edm = write_yaml(tmp_path, 'edm.yaml', f'dataset_name: mine\nmodel:\n  family: edm\n  model_path: {files["edm"]}\n')
    check_refused(script, [f'--dataset_name={edm}', '--guidance_rate=2'], 'family edm models take no guidance',
                  tmp_path)


@pytest.mark.parametrize('family', ['analytic', 'edm'])
def test_unknown_key_in_model_section(tmp_path, files, family):
    source = 'gmm_image' if family == 'analytic' else files['edm']
    cfg = write_yaml(tmp_path, 'typo.yaml', f'dataset_name: mine\nmodel:\n  family: {family}\n  model_path: {source}\n'
                     '  sigma_mni: 0.002\n')
    line = check_refused('sample.py', [f'--dataset_name={cfg}'], 'sigma_mni', tmp_path)
    assert 'sigma_min' in line            # the allowed options are listed


@pytest.mark.parametrize('script', ['sample.py', 'train.py'])
def test_yaml_that_does_not_parse(tmp_path, script):
    cfg = write_yaml(tmp_path, 'broken.yaml', 'model:\n  family: [analytic\n')
    check_refused(script, [f'--dataset_name={cfg}'], 'broken.yaml is not a valid YAML config', tmp_path)
    listing = write_yaml(tmp_path, 'list.yaml', '- model\n- sample\n')
    check_refused(script, [f'--dataset_name={listing}'], 'must be a mapping with sections model, sample, train',
                  tmp_path)


def test_unknown_key_in_sample_section(tmp_path):
    cfg = write_yaml(tmp_path, 's.yaml', 'dataset_name: mine\nmodel:\n  family: analytic\n  model_path: gmm_image\n'
                     'sample:\n  solvr: euler\n')
    check_refused('sample.py', [f'--dataset_name={cfg}'], 'unknown key(s) solvr in the sample section of the mine '
                  'config; allowed: afs,', tmp_path)


@pytest.mark.slow
def test_truncated_model_and_predictor_files(tmp_path, files):
    cfg = write_yaml(tmp_path, 'st.yaml', f'dataset_name: mine\nmodel:\n  family: safetensors\n'
                     f'  model_path: {files["cut"]}\n')
    check_refused('sample.py', [f'--dataset_name={cfg}'], f'{files["cut"]} is not a readable safetensors file',
                  tmp_path)
    check_refused('sample.py', [f'--predictor_path={files["cut_pred"]}'],
                  'predictor.safetensors is not a readable safetensors file', tmp_path)
    line = check_refused('sample.py', [f'--predictor_path={files["bad_json"]}'], 'predictor.json is not valid JSON',
                         tmp_path)
    assert files['bad_json'] in line
    # The intact predictor samples: the failures above are the files', not the loader's.
    run_cli(['sample.py', f'--predictor_path={files["predictor"]}', '--seeds=0', f'--outdir={tmp_path / "ok"}'])
    assert (tmp_path / 'ok' / '000000' / '000000.png').is_file()
