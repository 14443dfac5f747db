"""fid.py: Frechet distance against independent implementations, the Inception module and its weight formats,
the ref/calc path on one and two processes, pixel statistics of exact models, bad input, CLIP score."""
import collections
import copyreg
import json
import os
import pickle
import subprocess
import sys
import types
import warnings

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import fid
from models import inception as inc
from torch_utils import distributed as dist
from torch_utils.image_io import ImageSet, atomic_write, seed_from_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Frechet distance ----------------------------------------------------------------------------------------

def fd_sqrtm(mu1, s1, mu2, s2):
    """The classical route (pytorch-fid / EDM): scipy.linalg.sqrtm of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize('case', ['random', 'nearly_singular'])
def test_frechet_distance_matches_sqrtm_and_pytorch_fid(case):
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    d = 96
    n = 5000 if case == 'random' else 40           # 40 samples in 96 dims: covariances of rank 39
    mu1, s1 = random_stats(rng, d, n)
    mu2, s2 = random_stats(rng, d, n)
    if case == 'nearly_singular':
        s1 += 1e-9 * np.eye(d)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref_scipy = fd_sqrtm(mu1, s1, mu2, s2)
        ref_pfid = float(calculate_frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(ref_scipy, rel=1e-6)
    assert ours == pytest.approx(ref_pfid, rel=1e-6)


def test_frechet_distance_exact_cases():
    # Commuting (diagonal) covariances have a closed form: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.0]), np.array([4.0, 1.0, 9.0, 2.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 0, 2.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(1)
    mu, s = random_stats(rng, 50, 200)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, s, mu[:10], s[:10, :10])


# -- Inception module and weight files -----------------------------------------------------------------------

def pytorch_fid_network():
    """pytorch-fid's FID Inception architecture (its own classes), without downloading weights."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models.inception import Inception3
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return net.eval()


def pytorch_fid_features(net, x299):
    """pool3 features of pytorch-fid's network for an already resized, normalized input."""
    for name in ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'maxpool1', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
                 'maxpool2', 'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
                 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c', 'avgpool']:
        x299 = getattr(net, name)(x299)
    return x299.flatten(1)


@pytest.fixture(scope='module')
def random_inception():
    """Our module with random weights of sensible scale (so features are not all zero)."""
    net = inc.InceptionV3()
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith('.var'):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith('.scale'):
            state[k] = torch.ones(v.shape)        # the TF graph (and EDM's file) have no batch-norm scale
        elif v.ndim == 4:
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.1
    net.load_state_dict(state)
    return net


@pytest.fixture(scope='module')
def test_images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8, generator=g)


@pytest.mark.slow
def test_architecture_matches_pytorch_fid(random_inception, test_images):
    """Same weights in pytorch-fid's own network give the same pool3 features (independent architecture)."""
    theirs = pytorch_fid_network()
    theirs.load_state_dict(inc.ours_to_pytorch_fid(random_inception.state_dict()), strict=False)
    with torch.no_grad():
        ours = random_inception(test_images)
        ref = pytorch_fid_features(theirs, random_inception.preprocess(test_images))
    assert ours.shape == (2, 2048) and ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_resize_is_tensorflow_bilinear():
    """grid_sample formulation == TF1 resize_bilinear written out: src = dst * in/out, clamped."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 5, 7, generator=g, dtype=torch.float64)
    size = 11

    def axis(n_in):
        src = torch.arange(size, dtype=torch.float64) * n_in / size
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, src - i0

    (y0, y1, fy), (x0, x1, fx) = axis(5), axis(7)
    rows = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]
    expected = rows[..., x0] * (1 - fx) + rows[..., x1] * fx
    torch.testing.assert_close(inc.resize_tf_bilinear(x, size), expected, rtol=1e-12, atol=1e-12)


class _PersistentImitation(pickle.Pickler):
    """Writes a module tree the way EDM/StyleGAN3's inception-2015-12-05.pkl is written: our network classes as
    torch_utils.persistence objects (meta with module source and the module __dict__), torch's layers as plain
    pickled modules, tensors with torch's own reducers. The TF graph has no batch-norm scale: it is dropped."""
    reconstruct = None

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Sequential):
            state = dict(obj.__dict__)
            return copyreg._reconstructor, (torch.nn.Sequential, object, None), state
        if isinstance(obj, torch.nn.Module):
            state = dict(obj.__dict__)
            if isinstance(obj, inc.ConvBN):
                state['_parameters'] = collections.OrderedDict(
                    (k, v) for k, v in obj._parameters.items() if k != 'scale')
            meta = dict(type='class', version=6, module_src='raise RuntimeError("module source executed")',
                        class_name=type(obj).__name__, state=state)
            return self.reconstruct, (meta,)
        return NotImplemented


def save_edm_pickle(net, path, monkeypatch):
    def _reconstruct_persistent_obj(meta):
        raise AssertionError('the loader must not call the real reconstruct function')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake = types.ModuleType('torch_utils.persistence')
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, 'torch_utils.persistence', fake)
    pickler_cls = type('P', (_PersistentImitation,), {'reconstruct': staticmethod(_reconstruct_persistent_obj)})
    with open(path, 'wb') as f:
        pickler_cls(f, protocol=3).dump(net)
    monkeypatch.delitem(sys.modules, 'torch_utils.persistence')


@pytest.mark.slow
def test_weight_formats_load_identically(random_inception, test_images, tmp_path, monkeypatch):
    import safetensors.torch
    ours = {k: v.contiguous() for k, v in random_inception.state_dict().items()}
    theirs = pytorch_fid_network()
    theirs.load_state_dict(inc.ours_to_pytorch_fid(ours), strict=False)
    files = {
        'pytorch-fid.pth': lambda p: torch.save(theirs.state_dict(), p),
        'ours.safetensors': lambda p: safetensors.torch.save_file(ours, p),
        'pytorch-fid.safetensors': lambda p: safetensors.torch.save_file(
            {k: v.contiguous() for k, v in theirs.state_dict().items()}, p),
        'edm.pkl': lambda p: save_edm_pickle(random_inception, p, monkeypatch),
        'stylegan2-ada.pt': lambda p: torch.jit.save(torch.jit.script(random_inception), p),
    }
    with torch.no_grad():
        expected = random_inception(test_images)
    for name, save in files.items():
        path = str(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            save(path)
        det = fid.make_detector(path, (3, 24, 20), 'cpu')               # the public path
        for k, v in ours.items():
            assert torch.equal(det.net.state_dict()[k], v), (name, k)
        with torch.no_grad():
            assert torch.equal(det(test_images), expected.to(torch.float64)), name
        os.remove(path)


def test_pickle_loader_runs_no_code(tmp_path):
    marker = tmp_path / 'marker'
    payload = b'cos\nsystem\n(S"touch ' + str(marker).encode() + b'"\ntR.'
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(payload)
    with pytest.raises(inc.DetectorError, match='not an FID Inception-v3'):
        inc.load_inception(str(bad))
    assert not marker.exists()


def test_missing_detector_is_one_clear_error(tmp_path):
    folder = make_images(tmp_path / 'img', 4, (8, 8))
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    missing = str(tmp_path / 'nowhere' / 'inception-2015-12-05.pkl')
    r = CliRunner().invoke(fid.main, ['calc', f'--images={folder}', f'--ref={tmp_path / "ref.npz"}', '--num=4',
                                      f'--detector={missing}', '--workers=0'])
    assert r.exit_code != 0
    assert missing in r.output and inc.DETECTOR_URL in r.output and '--detector' in r.output


# -- image sets, ref and calc ---------------------------------------------------------------------------------

def make_images(folder, count, hw, channels=3, seed=0, start=0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        sub = os.path.join(folder, f'{i - i % 100:06d}')         # nested like sample.py's subdirs
        os.makedirs(sub, exist_ok=True)
        shape = hw + ((channels,) if channels == 3 else ())
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(os.path.join(sub, f'{i:06d}.png'))
    return str(folder)


def direct_pixel_stats(folder, names):
    x = np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n))).transpose(2, 0, 1) for n in names])
    f = x.reshape(len(names), -1).astype(np.float64) / 127.5 - 1
    return f.mean(0), np.cov(f, rowvar=False)


def test_image_set_readers_and_subset(tmp_path):
    folder = make_images(tmp_path / 'img', 30, (4, 5))
    full = ImageSet(folder)
    assert len(full) == 30 and full.shape == (3, 4, 5) and full.names == sorted(full.names)
    sub = ImageSet(folder, max_size=10, seed=3)
    idx = np.arange(30)
    np.random.RandomState(3).shuffle(idx)
    assert sub.names == [full.names[i] for i in sorted(idx[:10])]          # EDM's subset rule
    import zipfile
    with zipfile.ZipFile(tmp_path / 'img.zip', 'w') as z:
        for n in full.names:
            z.write(os.path.join(folder, n), n)
    zipped = ImageSet(str(tmp_path / 'img.zip'))
    arr = np.stack([full[i] for i in range(30)])
    np.savez(tmp_path / 'samples.npz', arr_0=arr.transpose(0, 2, 3, 1))   # ADM's NHWC sample files
    npz = ImageSet(str(tmp_path / 'samples.npz'))
    for i in (0, 17, 29):
        assert np.array_equal(zipped[i], full[i]) and np.array_equal(npz[i], full[i])
    assert seed_from_name('000100/000123.png') == 123


def run_fid(*args, nproc=1, env=None):
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, 'fid.py'), *args]
    else:
        # '--' keeps torchrun's own parser off the script's options (it would read --num as an abbreviation
        # of its --numa-binding).
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '--',
               os.path.join(ROOT, 'fid.py'), *args]
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', **(env or {}))
    full_env.pop('WORLD_SIZE', None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.mark.slow
def test_ref_and_calc_one_and_two_processes(tmp_path):
    folder = make_images(tmp_path / 'img', 301, (8, 8))
    env = {'FID_CACHE_DIR': str(tmp_path / 'cache')}
    common = ['--detector=pixels', '--batch=32', '--workers=0', '--no-cache']
    r1 = run_fid('ref', f'--data={folder}', f'--dest={tmp_path / "one.npz"}', *common, env=env)
    assert r1.returncode == 0, r1.stderr
    r2 = run_fid('ref', f'--data={folder}', f'--dest={tmp_path / "two.npz"}', *common, nproc=2, env=env)
    assert r2.returncode == 0, r2.stderr
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    mu, sigma = direct_pixel_stats(folder, ImageSet(folder).names)
    np.testing.assert_allclose(one['mu'], mu, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(one['sigma'], sigma, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-10, atol=1e-13)
    # calc on a seeded subset, two processes, against the full set's statistics
    r3 = run_fid('calc', f'--images={folder}', f'--ref={tmp_path / "one.npz"}', '--num=250', '--seed=5', *common,
                 nproc=2, env=env)
    assert r3.returncode == 0, r3.stderr
    sub = ImageSet(folder, max_size=250, seed=5)
    expected = fid.frechet_distance(*direct_pixel_stats(folder, sub.names), one['mu'], one['sigma'])
    assert float(r3.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_inception_ref_then_calc(random_inception, tmp_path):
    import safetensors.torch
    weights = tmp_path / 'inception.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_inception.state_dict().items()}, str(weights))
    data = make_images(tmp_path / 'data', 3, (16, 16), seed=1)
    gen = make_images(tmp_path / 'gen', 4, (16, 16), seed=2)
    opts = [f'--detector={weights}', '--workers=0', '--batch=4']
    runner = CliRunner(env={'FID_CACHE_DIR': str(tmp_path / 'cache')})
    r = runner.invoke(fid.main, ['ref', f'--data={data}', f'--dest={tmp_path / "ref.npz"}', *opts])
    assert r.exit_code == 0, r.output
    r = runner.invoke(fid.main, ['calc', f'--images={gen}', f'--ref={tmp_path / "ref.npz"}', '--num=3', *opts])
    assert r.exit_code == 0, r.output
    value = float(r.output.strip().splitlines()[-1])

    def stats(folder, names):
        x = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(os.path.join(folder, n))).transpose(2, 0, 1)
                                       for n in names]))
        with torch.no_grad():
            return fid.feature_stats(random_inception(x).double())

    ref = np.load(tmp_path / 'ref.npz')
    np.testing.assert_allclose(ref['mu'], stats(data, ImageSet(data).names)[0], rtol=1e-5, atol=1e-6)
    expected = fid.frechet_distance(*stats(gen, ImageSet(gen, max_size=3).names), ref['mu'], ref['sigma'])
    assert value == pytest.approx(expected, rel=1e-4)
    # Re-scoring the same files reads the cached statistics.
    r = runner.invoke(fid.main, ['calc', f'--images={gen}', f'--ref={tmp_path / "ref.npz"}', '--num=3', *opts])
    assert 'Using cached statistics' in r.output and float(r.output.strip().splitlines()[-1]) == value


def test_feature_cache_reuses_and_invalidates(tmp_path):
    folder = make_images(tmp_path / 'img', 10, (4, 4))
    runner = CliRunner(env={'FID_CACHE_DIR': str(tmp_path / 'cache')})
    args = ['ref', f'--data={folder}', f'--dest={tmp_path / "r.npz"}', '--detector=pixels', '--workers=0']
    first = runner.invoke(fid.main, args)
    assert first.exit_code == 0 and 'cached' not in first.output
    second = runner.invoke(fid.main, args)
    assert 'Using cached statistics' in second.output
    make_images(tmp_path / 'img', 1, (4, 4), seed=9, start=3)        # rewrite one file: new statistics
    os.utime(os.path.join(folder, '000000', '000003.png'), ns=(1, 1))
    third = runner.invoke(fid.main, args)
    assert third.exit_code == 0 and 'cached' not in third.output
    np.testing.assert_allclose(np.load(tmp_path / 'r.npz')['mu'],
                               direct_pixel_stats(folder, ImageSet(folder).names)[0], rtol=1e-12)


@pytest.mark.parametrize('problem', ['empty', 'mixed', 'no_mu', 'wrong_dim', 'too_few'])
def test_bad_input_is_one_clear_error(problem, tmp_path):
    folder = tmp_path / 'img'
    os.makedirs(folder)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(48), sigma=np.eye(48))
    num = 5
    expect = {'empty': 'contains no images', 'mixed': 'images differ in size', 'no_mu': 'missing mu',
              'wrong_dim': 'do not match', 'too_few': 'expected at least 5'}[problem]
    if problem != 'empty':
        make_images(folder, 5 if problem != 'too_few' else 3, (4, 4))
    if problem == 'mixed':
        make_images(folder, 1, (4, 6), start=7)
    if problem == 'no_mu':
        np.savez(ref, sigma=np.eye(48))
    if problem == 'wrong_dim':
        np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    r = CliRunner(env={'FID_CACHE_DIR': str(tmp_path / 'cache')}).invoke(
        fid.main, ['calc', f'--images={folder}', f'--ref={ref}', f'--num={num}', '--detector=pixels', '--workers=0'])
    assert r.exit_code != 0
    assert expect in r.output and 'Traceback' not in r.output


# -- pixel statistics of exact models ------------------------------------------------------------------------

class StandInGaussian:
    """A data distribution with known mean and covariance (the protocol of models/analytic.py)."""

    def __init__(self, shape=(3, 2, 2), seed=0):
        g = torch.Generator().manual_seed(seed)
        d = int(np.prod(shape))
        self.shape = shape
        self.mean = 0.3 * torch.tanh(torch.randn(d, generator=g, dtype=torch.float64))
        a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.02      # pixels stay well inside [-1, 1]
        self.cov = a @ a.T + 0.01 * torch.eye(d, dtype=torch.float64)
        self.chol = torch.linalg.cholesky(self.cov)

    def data_mean(self):
        return self.mean

    def data_covariance(self):
        return self.cov

    def sample_data(self, n, generator=None):
        z = torch.randn(n, self.mean.shape[0], generator=generator, dtype=torch.float64)
        return (self.mean + z @ self.chol.T).reshape(n, *self.shape)


def test_pixel_reference_stats_and_exact_samples():
    net = StandInGaussian()
    mu, sigma = fid.pixel_reference_stats(net)
    np.testing.assert_array_equal(mu, net.mean.numpy())
    np.testing.assert_allclose(np.diag(sigma - net.cov.numpy()), fid.QUANTIZATION_VARIANCE, rtol=1e-12)
    g = torch.Generator().manual_seed(3)
    n = 20000
    samples = net.sample_data(n, g)
    d = mu.shape[0]
    # Sampling floor: E||mu_hat - mu||^2 = tr(Sigma)/n, and the covariance term is of the same order * d.
    floor = np.trace(sigma) * d / n
    exact = fid.pixel_fd(samples, mu, sigma)
    assert 0 <= exact < 3 * floor
    # Quantization: PNG rounding changes each pixel by a uniform error of width 1/127.5 (measured variance).
    err = fid.to_uint8(samples).double() / 127.5 - 1 - samples
    assert err.var().item() == pytest.approx(fid.QUANTIZATION_VARIANCE, rel=0.05)
    assert abs(err.mean().item()) < 1e-4
    # A distribution 20% too narrow is far outside the floor.
    shrunk = net.mean.reshape(1, *net.shape) + 0.8 * (samples - net.mean.reshape(1, *net.shape))
    assert fid.pixel_fd(shrunk, mu, sigma) > 10 * floor


def test_ref_from_dataset_name(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, 'load_dataset_model', lambda name: StandInGaussian())
    r = CliRunner().invoke(fid.main, ['ref', '--dataset_name=standin', f'--dest={tmp_path / "s.npz"}'])
    assert r.exit_code == 0, r.output
    mu, sigma = fid.pixel_reference_stats(StandInGaussian())
    saved = np.load(tmp_path / 's.npz')
    np.testing.assert_array_equal(saved['mu'], mu)
    np.testing.assert_array_equal(saved['sigma'], sigma)


# -- helpers -------------------------------------------------------------------------------------------------

def test_distributed_helpers_single_process():
    dist.init()
    assert not dist.is_initialized() and dist.get_rank() == 0 and dist.get_world_size() == 1
    batches = dist.rank_batches(10, 3)
    assert torch.equal(torch.cat(batches), torch.arange(10)) and max(len(b) for b in batches) <= 3
    x = torch.arange(6.).reshape(3, 2)
    assert torch.equal(dist.all_gather(x), x) and torch.equal(dist.all_reduce_sum(x), x)
    assert dist.all_gather_object({'a': 1}) == [{'a': 1}]


def test_atomic_write(tmp_path):
    path = tmp_path / 'sub' / 'f.bin'
    atomic_write(path, b'abc')
    atomic_write(path, lambda f: f.write(b'xyz'))
    assert path.read_bytes() == b'xyz' and os.listdir(tmp_path / 'sub') == ['f.bin']
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda f: (f.write(b'partial'), 1 / 0))
    assert path.read_bytes() == b'xyz' and os.listdir(tmp_path / 'sub') == ['f.bin']


# -- CLIP score ----------------------------------------------------------------------------------------------

TINY_CLIP = {'embed_dim': 16,
             'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16, 'patch_size': 16},
             'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}


def tiny_open_clip(folder, name, seed, weights_name):
    """A random-weight open_clip model of TINY_CLIP registered as `name` (its JSON config written to folder) and
    its state dict saved as safetensors: (config path, model, weights path)."""
    import open_clip
    import safetensors.torch
    config = folder / f'{name}.json'
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = folder / weights_name
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, model, weights


def test_clip_score_matches_direct_computation(tmp_path):
    import open_clip
    config, model, weights = tiny_open_clip(tmp_path, 'tiny-clip-test', 0, 'tiny.safetensors')
    folder = make_images(tmp_path / 'img', 5, (32, 32))
    prompts = ['a red cube', 'a photo of a cat', 'two dogs']
    (tmp_path / 'prompts.txt').write_text('\n'.join(prompts) + '\n')
    r = CliRunner().invoke(fid.main, ['clip', f'--images={folder}', f'--prompts={tmp_path / "prompts.txt"}',
                                      '--clip_model=tiny-clip-test', f'--clip_weights={weights}',
                                      f'--clip_config={config}', '--batch=2'])
    assert r.exit_code == 0, r.output
    score = float(r.output.strip().splitlines()[-1].split(':')[1])
    # Independent: open_clip's own model and preprocessing, prompt line = seed mod 3.
    model.eval()
    _, _, preprocess = open_clip.create_model_and_transforms('tiny-clip-test')
    tok = open_clip.get_tokenizer('tiny-clip-test')
    names = ImageSet(folder).names
    with torch.no_grad():
        img = torch.stack([preprocess(PIL.Image.open(os.path.join(folder, n))) for n in names])
        txt = tok([prompts[int(os.path.basename(n)[:6]) % 3] for n in names])
        ie = model.encode_image(img, normalize=True).double()
        te = model.encode_text(txt, normalize=True).double()
    assert score == pytest.approx(float((100 * (ie * te).sum(-1)).mean()), rel=1e-5)


# -- reward-model scores ---------------------------------------------------------------------------------------

def test_score_equals_the_reward_models_own_forward(tmp_path):
    """fid.py score: an HPS-shaped open_clip file (cosine of open_clip's own features of the PNGs) and the analytic
    model's exact class posterior (of the images read back), with the file/option errors as one line."""
    import open_clip
    from models.analytic import digit_mixture
    config, model, weights = tiny_open_clip(tmp_path, 'tiny-hps-score', 1, 'hps.safetensors')
    model.eval()
    folder = make_images(tmp_path / 'img', 5, (32, 32), seed=2)
    prompts = ['a red cube', 'a photo of a cat', 'two dogs']
    (tmp_path / 'prompts.txt').write_text('\n'.join(prompts) + '\n')
    base = ['score', f'--images={folder}', f'--prompts={tmp_path / "prompts.txt"}', '--scorer=hps',
            f'--model_config={config}', '--batch=2']
    r = CliRunner().invoke(fid.main, base + [f'--option=hps.weights_path={weights}',
                                             '--option=hps.arch=tiny-hps-score'])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith('hps score:') and '(standard error, 5 images)' in line, line
    got = float(line.split(':')[1].split('+-')[0])
    _, _, preprocess = open_clip.create_model_and_transforms('tiny-hps-score')
    tok = open_clip.get_tokenizer('tiny-hps-score')
    names = ImageSet(folder).names
    with torch.no_grad():
        img = torch.stack([preprocess(PIL.Image.open(os.path.join(folder, n))) for n in names])
        txt = tok([prompts[int(os.path.basename(n)[:6]) % 3] for n in names])
        cos = (model.encode_image(img, normalize=True) * model.encode_text(txt, normalize=True)).sum(-1).double()
    assert got == pytest.approx(float(cos.mean()), rel=1e-5, abs=1e-6)
    # Exact class posterior of the gmm_digits model for class 3 on real samples of class 3 and of class 5.
    net = digit_mixture()
    g = torch.Generator().manual_seed(0)
    x = torch.cat([net.sample_data(3, g, label=3), net.sample_data(3, g, label=5)])
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    digits = tmp_path / 'digits'
    digits.mkdir()
    for i, a in enumerate(u8):
        PIL.Image.fromarray(a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()).save(
            digits / f'{i:06d}.png')
    r = CliRunner().invoke(fid.main, ['score', f'--images={digits}', '--scorer=class_posterior',
                                      '--dataset_name=gmm_digits', '--class=3'])
    assert r.exit_code == 0, r.output
    got = float(r.output.strip().splitlines()[-1].split(':')[1].split('+-')[0])
    want = net.class_log_posterior(u8.double() / 127.5 - 1)[:, 3].exp()
    assert got == pytest.approx(float(want.mean()), rel=1e-9) and 0.3 < got < 0.7      # 3 right, 3 wrong
    # Bad input: one line naming the option.
    for extra, message in [(['--option=weights_path=x'], "must read hps.KEY=VALUE"),
                           ([f'--option=hps.weights_path={tmp_path / "none.pt"}'], '--option hps.weights_path'),
                           (['--scorer=nope'], '--scorer=nope: unknown'),
                           (['--scorer=neg_error', '--dataset_name=gmm_digits'], 'a reward of training.rl')]:
        r = CliRunner().invoke(fid.main, base + extra)
        assert r.exit_code != 0 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
