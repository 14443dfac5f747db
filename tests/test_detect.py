"""--model_path without --dataset_name: the family is told from the file or folder where that is unambiguous, and
otherwise one line names the --dataset_name to add; another model than the config's renders at its own size."""
import json

import PIL.Image
import pytest
import torch

import configs
from models import ModelError, edm
from models.detect import detect_family
from tests.conftest import run_cli
from tests.test_models_latent import build_tiny_dit, build_tiny_sd
from tests.test_models_pixel import _edm_net


@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(str(tmp_path_factory.mktemp('sd') / 'my-sd'))


def test_families_are_told_from_files_and_folders(tmp_path, tiny_sd):
    assert detect_family(tiny_sd) == 'sd'
    assert detect_family(build_tiny_dit(str(tmp_path / 'dit'))) == 'dit'
    edm.save_persistence_pickle(str(tmp_path / 'net.pkl'), _edm_net('vp-ddpmpp'))
    assert detect_family(tmp_path / 'net.pkl') == 'edm'
    (tmp_path / 'conv.safetensors').write_bytes(b'')
    (tmp_path / 'conv.json').write_text('{}')
    assert detect_family(tmp_path / 'conv.safetensors') == detect_family(tmp_path / 'conv.json') == 'safetensors'
    (tmp_path / 'ldm').mkdir()
    (tmp_path / 'ldm' / 'model.ckpt').write_bytes(b'')
    (tmp_path / 'ldm' / 'config.yaml').write_text('model: {}\n')
    assert detect_family(tmp_path / 'ldm' / 'model.ckpt') == 'ldm'
    torch.save({'x_embedder.proj.weight': torch.zeros(1)}, tmp_path / 'DiT-XL-2-256x256.pt')
    assert detect_family(tmp_path / 'DiT-XL-2-256x256.pt') == 'dit'


def _file(name, content=b''):
    def make(folder):
        path = folder / name
        if isinstance(content, dict):
            torch.save(content, path)
        else:
            path.write_bytes(content)
        return path
    return make


@pytest.mark.parametrize('make,message', [
    (_file('adm.pt', {'input_blocks.0.0.weight': torch.zeros(1)}),
     'guided-diffusion (ADM) state dict, whose architecture flags are not in the file; add --dataset_name=imagenet64'),
    (_file('x.ckpt'), 'a .ckpt without its yaml beside it'),
    (_file('weights.bin'), 'cannot tell the model family from the file'),
    (lambda p: p / 'missing.pkl', 'does not exist here'),
    (lambda p: p, 'a folder without model_index.json'),
    (lambda p: _file('model_index.json', json.dumps({'_class_name': 'KandinskyPipeline'}).encode())(p).parent,
     'is a diffusers KandinskyPipeline, which no family here loads'),
])
def test_undecidable_paths_name_the_dataset_to_add(tmp_path, make, message):
    with pytest.raises(ModelError, match='^--model_path=') as error:
        detect_family(make(tmp_path))
    assert message in str(error.value) and '\n' not in str(error.value)


def test_config_for_run():
    assert configs.config_for_run(None)['dataset_name'] == configs.DEFAULT_DATASET
    assert configs.config_for_run('gmm_2d', 'python:tests.helpers_models:small_mixture')['dataset_name'] == 'gmm_2d'
    assert configs.config_for_run(None, 'python:x:y')['dataset_name'] == configs.DEFAULT_DATASET


def _png_size(folder):
    return PIL.Image.open(next(folder.rglob('*.png'))).size


@pytest.mark.slow
def test_sample_with_only_a_model_path_at_the_models_own_size(tmp_path, tiny_sd):
    base = ['sample.py', f'--model_path={tiny_sd}', '--prompt=a red square', '--sampler_stu=dpmpp', '--num_steps=3',
            '--seeds=0-1', '--batch=2']
    result = run_cli(base + [f'--outdir={tmp_path / "a"}'])
    assert 'NFE per image: 2' in result.stdout and _png_size(tmp_path / 'a') == (16, 16)
    # ms_coco's config says 512 px for its own model; another model keeps its native 16 px ...
    run_cli(base + ['--dataset_name=ms_coco', '--dtype=float32', f'--outdir={tmp_path / "b"}'])
    assert _png_size(tmp_path / 'b') == (16, 16)
    # ... unless --resolution says otherwise
    run_cli(base + ['--resolution=32', f'--outdir={tmp_path / "c"}'])
    assert _png_size(tmp_path / 'c') == (32, 32)
    # train.py tells the family the same way
    (tmp_path / 'p.txt').write_text('a cat\n')
    run_cli(['train.py', f'--model_path={tiny_sd}', f'--prompt_path={tmp_path / "p.txt"}', '--sampler_tea=euler',
             '--num_steps=3', '--M=1', '--batch=2', '--total_kimg=0.002', '--loss=l2', f'--outdir={tmp_path / "e"}'])
    folder = next((tmp_path / 'e').glob('00001-my-sd-*'))
    assert json.loads((folder / 'predictor.json').read_text())['dataset_name'] == 'my-sd'


def test_resolution_on_a_fixed_size_model_is_refused():
    result = run_cli(['sample.py', '--resolution=64', '--seeds=0'], check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == ('sample.py: error: --resolution given, but family analytic '
                                                      'models have a fixed size (the latent families take one); '
                                                      'drop --resolution')


def test_sample_an_edm_pickle_without_a_config(tmp_path):
    """The README's EDM line on a tiny pickle of the same format."""
    edm.save_persistence_pickle(str(tmp_path / 'net.pkl'), _edm_net('vp-ddpmpp'))
    result = run_cli(['sample.py', f'--model_path={tmp_path / "net.pkl"}', '--sampler_stu=heun', '--num_steps=3',
                      '--seeds=0-1', f'--outdir={tmp_path / "o"}'])
    assert 'NFE per image: 4' in result.stdout and len(list((tmp_path / 'o').rglob('*.png'))) == 2
    assert json.loads((tmp_path / 'o' / 'sample_options.json').read_text())['dataset_name'] == 'net'
