"""fid.py on the inputs a new user gets wrong: one line naming the problem and the fix, a non-zero exit, no
traceback, nothing written; and the README's sample-then-score sequence with --grid=True."""
import os
import stat

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import fid
from tests.conftest import run_cli


def make_pngs(folder, n, size=(4, 4)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        PIL.Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i:06d}.png'))
    return folder


def invoke(args, tmp_path):
    result = CliRunner(env={'FID_CACHE_DIR': str(tmp_path / 'cache')}).invoke(fid.main, args)
    assert result.exit_code != 0, result.output
    assert 'Traceback' not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    # Besides progress lines on stdout, the error is one line.
    errors = [line for line in lines if line.startswith('Error')]
    assert len(errors) == 1 and all(line.startswith(('Error: ', 'Calculating ')) for line in lines), lines
    return errors


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_calc_names_an_unreadable_png(tmp_path, damage):
    folder = make_pngs(str(tmp_path / 'img'), 5, size=(16, 16))
    bad = os.path.join(folder, '000003.png')
    data = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        # truncated: the header (and so the size check) is intact, decoding fails; garbage: not an image at all
        f.write(data[:len(data) // 2] if damage == 'truncated' else b'not a png at all')
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(768), sigma=np.eye(768))
    for workers in ('0', '1'):            # in the main process and in a DataLoader worker
        lines = invoke(['calc', f'--images={folder}', f'--ref={ref}', '--num=5', '--detector=pixels',
                        f'--workers={workers}', '--no-cache'], tmp_path)
        assert len(lines) == 1 and '000003.png' in lines[0] and 'remove or regenerate it' in lines[0], lines


@pytest.mark.parametrize('case', ['folder', 'under_file', 'unwritable'])
def test_ref_refuses_a_bad_dest_before_any_work(tmp_path, case, monkeypatch):
    folder = make_pngs(str(tmp_path / 'img'), 3)
    if case == 'folder':
        dest, expect = tmp_path / 'out', 'is a folder; give the file to write'
        os.makedirs(dest)
    elif case == 'under_file':
        (tmp_path / 'afile').write_text('x')
        dest, expect = tmp_path / 'afile' / 'sub' / 'ref.npz', 'is a file, not a folder'
    else:
        locked = tmp_path / 'locked'
        os.makedirs(locked)
        os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
        dest, expect = locked / 'new' / 'ref.npz', 'cannot write in'
        if os.geteuid() == 0:                  # root writes through permissions, not into /proc
            dest = '/proc/forbidden/ref.npz'
    computed = []
    monkeypatch.setattr(fid, 'compute_stats', lambda *a, **k: computed.append(1))
    before = sorted(os.listdir(tmp_path))
    lines = invoke(['ref', f'--data={folder}', f'--dest={dest}', '--detector=pixels', '--workers=0'], tmp_path)
    assert len(lines) == 1 and expect in lines[0] and '--dest=' in lines[0], lines
    assert not computed and sorted(os.listdir(tmp_path)) == before
    if case == 'unwritable':
        assert os.listdir(tmp_path / 'locked') == []


@pytest.mark.parametrize('args,expect', [
    (['--dataset_name=nope'], "unknown dataset_name 'nope'; known:"),
    (['--dataset_name=cifar10', '--detector=pixels'], 'exact pixel statistics need an analytic model'),
    (['--dataset_name=cifar10'], "this model is family 'edm'; compute reference statistics from dataset images"),
])
def test_ref_dataset_name_errors(tmp_path, args, expect, monkeypatch):
    # Nothing may be downloaded: the family is checked on the config.
    import models.loading
    monkeypatch.setattr(models.loading, 'load_model', lambda *a, **k: pytest.fail('a model was loaded'))
    lines = invoke(['ref', *args, f'--dest={tmp_path / "r.npz"}'], tmp_path)
    assert len(lines) == 1 and expect in lines[0], lines
    assert not os.path.exists(tmp_path / 'r.npz')


@pytest.mark.slow
def test_readme_sample_with_grid_then_calc(tmp_path):
    # README: sample with --grid=True, exact pixel statistics of the analytic model, then score the folder.
    run_cli(['sample.py', '--sampler_stu=dpmpp', '--num_steps=6', '--schedule_type=logsnr', '--seeds=0-7',
             '--grid=True'], cwd=str(tmp_path))
    outdir = tmp_path / 'samples' / 'gmm_image' / 'dpmpp_nfe5_logsnr'
    assert (tmp_path / 'samples' / 'gmm_image' / 'dpmpp_nfe5_logsnr.grid.png').is_file()
    assert not (outdir / 'grid.png').exists()
    env = {'FID_CACHE_DIR': str(tmp_path / 'cache')}
    run_cli(['fid.py', 'ref', '--dataset_name=gmm_image', '--detector=pixels', '--dest=gmm.npz'], cwd=str(tmp_path),
            env=env)
    result = run_cli(['fid.py', 'calc', f'--images={outdir}', '--ref=gmm.npz', '--detector=pixels', '--num=8',
                      '--workers=0'], cwd=str(tmp_path), env=env)
    assert np.isfinite(float(result.stdout.strip().splitlines()[-1]))
