"""Reference predictor pickles (EPD / EPD-Solver++ / AMED) through the restricted unpickler into our predictors.

The pickles are written here with the reference's module layout: persistent objects through a stand-in
`torch_utils.persistence._reconstruct_persistent_obj` (registered in sys.modules only while pickling), plain torch
submodules, the loss' solver functions as `solvers.<name>` globals, tensors tagged as CUDA tensors. The reference
formulas below (table maps, the looped EPD step, the AMED network, the flow-space update) are written out from the
spec, independently of training/predictors.py and solvers/learned.py.
"""
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import solvers
import training
from models.base import Denoiser
from tests.conftest import run_cli
from training import convert_predictor as cp


# -- the reference's module layout ---------------------------------------------------------------------------

def _never_called(meta):
    raise AssertionError('the loader must not call the persistence function')


_never_called.__module__, _never_called.__qualname__ = 'torch_utils.persistence', '_reconstruct_persistent_obj'
_never_called.__name__ = '_reconstruct_persistent_obj'


class Persistent:
    """What EDM's persistent_class does on pickling: a call of _reconstruct_persistent_obj(meta) with the source."""

    def __reduce__(self):
        meta = dict(type='class', version=6, module_src='raise SystemExit("reference source: never executed")\n',
                    class_name=type(self).__name__, state=dict(self.__dict__))
        return _never_called, (meta,)


class EPD_predictor(Persistent, torch.nn.Module):
    def __init__(self, num_steps=4, num_points=2, scale_dir=0.05, scale_time=0.05, **kwargs):
        super().__init__()
        kwargs = dict(num_steps=num_steps, num_points=num_points, scale_dir=scale_dir, scale_time=scale_time,
                      **kwargs)
        self._init_args, self._init_kwargs = (), dict(kwargs)
        for k, v in kwargs.items():
            setattr(self, k, v)
        shape = (num_steps - 1, num_points)
        self.r_params = torch.nn.Parameter(torch.randn(shape))
        self.scale_dir_params = torch.nn.Parameter(torch.randn(shape))
        self.scale_time_params = torch.nn.Parameter(torch.randn(shape))
        self.weight_s = torch.nn.Parameter(torch.randn(shape))
        self.sigmoid = torch.nn.Sigmoid()
        self.softmax = torch.nn.Softmax(dim=-1)


class EPD_loss(Persistent):
    def __init__(self, t_steps, **kwargs):
        self._init_args, self._init_kwargs = (), dict(kwargs)
        self.__dict__.update(kwargs)
        self.t_steps, self.buffer_model, self.buffer_t, self.lpips = t_steps, [], None, None


class Linear(Persistent, torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self._init_args, self._init_kwargs = (in_features, out_features), {}
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(out_features))


class PositionalEmbedding(Persistent, torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self._init_args, self._init_kwargs = (), dict(num_channels=num_channels, endpoint=endpoint)
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint


class AMED_predictor(Persistent, torch.nn.Module):
    def __init__(self, scale_dir=0.01, scale_time=0.2, **kwargs):
        super().__init__()
        kwargs = dict(scale_dir=scale_dir, scale_time=scale_time, **kwargs)
        self._init_args, self._init_kwargs = (), dict(kwargs, hidden_dim=128)
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.map_noise = PositionalEmbedding(8, endpoint=True)
        self.map_layer0 = Linear(8, 8)
        self.enc_layer0, self.enc_layer1 = Linear(64, 128), Linear(128, 4)
        self.fc_r = Linear(20, 1)
        if scale_dir:
            self.fc_scale_dir = Linear(20, 1)
        if scale_time:
            self.fc_scale_time = Linear(20, 1)
        self.sigmoid = torch.nn.Sigmoid()


def epd_sampler_ref():
    raise AssertionError('never called')


epd_sampler_ref.__module__, epd_sampler_ref.__qualname__ = 'solvers', 'epd_parallel_sampler'


@pytest.fixture
def reference_layout(monkeypatch):
    """The reference's module names, present only while the test pickles."""
    persistence = types.ModuleType('torch_utils.persistence')
    persistence._reconstruct_persistent_obj = _never_called
    monkeypatch.setitem(sys.modules, 'torch_utils.persistence', persistence)
    monkeypatch.setattr(solvers, 'epd_parallel_sampler', epd_sampler_ref, raising=False)


@pytest.fixture
def cuda_tags():
    """Storages saved while active carry the location tag 'cuda:0' (as the reference's snapshots on a GPU)."""
    state = {'on': False}
    entry = (0, lambda obj: 'cuda:0' if state['on'] else None, lambda obj, location: None)
    torch.serialization._package_registry.insert(0, entry)
    yield state
    torch.serialization._package_registry.remove(entry)


EPD_KWARGS = dict(dataset_name='cifar10', img_resolution=32, sampler_stu='epd', sampler_tea='heun', M=3,
                  guidance_type=None, guidance_rate=0.0, schedule_type='time_uniform', schedule_rho=1.0, afs=True,
                  max_order=3, predict_x0=True, lower_order_final=True, fcn=False, alpha=10)
CIFAR_GRID = torch.tensor([80.0, 6.950278, 1.286681, 0.0020132])


def write_snapshot(path, cuda_tags, fmt='pickle', predictor=None, with_loss=True):
    torch.manual_seed(0)
    predictor = predictor if predictor is not None else EPD_predictor(**EPD_KWARGS)
    data = dict(model=predictor.eval().requires_grad_(False))
    if with_loss:
        data['loss_fn'] = EPD_loss(CIFAR_GRID.clone(), num_steps=4, solver_stu=epd_sampler_ref, M=3)
    dump_on_gpu(path, cuda_tags, data, fmt)
    return predictor


def dump_on_gpu(path, cuda_tags, data, fmt='pickle'):
    """Write `data` as the reference's training loop does (pickle.dump, or torch.save), its tensors tagged as CUDA."""
    cuda_tags['on'] = True
    try:
        with open(path, 'wb') as f:
            if fmt == 'pickle':
                pickle.dump(data, f)
            else:
                torch.save(data, f)
    finally:
        cuda_tags['on'] = False


# -- the reference formulas --------------------------------------------------------------------------------

def ref_tables(p, sd=0.05, st=0.05):
    """(r, c, a, w) of the reference EPD_predictor from its raw parameters, float64."""
    f = lambda t: t.detach().double()
    sig = lambda x: 1 / (1 + torch.exp(-x))
    r = sig(f(p.r_params))
    c = 2 * sig(0.5 * f(p.scale_dir_params)) * sd + (1 - sd)
    a = 2 * sig(0.5 * f(p.scale_time_params)) * st + (1 - st)
    e = torch.exp(f(p.weight_s))
    return r, c, a, e / e.sum(1, keepdim=True)


def ref_epd_loop(D, z, t, tables, afs):
    """The reference epd_sampler (looped over the K points), VE form."""
    r, c, a, w = tables
    x = z * t[0]
    for n in range(len(t) - 1):
        d = x / torch.sqrt(1 + t[n] ** 2) if afs and n == 0 else (x - D(x, t[n])) / t[n]
        step = torch.zeros_like(x)
        for k in range(r.shape[1]):
            s = t[n + 1] ** r[n, k] * t[n] ** (1 - r[n, k])
            y = x + (s - t[n]) * d
            step = step + w[n, k] * c[n, k] * (y - D(y, a[n, k] * s)) / s
        x = x + (t[n + 1] - t[n]) * step
    return x


class Gaussian(Denoiser):
    """Data N(0, v I): D(x, sigma) = v x / (v + sigma^2) exactly; sample shape 3x32x32."""
    sample_shape = (3, 32, 32)
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, v=0.25):
        super().__init__()
        self.v = v

    def denoise(self, x, sigma, cond=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.v * x / (self.v + s ** 2), None


# -- EPD ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['pickle', 'torch.save'])
def test_epd_snapshot_with_cuda_tensors_converts(tmp_path, reference_layout, cuda_tags, fmt):
    pkl = tmp_path / 'network-snapshot-000010.pkl'
    ref = write_snapshot(pkl, cuda_tags, fmt)
    raw = pkl.read_bytes()
    assert b'cuda:0' in raw and b'_reconstruct_persistent_obj' in raw
    predictor = training.load_predictor(str(pkl))
    assert type(predictor).__name__ == 'EPDPredictor'
    # The raw tables are the file's, bit for bit (float32 -> float64 is exact).
    for ours, theirs in (('r_params', 'r_params'), ('scale_dir_params', 'scale_dir_params'),
                         ('scale_time_params', 'scale_time_params'), ('weight_params', 'weight_s')):
        assert torch.equal(getattr(predictor, ours), getattr(ref, theirs).double())
    expected = ref_tables(ref)
    for n in range(3):
        for got, want in zip(predictor.table(n), expected):
            torch.testing.assert_close(got, want[n], rtol=1e-13, atol=1e-15)
    s = predictor.settings
    assert (s['num_steps'], s['num_points'], s['afs'], s['scale_dir'], s['scale_time'], s['config']) == \
        (4, 2, True, 0.05, 0.05, 'cifar10')
    # The grid the table was trained on (the loss' t_steps, a CUDA tensor in the file) is the predictor's grid.
    assert torch.equal(predictor.schedule(None), CIFAR_GRID.double())
    assert predictor.nfe() == 5 and s['sample_shape'] == [3, 32, 32]


def test_sampling_equals_direct_predictor_and_reference_loop(tmp_path, reference_layout, cuda_tags):
    pkl = tmp_path / 'snap.pkl'
    ref = write_snapshot(pkl, cuda_tags)
    converted = training.load_predictor(str(pkl))
    direct = training.EPDPredictor({k: v for k, v in converted.settings.items() if k != 'source'})
    with torch.no_grad():
        direct.r_params.copy_(ref.r_params)
        direct.scale_dir_params.copy_(ref.scale_dir_params)
        direct.scale_time_params.copy_(ref.scale_time_params)
        direct.weight_params.copy_(ref.weight_s)
    net = Gaussian().double()
    z = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = converted.sample(net, z)
    assert torch.equal(out, direct.sample(net, z))
    # The reference's looped update, its AFS formula x / sqrt(1 + t^2) included (afs_formula 'reference').
    D = lambda x, s: net(x, torch.as_tensor(s, dtype=x.dtype))
    loop = ref_epd_loop(D, z, CIFAR_GRID.double(), ref_tables(ref), afs=True)
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    # Our AFS (the exact N(0, I) slope x t / (1 + t^2)) is another solver at this precision.
    converted.settings['afs_formula'] = 'ours'
    assert (converted.sample(net, z) - loop).abs().max() > 1e-3


def test_plugin_and_plain_class_pickle(tmp_path, reference_layout, cuda_tags, monkeypatch):
    """An EPD-Plugin (ipndm) predictor pickled as a plain class of training.networks (no persistence)."""
    networks = types.ModuleType('training.networks')

    class Plain(torch.nn.Module):
        pass
    Plain.__module__, Plain.__qualname__, Plain.__name__ = 'training.networks', 'EPD_predictor', 'EPD_predictor'
    networks.EPD_predictor = Plain
    monkeypatch.setitem(sys.modules, 'training.networks', networks)
    torch.manual_seed(3)
    src = EPD_predictor(**dict(EPD_KWARGS, sampler_stu='ipndm', sampler_tea='dpm', scale_time=0.2))
    plain = Plain()
    plain.__dict__.update({k: v for k, v in src.__dict__.items()})
    pkl = tmp_path / 'plugin.pkl'
    dump_on_gpu(pkl, cuda_tags, {'model': plain})
    predictor = training.load_predictor(str(pkl))
    assert predictor.settings['sampler_stu'] == 'ipndm' and predictor.settings['scale_time'] == 0.2
    # No stored grid: the reference sampler's own float32 time_uniform grid, not the float64 one.
    grid = predictor.schedule(None)
    assert round(float(grid[-1]), 7) == 0.0020132 and round(float(grid[1]), 6) == 6.950278
    got = predictor.table(1)
    want = ref_tables(src, 0.05, 0.2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w[1], rtol=1e-13, atol=1e-15)


def test_converter_writes_the_folder_atomically(tmp_path, reference_layout, cuda_tags, capsys):
    pkl = tmp_path / 'run' / 'network-snapshot-000010.pkl'
    pkl.parent.mkdir()
    write_snapshot(pkl, cuda_tags)
    (pkl.parent / 'network-snapshot-000004.pkl').write_bytes(b'an older snapshot: not the one taken')
    out = tmp_path / 'converted'
    assert cp.main([str(pkl.parent), str(out)]) == 0          # a run folder: its latest snapshot
    assert json.loads(capsys.readouterr().out)['nfe'] == 5
    assert sorted(os.listdir(out)) == [training.SETTINGS_FILE, training.PREDICTOR_FILE]
    assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []
    a, b = training.load_predictor(str(pkl)), training.load_predictor(str(out))
    assert a.settings == b.settings
    for n in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.table(n), b.table(n)))
    assert cp.main([str(pkl), str(out)]) == 1
    err = capsys.readouterr().err
    assert 'already exists' in err and len(err.strip().splitlines()) == 1
    # A failed conversion leaves nothing behind.
    (tmp_path / 'bad.pkl').write_bytes(b'\x80\x04not a pickle')
    assert cp.main([str(tmp_path / 'bad.pkl'), str(tmp_path / 'never')]) == 1
    assert not (tmp_path / 'never').exists() and [n for n in os.listdir(tmp_path) if n.startswith('.')] == []
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sample_py_takes_the_pickle_directly(tmp_path, reference_layout, cuda_tags):
    """sample.py --predictor_path=<reference pkl> on a tiny 32-px EDM pickle gives the converted folder's images."""
    from tests.helpers_models import write_edm_pickle
    model = write_edm_pickle(tmp_path / 'tiny-edm.pkl', resolution=32)
    pkl = tmp_path / 'network-snapshot-000010.pkl'
    write_snapshot(pkl, cuda_tags)
    run_cli(['-m', 'training.convert_predictor', str(pkl), str(tmp_path / 'conv')])
    common = ['sample.py', f'--model_path={model}', '--seeds=0-2', '--subdirs=False']
    run_cli(common + [f'--predictor_path={pkl}', f'--outdir={tmp_path}/a'])
    run_cli(common + [f'--predictor_path={tmp_path}/conv', f'--outdir={tmp_path}/b'])
    pngs = sorted(n for n in os.listdir(tmp_path / 'a') if n.endswith('.png'))
    assert len(pngs) == 3
    assert all((tmp_path / 'a' / n).read_bytes() == (tmp_path / 'b' / n).read_bytes() for n in pngs)
    options = json.loads((tmp_path / 'a' / 'sample_options.json').read_text())
    assert options['settings']['solver'] == 'epd' and options['settings']['num_steps'] == 4


# -- refusals ------------------------------------------------------------------------------------------------

class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_non_whitelisted_global_is_refused_in_one_line(tmp_path):
    target = tmp_path / 'created-by-the-pickle'
    pkl = tmp_path / 'evil.pkl'
    pkl.write_bytes(pickle.dumps({'model': Evil(str(target))}))
    with pytest.raises(cp.ReferencePickleError, match='not on the allow-list') as e:
        training.load_predictor(str(pkl))
    assert 'makedirs' in str(e.value) and '\n' not in str(e.value)
    proc = run_cli(['sample.py', f'--predictor_path={pkl}', f'--outdir={tmp_path}/out'], check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'allow-list' in proc.stderr
    assert not target.exists() and not (tmp_path / 'out').exists()
    # A solver-function name is accepted only as a name: calling it from the file is refused too.
    call = pickle.dumps({'model': None}).replace(b'N', b'csolvers\nheun_sampler\n)R', 1)
    (tmp_path / 'call.pkl').write_bytes(call)
    with pytest.raises(cp.ReferencePickleError, match='heun_sampler'):
        training.load_predictor(str(tmp_path / 'call.pkl'))


def test_truncated_and_foreign_pickles(tmp_path, reference_layout, cuda_tags):
    pkl = tmp_path / 'snap.pkl'
    write_snapshot(pkl, cuda_tags)
    (tmp_path / 'cut.pkl').write_bytes(pkl.read_bytes()[:len(pkl.read_bytes()) // 2])
    with pytest.raises(cp.ReferencePickleError, match='truncated'):
        training.load_predictor(str(tmp_path / 'cut.pkl'))
    (tmp_path / 'other.pkl').write_bytes(pickle.dumps({'ema': {'weights': [1, 2]}}))
    with pytest.raises(cp.ReferencePickleError, match='not an EPD_predictor or AMED_predictor'):
        training.load_predictor(str(tmp_path / 'other.pkl'))
    from tests.helpers_models import write_edm_pickle
    with pytest.raises(cp.ReferencePickleError, match='VPPrecond.*pass it as --model_path'):
        training.load_predictor(write_edm_pickle(tmp_path / 'edm-model.pkl'))


# -- AMED ----------------------------------------------------------------------------------------------------

def ref_amed_forward(p, h, t_cur, t_next):
    """The reference AMED_predictor.forward, float64."""
    lin = lambda m, x: x @ m.weight.double().t() + m.bias.double()
    freqs = (1 / 10000) ** (torch.arange(4, dtype=torch.float64) / 3)

    def emb(t):
        x = t.reshape(1, 1).double() * freqs
        e = torch.cat([x.sin(), x.cos()], dim=1)     # [cos, sin] swapped
        return torch.nn.functional.silu(lin(p.map_layer0, e)).repeat(h.shape[0], 1)
    u = torch.cat([lin(p.enc_layer1, torch.nn.functional.silu(lin(p.enc_layer0, h.reshape(h.shape[0], -1).double()))),
                   emb(t_cur), emb(t_next)], dim=1)
    sig = torch.sigmoid
    r = sig(lin(p.fc_r, u))[:, 0]
    c = (sig(lin(p.fc_scale_dir, u)) * 2 * p.scale_dir + 1 - p.scale_dir)[:, 0]
    a = (sig(lin(p.fc_scale_time, u)) * 2 * p.scale_time + 1 - p.scale_time)[:, 0]
    return r, c, a


def test_amed_predictor_converts(tmp_path, reference_layout, cuda_tags):
    torch.manual_seed(5)
    ref = AMED_predictor(dataset_name='cifar10', img_resolution=32, num_steps=4, sampler_stu='amed',
                         sampler_tea='heun', M=1, schedule_type='time_uniform', schedule_rho=1.0, afs=True,
                         max_order=None, predict_x0=True, lower_order_final=True).eval()
    pkl = tmp_path / 'amed.pkl'
    dump_on_gpu(pkl, cuda_tags, {'model': ref})
    predictor = training.load_predictor(str(pkl))
    assert type(predictor).__name__ == 'AMEDPredictor' and predictor.settings['feature_dim'] == 64
    h = torch.randn(5, 8, 8, dtype=torch.float64)
    for t_cur, t_next in ((80.0, 6.95), (1.29, 0.002)):
        got = predictor.params(h.reshape(5, 64), torch.tensor(t_cur, dtype=torch.float64),
                               torch.tensor(t_next, dtype=torch.float64))
        want = ref_amed_forward(ref, h, torch.tensor(t_cur, dtype=torch.float64),
                                torch.tensor(t_next, dtype=torch.float64))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # The AFS step (no network call) sees a zero feature, as the reference's predictor was trained with.
    seen = []
    params = predictor.params
    predictor.params = lambda f, tc, tn: (seen.append(f.clone()), params(f, tc, tn))[1]
    net = Gaussian().double()
    predictor.sample(net, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(seen) == 3 and torch.all(seen[0] == 0) and not torch.all(seen[1] == 0)


# -- flow-matching tables (EPD-Solver++ on SD3/FLUX) ---------------------------------------------------------

def test_flow_space_update_is_the_reference_one(tmp_path, reference_layout, cuda_tags):
    """An SD3 RL export runs the reference's update in flow coordinates: x_f = (1 - t) x0 + t n, v = (x_f - D)/t,
    probes geometric in t. Checked on Gaussian data, whose flow-space denoiser is written here directly."""
    torch.manual_seed(7)
    ref = EPD_predictor(num_steps=6, num_points=2, scale_dir=0, scale_time=0, dataset_name='ms_coco',
                        img_resolution=1024, sampler_stu='epd', sampler_tea='dpm', M=1, guidance_type='cfg',
                        guidance_rate=4.5, schedule_type='flowmatch', schedule_rho=1.0, afs=False, max_order=2,
                        predict_x0=False, lower_order_final=True, fcn=False, alpha=10, backend='sd3',
                        backend_config=dict(resolution=1024, torch_dtype='float16'))
    pkl = tmp_path / 'sd3-1024-best.pkl'
    write_snapshot(pkl, cuda_tags, predictor=ref, with_loss=False)
    predictor = training.load_predictor(str(pkl))
    s = predictor.settings
    assert (s['config'], s['ode_space'], s['sample_shape'], s['guidance_rate']) == ('sd3_1024', 'flow',
                                                                                    [16, 128, 128], 4.5)
    v = 0.3
    D_flow = lambda x, t: (1 - t) * v * x / ((1 - t) ** 2 * v + t ** 2)     # E[x0 | x_f] for x0 ~ N(0, v I)
    r, _, _, w = ref_tables(ref, 0, 0)
    t = torch.tensor([0.9997, 0.93, 0.8, 0.55, 0.2, 0.009], dtype=torch.float64)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x = z * t[0]             # the flow state at t[0] for x0 = 0 + noise z; below, the same in VE
    for n in range(len(t) - 1):
        d = (x - D_flow(x, t[n])) / t[n]
        vel = 0
        for k in range(2):
            sk = t[n + 1] ** r[n, k] * t[n] ** (1 - r[n, k])
            y = x + (sk - t[n]) * d
            vel = vel + w[n, k] * (y - D_flow(y, sk)) / sk
        x = x + (t[n + 1] - t[n]) * vel
    sigmas = t / (1 - t)
    net = Gaussian(v).double()
    out = predictor.solve(net, z * sigmas[0], sigmas)     # VE in, VE out
    torch.testing.assert_close(out / (1 + sigmas[-1]), x, rtol=1e-10, atol=1e-10)
    # Its VE-space reading of the same table is a different solver (the flow mode matters).
    predictor.settings['ode_space'] = 've'
    assert (predictor.solve(net, z * sigmas[0], sigmas) / (1 + sigmas[-1]) - x).abs().max() > 1e-3


def test_sd3_grid_is_the_reference_scheduler_grid():
    """diffusers' SD3 scheduler: shift(linspace(1, shift(1/1000), N)), shift 3 (set_timesteps shifts again). Ours
    is the same except that it starts at the model's largest time shift(0.999) instead of 1 (sigma = inf)."""
    shift = lambda u: 3 * u / (1 + 2 * u)
    unshift = lambda t: t / (3 - 2 * t)
    ref = shift(np.linspace(1.0, shift(1e-3), 11))
    sigma_min, sigma_max = cp.flow_sigma_range('sd3')
    net = types.SimpleNamespace(flow_shift=3.0)
    ours = solvers.get_schedule(11, sigma_min, sigma_max, 'flowmatch', 1.0, net=net).numpy()
    t = ours / (1 + ours)
    assert abs(t[-1] - ref[-1]) < 1e-12 and abs(ref[-1] - 0.008929) < 1e-6
    du = unshift(t) - unshift(ref)
    assert np.all(np.abs(du) <= 1e-3 + 1e-12) and abs(du[0] + 1e-3) < 1e-12


def test_first_amed_release_with_fixed_scale_ranges(tmp_path, reference_layout, cuda_tags):
    """The first AMED release has no scale_dir argument: direction scale sigmoid/50 + 0.99 (sigmoid/10 + 0.95 for
    the DPM-Solver++ plugin in data prediction), time scale sigmoid/2.5 + 0.8 when scale_time is on."""
    torch.manual_seed(9)
    ref = AMED_predictor(scale_dir=0.01, scale_time=True, dataset_name='cifar10', num_steps=4, sampler_stu='dpmpp',
                         sampler_tea='dpmpp', M=2, schedule_type='polynomial', schedule_rho=7.0, afs=False,
                         max_order=3, predict_x0=True, lower_order_final=True).eval()
    for d in (ref.__dict__, ref._init_kwargs):
        del d['scale_dir']
    pkl = tmp_path / 'amed-v1.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': ref}, f)
    predictor = training.load_predictor(str(pkl))
    assert (predictor.settings['scale_dir'], predictor.settings['scale_time']) == (0.05, 0.2)
    h = torch.randn(3, 8, 8, dtype=torch.float64)
    t_cur, t_next = torch.tensor(9.7, dtype=torch.float64), torch.tensor(0.47, dtype=torch.float64)
    _, c, a = predictor.params(h.reshape(3, 64), t_cur, t_next)
    ref.scale_dir, ref.scale_time = 0.0, 0.0     # only to reuse the trunk below; the heads are recomputed
    lin = lambda m, x: x @ m.weight.double().t() + m.bias.double()
    freqs = (1 / 10000) ** (torch.arange(4, dtype=torch.float64) / 3)
    emb = lambda t: torch.nn.functional.silu(lin(ref.map_layer0, torch.cat([(t * freqs).sin(), (t * freqs).cos()])
                                                 .reshape(1, 8))).repeat(3, 1)
    trunk = lin(ref.enc_layer1, torch.nn.functional.silu(lin(ref.enc_layer0, h.reshape(3, 64))))
    u = torch.cat([trunk, emb(t_cur), emb(t_next)], dim=1)
    torch.testing.assert_close(c, (torch.sigmoid(lin(ref.fc_scale_dir, u)) / 10 + 0.95)[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(a, (torch.sigmoid(lin(ref.fc_scale_time, u)) / 2.5 + 0.8)[:, 0], rtol=1e-12, atol=0)


def test_legacy_torch_save_is_named(tmp_path):
    path = tmp_path / 'legacy.pkl'
    torch.save({'model': torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(cp.ReferencePickleError, match='legacy torch.save'):
        training.load_predictor(str(path))
