"""sample.py and train.py end to end on tiny models of each family, written in their real file formats and
loaded through a dataset config of the user's own (--dataset_name=path/to/config.yaml)."""
import json

import pytest
import torch
import yaml

from models import edm
from tests.conftest import run_cli
from tests.test_models_convert import build_compvis_ldm, build_facebook_dit
from tests.test_models_latent import build_tiny_dit, build_tiny_sd
from tests.test_models_pixel import ADM_ARCH, CLASSIFIER_ARCH, _adm_classifier, _adm_unet, _edm_net


def write_config(folder, model, **sample):
    path = folder / 'model.yaml'
    path.write_text(yaml.safe_dump(dict(dataset_name='tiny', model=model, sample=sample)))
    return str(path)


def build(kind, folder, classifier_in_config=True):
    if kind in ('edm-uncond', 'edm-cond'):
        path = folder / 'net.pkl'
        edm.save_persistence_pickle(str(path), _edm_net('vp-ddpmpp' if kind == 'edm-uncond' else 'edm-ddpmpp-cond'))
        return write_config(folder, dict(family='edm', model_path=str(path), sigma_min=0.002, sigma_max=80.0))
    if kind == 'adm-cg':
        torch.save(_adm_unet().state_dict(), folder / 'unet.pt')
        torch.save(_adm_classifier().state_dict(), folder / 'classifier.pt')
        # without classifier_in_config the classifier must come from --classifier_path (the seeds' option)
        classifier = dict(classifier_path=str(folder / 'classifier.pt')) if classifier_in_config else {}
        return write_config(folder, dict(family='adm', model_path=str(folder / 'unet.pt'), guidance_type='cg',
                                         guidance_rate=2.0, **classifier, **ADM_ARCH, **CLASSIFIER_ARCH))
    if kind == 'sd':
        build_tiny_sd(str(folder / 'sd'))
        return write_config(folder, dict(family='sd', model_path=str(folder / 'sd'), guidance_type='cfg',
                                         guidance_rate=3.0), schedule_type='discrete', schedule_rho=1.0)
    if kind == 'dit':
        build_tiny_dit(str(folder / 'dit'))
        return write_config(folder, dict(family='dit', model_path=str(folder / 'dit'), guidance_type='cfg',
                                         guidance_rate=2.0))
    if kind == 'ldm-ckpt':  # a CompVis checkpoint with its config.yaml beside it
        build_compvis_ldm(str(folder / 'ldm'))
        return write_config(folder, dict(family='ldm', model_path=str(folder / 'ldm' / 'model.ckpt')),
                            schedule_type='discrete', schedule_rho=1.0)
    if kind == 'dit-pt':  # a facebookresearch .pt; VAE and scheduler from a diffusers DiT folder
        build_facebook_dit(str(folder / 'DiT-tiny.pt'))
        build_tiny_dit(str(folder / 'dit'))
        return write_config(folder, dict(family='dit', model_path=str(folder / 'DiT-tiny.pt'),
                                         single_file_config=str(folder / 'dit'), num_attention_heads=2,
                                         guidance_type='cfg', guidance_rate=2.0))
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['edm-uncond', 'edm-cond', 'adm-cg', 'sd', 'dit'])
def test_sample_and_train_on_tiny_model(tmp_path, kind):
    config = build(kind, tmp_path, classifier_in_config=False)
    prompt = ['--prompt=a red square'] if kind == 'sd' else []
    if kind == 'adm-cg':
        prompt = [f'--classifier_path={tmp_path / "classifier.pt"}']
    result = run_cli(['sample.py', f'--dataset_name={config}', '--sampler_stu=dpmpp', '--num_steps=4',
                      '--seeds=0-2', '--batch=2', f'--outdir={tmp_path / "samples"}', *prompt])
    assert 'NFE per image: 3' in result.stdout
    assert (tmp_path / 'samples' / '000000' / '000002.png').is_file()
    if kind == 'sd':
        (tmp_path / 'prompts.txt').write_text('a red square\na blue circle\n')
        prompt = [f'--prompt_file={tmp_path / "prompts.txt"}']     # sample.py's name, accepted by train.py
    learned_prompt = [f'--prompt_path={tmp_path / "prompts.txt"}'] if kind == 'sd' else prompt  # and vice versa
    for student in ('epd', 'amed'):
        run_cli(['train.py', f'--dataset_name={config}', f'--sampler_stu={student}', '--sampler_tea=euler',
                 '--num_steps=3', '--M=1', '--batch=2', '--total_kimg=0.004', '--loss=l2',
                 f'--outdir={tmp_path / "exps"}', *prompt])
    folders = sorted((tmp_path / 'exps').glob('0000*'))
    assert [json.loads((f / 'predictor.json').read_text())['sampler_stu'] for f in folders] == ['epd', 'amed']
    result = run_cli(['sample.py', f'--dataset_name={config}', f'--predictor_path={folders[1]}', '--seeds=0-1',
                      '--batch=2', f'--outdir={tmp_path / "learned"}', *learned_prompt])
    assert (tmp_path / 'learned' / '000000' / '000001.png').is_file()


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['ldm-ckpt', 'dit-pt'])
def test_sample_on_original_checkpoint(tmp_path, kind):
    config = build(kind, tmp_path)
    result = run_cli(['sample.py', f'--dataset_name={config}', '--sampler_stu=dpmpp', '--num_steps=4',
                      '--seeds=0-2', '--batch=2', f'--outdir={tmp_path / "samples"}'])
    assert 'NFE per image: 3' in result.stdout
    assert (tmp_path / 'samples' / '000000' / '000002.png').is_file()


def test_missing_model_file_names_url_and_place(tmp_path):
    config = write_config(tmp_path, dict(family='edm', model_path='http://127.0.0.1:9/edm-cifar10-32x32-uncond-vp.pkl',
                                         cache_dir=str(tmp_path / 'cache')))
    result = run_cli(['sample.py', f'--dataset_name={config}', f'--outdir={tmp_path / "o"}'], check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and 'cannot download http://127.0.0.1:9/' in last and 'place it at' in last


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['dit', 'sd'])
def test_parallel_sampling_on_tiny_latent_model(tmp_path, kind):
    """sample.py --parallel=taa on a tiny DiT (CFG) and SD folder (CFG, a prompt): the images are the sequential
    solver's to within a PNG level (the parallel solve stops at its final-state tolerance)."""
    import numpy as np
    import PIL.Image
    config = build(kind, tmp_path)
    common = ['sample.py', f'--dataset_name={config}', '--sampler_stu=euler', '--num_steps=11', '--seeds=0-1',
              '--batch=2', *(['--prompt=a red square'] if kind == 'sd' else [])]
    run_cli(common + [f'--outdir={tmp_path / "seq"}'])
    result = run_cli(common + ['--parallel=taa', f'--outdir={tmp_path / "par"}'])
    assert 'taa: sequential rounds' in result.stdout, result.stdout
    for seed in (0, 1):
        a, b = (np.asarray(PIL.Image.open(tmp_path / d / '000000' / f'{seed:06d}.png'), dtype=np.int16)
                for d in ('seq', 'par'))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
