"""The shipped reference tables (exps/ref-*): each folder is what training/reference_tables.py writes, its tables are
the published numbers in that script, the transcription agrees with the other published numbers (probe times,
stored grid), and the CIFAR-10 ones sample on an EDM-shaped model as the reference's own update does."""
import json
import os
import types

import pytest
import torch

import configs
import training
from tests.conftest import ROOT, run_cli
from tests.test_reference_predictors import ref_epd_loop
from training import reference_tables as rt

EXPS = os.path.join(ROOT, 'exps')
SHIPPED = sorted(d for d in os.listdir(EXPS) if d.startswith('ref-'))


def test_every_table_is_shipped_and_regenerates_byte_identically(tmp_path):
    assert SHIPPED == sorted(rt.TABLES)
    rt.write_all(str(tmp_path))
    for name in SHIPPED:
        for f in (training.SETTINGS_FILE, training.PREDICTOR_FILE):
            with open(os.path.join(EXPS, name, f), 'rb') as a, open(tmp_path / name / f, 'rb') as b:
                assert a.read() == b.read(), f'{name}/{f} differs from what the script writes'


@pytest.mark.parametrize('name', sorted(rt.TABLES))
def test_shipped_folder_loads_with_the_published_numbers(name):
    spec = rt.TABLES[name]
    predictor = training.load_predictor(os.path.join(EXPS, name))
    s = predictor.settings
    assert json.loads(json.dumps(spec['settings'])) == {k: v for k, v in s.items()}
    assert configs.load_config(s['config'])['dataset_name'] == s['dataset_name']
    for n in range(s['num_steps'] - 1):
        r, c, a, w = predictor.table(n)
        torch.testing.assert_close(r, torch.tensor(spec['r'][n], dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(w, torch.tensor(spec['w'][n], dtype=torch.float64), rtol=0, atol=1e-12)
        if 'c' in spec:
            torch.testing.assert_close(c, torch.tensor(spec['c'][n], dtype=torch.float64), rtol=0, atol=1e-12)
            torch.testing.assert_close(a, torch.tensor(spec['a'][n], dtype=torch.float64), rtol=0, atol=1e-12)
        else:
            assert torch.all(c == 1) and torch.all(a == 1)
    # What a published table must satisfy: positions in (0, 1), weights summing to 1 at the published rounding.
    assert all(0 < v < 1 for row in spec['r'] for v in row)
    assert all(abs(sum(row) - 1) < 2e-5 for row in spec['w'])


def test_transcription_agrees_with_the_published_probe_times_and_grid():
    # The record lists the probe times s = t_{n+1}^r t_n^{1-r} of the CIFAR-10 NFE-5 table on the float64 grid.
    grid = [80.0, 6.95024, 1.2867, 0.002]
    published = [[73.744, 11.453], [6.1153, 2.3918], [0.10535, 0.69905]]
    r = rt.TABLES['ref-cifar10-epd-nfe5']['r']
    for n in range(3):
        for k in range(2):
            s = grid[n + 1] ** r[n][k] * grid[n] ** (1 - r[n][k])
            assert abs(s / published[n][k] - 1) < 2e-4, (n, k, s)
    # The grid stored in the reference's snapshots (float32 time_uniform): 80.0, 6.950278, 1.286681, 0.0020132.
    ours = rt.reference_time_uniform(4, 0.002, 80.0)
    for got, want in zip(ours, ['80.0', '6.950278', '1.286681', '0.0020132']):
        assert round(got, len(want.split('.')[1])) == float(want)     # equal at the published rounding
    assert rt.TABLES['ref-cifar10-epd-nfe5']['settings']['t_steps'] == ours


def test_flow_tables_end_where_the_reference_schedulers_end():
    for name, shift, t_last in (('ref-sd3-1024-epd-rl-best', 3.0, 0.0089286),
                                ('ref-flux-epd-rl-best', 3.158193, 0.0031511)):
        predictor = training.load_predictor(os.path.join(EXPS, name))
        assert predictor.settings['ode_space'] == 'flow'
        t = predictor.schedule(types.SimpleNamespace(flow_shift=shift))
        t = t / (1 + t)
        assert abs(float(t[-1]) / t_last - 1) < 1e-4 and float(t[0]) > 0.9996
        assert torch.all(t[1:] < t[:-1])


def ref_plugin_loop(D, z, t, tables, max_order=3):
    """The reference EPD-Plugin on iPNDM (probes by Adams-Bashforth extrapolation of past slopes), with AFS."""
    coeffs = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}
    r, c, a, w = tables
    x, history = z * t[0], []
    for n in range(len(t) - 1):
        d = x / torch.sqrt(1 + t[n] ** 2) if n == 0 else (x - D(x, t[n])) / t[n]
        p = min(max_order, len(history) + 1)
        direction = sum(cf * v for cf, v in zip(coeffs[p], [d] + history))
        step = torch.zeros_like(x)
        for k in range(2):
            s = t[n + 1] ** r[n][k] * t[n] ** (1 - r[n][k])
            y = x + (s - t[n]) * direction
            step = step + w[n][k] * c[n][k] * (y - D(y, a[n][k] * s)) / s
        history = ([d] + history)[:max_order - 1]
        x = x + (t[n + 1] - t[n]) * step
    return x


@pytest.mark.parametrize('name', [n for n in sorted(rt.TABLES) if n.startswith('ref-cifar10')])
def test_cifar_tables_sample_on_an_edm_shaped_model(tmp_path, name):
    import models
    from tests.helpers_models import write_edm_pickle
    net = models.load_denoiser(model_path=write_edm_pickle(tmp_path / 'tiny.pkl', resolution=32), family='edm')
    net = net.double()
    predictor = training.load_predictor(os.path.join(EXPS, name))
    predictor.check_model(net)
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out = predictor.sample(net, z)
        spec = rt.TABLES[name]
        grid = torch.tensor(spec['settings']['t_steps'], dtype=torch.float64)
        tables = [torch.tensor(spec[k], dtype=torch.float64) for k in ('r', 'c', 'a', 'w')]
        D = lambda x, s: net(x, torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0]))
        loop = ref_epd_loop(D, z, grid, tables, afs=True) if spec['settings']['sampler_stu'] == 'epd' else \
            ref_plugin_loop(D, z, grid, tables)
    assert torch.isfinite(out).all() and out.std() > 0.1
    torch.testing.assert_close(out, loop, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_sample_py_with_a_shipped_table(tmp_path):
    from tests.helpers_models import write_edm_pickle
    model = write_edm_pickle(tmp_path / 'tiny.pkl', resolution=32)
    run_cli(['sample.py', '--predictor_path=exps/ref-cifar10-epd-nfe5', f'--model_path={model}', '--seeds=0-1',
             '--subdirs=False', f'--outdir={tmp_path}/out'])
    assert sorted(n for n in os.listdir(tmp_path / 'out') if n.endswith('.png')) == ['000000.png', '000001.png']
    settings = json.loads((tmp_path / 'out' / 'sample_options.json').read_text())['settings']
    assert (settings['solver'], settings['num_steps'], settings['schedule_type']) == ('epd', 4, 'time_uniform')


def test_sd15_grid_matches_the_reference_interpolation():
    """The reference's discrete schedule (rho = 1): uniform continuous time tau in [1/1000, 1], sigma(tau) from
    log sqrt(alpha_bar) interpolated linearly between tau_k = k / 1000. Ours interpolates log sigma by index."""
    import numpy as np
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    log_sqrt_alpha = 0.5 * torch.log(alphas).numpy()
    tau = np.linspace(1.0, 1e-3, 11)
    lsa = np.interp(tau, np.arange(1, 1001) / 1000, log_sqrt_alpha)
    ref = np.sqrt(1 - np.exp(2 * lsa)) / np.exp(lsa)
    predictor = training.load_predictor(os.path.join(EXPS, 'ref-sd15-epd-rl-best'))
    net = types.SimpleNamespace(sigma_table=((1 - alphas) / alphas).sqrt())
    ours = predictor.schedule(net).numpy()
    assert np.abs(ours / ref - 1).max() < 4e-6
    assert abs(ours[0] - 14.6146) < 1e-4 and abs(ours[-1] - 0.029167) < 1e-6


@pytest.mark.parametrize('name', ['ref-cifar10-epd-nfe5', 'ref-sd3-1024-epd-rl-best'])
def test_reference_afs_and_flow_tables_solve_in_parallel(name):
    """The reference AFS (no network call) and the flow-space update are affine in the state: parallel-in-time
    solving reaches the sequential output."""
    from solvers.parallel import parallel_sample
    from tests.test_reference_predictors import Gaussian
    net = Gaussian(0.3).double()
    net.flow_shift = 3.0
    predictor = training.load_predictor(os.path.join(EXPS, name))
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ref = predictor.sample(net, latents)
    x, _ = parallel_sample(net, latents, predictor=predictor, method='taa', final_tol=0.0)
    torch.testing.assert_close(x, ref, atol=1e-9, rtol=0)
