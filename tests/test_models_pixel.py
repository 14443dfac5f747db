"""Pixel-space model families: EDM pickles, guided-diffusion (ADM) state dicts with classifier guidance,
consistency-models EDM networks, safetensors conversion and the download cache.

Every loader is tested on a tiny model of the real architecture, written in the real file format, loaded back
through the public path, and compared with the instance it was written from. Preconditioners and the VP->VE
conversion are checked against closed forms computed here independently (numpy, float64).
"""
import glob
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import ModelError, adm, convert, edm
from models import edm_networks as en
from torch_utils.download import cached_path, open_model_file

RES = 8


@pytest.fixture(autouse=True, scope='module')
def _single_thread():
    # Tiny convolutions gain nothing from threads, and on a busy shared CPU threads make them much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(module, scale=0.05, seed=1):
    # Zero-initialised output layers would hide errors; give every weight a random offset.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


EDM_CASES = {
    'vp-ddpmpp': (en.VPPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                     attn_resolutions=[4], augment_dim=9, dropout=0.1), 0),
    've-ncsnpp': (en.VEPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                     attn_resolutions=[4], embedding_type='fourier', channel_mult_noise=2,
                                     encoder_type='residual', resample_filter=[1, 3, 3, 1]), 0),
    'iddpm-adm': (en.iDDPMPrecond, dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 1],
                                        num_blocks=1, attn_resolutions=[4]), 4),
    'edm-adm-cond': (en.EDMPrecond, dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 1],
                                         num_blocks=1, attn_resolutions=[4], use_fp16=True), 4),
    'edm-ddpmpp-cond': (en.EDMPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                                            num_blocks=1, attn_resolutions=[4], encoder_type='skip',
                                            decoder_type='skip'), 3),
}


def _edm_net(case):
    cls, kwargs, label_dim = EDM_CASES[case]
    torch.manual_seed(0)
    return _perturb(cls(img_resolution=RES, img_channels=3, label_dim=label_dim, **kwargs))


def _inputs(label_dim, batch=3, res=RES, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g) * 2
    sigma = torch.tensor([0.02, 1.5, 40.0])[:batch]
    cond = F.one_hot(torch.arange(batch) % label_dim, label_dim).float() if label_dim else None
    return x, sigma, cond


# ---------------------------------------------------------------------------------------------------------
# Preconditioners against the closed forms of the EDM paper (Table 1).

class _Recorder(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns a fixed F."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, noise_labels, class_labels=None, return_bottleneck=False, **kwargs):
        self.x, self.noise_labels = x, noise_labels
        return (self.out, x) if return_bottleneck else self.out


def _closed_forms(name, sigma, net):
    s = np.asarray(sigma, dtype=np.float64)
    if name == 'VPPrecond':
        bd, bm, M = 19.9, 0.1, 1000
        t = (np.sqrt(bm ** 2 + 2 * bd * np.log1p(s ** 2)) - bm) / bd
        return 1.0, -s, 1 / np.sqrt(s ** 2 + 1), (M - 1) * t
    if name == 'VEPrecond':
        return 1.0, s, np.ones_like(s), np.log(0.5 * s)
    if name == 'EDMPrecond':
        sd = 0.5
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2), \
            np.log(s) / 4
    if name == 'iDDPMPrecond':
        M, C1, C2 = 1000, 0.001, 0.008
        abar = lambda j: np.sin(0.5 * np.pi * j / M / (C2 + 1)) ** 2  # noqa: E731
        u = np.zeros(M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C1) - 1)
        idx = np.abs(s[:, None] - u[None, :]).argmin(1)
        return 1.0, -s, 1 / np.sqrt(s ** 2 + 1), M - 1 - idx
    raise AssertionError(name)


@pytest.mark.parametrize('cls', [en.VPPrecond, en.VEPrecond, en.EDMPrecond, en.iDDPMPrecond])
def test_preconditioner_coefficients_match_closed_forms(cls):
    net = cls(img_resolution=RES, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1],
              num_blocks=1, attn_resolutions=[])
    x = torch.randn(3, 3, RES, RES)
    sigma = torch.tensor([0.03, 0.7, 25.0])
    F_x = torch.randn(3, 6 if cls is en.iDDPMPrecond else 3, RES, RES)
    net.model = _Recorder(F_x)
    D = net(x, sigma).double()
    c_skip, c_out, c_in, c_noise = _closed_forms(cls.__name__, sigma.numpy(), net)
    shape = (-1, 1, 1, 1)
    expect_D = np.reshape(c_skip, shape if np.ndim(c_skip) else ()) * x.double().numpy() + \
        np.reshape(c_out, shape) * F_x[:, :3].double().numpy()
    np.testing.assert_allclose(D.numpy(), expect_D, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.model.x.double().numpy(), np.reshape(c_in, shape) * x.double().numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(net.model.noise_labels.double().numpy(), c_noise, rtol=1e-5, atol=1e-4)


def test_native_sigma_ranges():
    vp = en.VPPrecond(img_resolution=RES, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1)
    # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t = 1e-5 and 1. The class evaluates exp() - 1 in
    # float32 as the original does (0.0009765625 instead of 0.0010005), hence the loose tolerance.
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=3e-2)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-5)
    iddpm = en.iDDPMPrecond(img_resolution=RES, img_channels=3, model_type='SongUNet', model_channels=16,
                            channel_mult=[1], num_blocks=1)
    assert iddpm.round_sigma(torch.tensor([iddpm.sigma_max * 1.01])).item() == pytest.approx(iddpm.sigma_max)


# ---------------------------------------------------------------------------------------------------------
# EDM persistence pickles.

@pytest.mark.parametrize('case', sorted(EDM_CASES))
def test_edm_pickle_round_trip(case, tmp_path):
    net = _edm_net(case)
    path = tmp_path / f'edm-{case}.pkl'
    edm.save_persistence_pickle(path, net)
    den = models.load_denoiser(model_path=str(path), family='edm')
    label_dim = EDM_CASES[case][2]
    x, sigma, cond = _inputs(label_dim)

    # The bottleneck is the last encoder block's output: capture it independently with a hook.
    last_block = [name for name in net.model.enc if 'aux' not in name][-1]
    captured = []
    hook = net.model.enc[last_block].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        ref = net(x, sigma, cond)
        out, feature = den(x, sigma, cond, return_bottleneck=True)
    hook.remove()
    assert torch.equal(out, ref)
    assert torch.equal(feature, captured[0].mean(dim=1).flatten(1))
    assert feature.shape == (3, (RES // 2) ** 2)
    assert den.sample_shape == (3, RES, RES) and den.label_dim == label_dim
    assert type(den.net) is type(net) and den.net.init_kwargs == net.init_kwargs


def test_edm_pickle_structure_matches_persistence_format(tmp_path):
    path = tmp_path / 'net.pkl'
    edm.save_persistence_pickle(path, _edm_net('vp-ddpmpp'))
    data = edm.read_persistence_pickle(path)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    record = data['ema']
    assert isinstance(record, edm.PersistentRecord) and record.class_name == 'VPPrecond'
    assert 'class SongUNet' in record.module_src  # carried, never executed
    assert {'_init_args', '_init_kwargs', '_parameters', '_buffers', '_modules'} <= set(record.state)
    assert record.state['_modules']['model'].class_name == 'SongUNet'
    assert data['loss_fn'].class_name == 'EDMLoss'


def test_edm_iddpm_exposes_sigma_table(tmp_path):
    path = tmp_path / 'iddpm.pkl'
    net = _edm_net('iddpm-adm')
    edm.save_persistence_pickle(path, net)
    den = edm.load(str(path))
    table = den.sigma_table
    assert len(table) == 1000 and bool((table[1:] > table[:-1]).all())
    assert table[0].item() == pytest.approx(net.sigma_min) and table[-1].item() == pytest.approx(net.sigma_max)


def test_edm_sigma_range_override(tmp_path):
    path = tmp_path / 'net.pkl'
    edm.save_persistence_pickle(path, _edm_net('vp-ddpmpp'))
    den = models.load_denoiser(model_path=str(path), family='edm', sigma_min=0.002, sigma_max=80)
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)


def test_edm_pickle_with_wrong_weights_is_refused(tmp_path):
    net = _edm_net('vp-ddpmpp')
    path = tmp_path / 'bad.pkl'
    # Claim a different architecture than the weights have.
    net._init_kwargs = dict(net._init_kwargs, model_channels=32)
    edm.save_persistence_pickle(path, net)
    with pytest.raises(ModelError, match='do not fit|our rebuilt network'):
        edm.load(str(path))


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize('func_name', ['os.system', 'builtins.eval', 'builtins.exec', 'subprocess.call'])
def test_malicious_pickle_is_refused_and_nothing_runs(func_name, tmp_path):
    import builtins
    import subprocess
    marker = tmp_path / 'pwned'
    code = f'open({str(marker)!r}, "w").write("x")'
    func, args = {
        'os.system': (os.system, (f'touch {marker}',)),
        'builtins.eval': (builtins.eval, (code,)),
        'builtins.exec': (builtins.exec, (code,)),
        'subprocess.call': (subprocess.call, (['touch', str(marker)],)),
    }[func_name]
    path = tmp_path / 'evil.pkl'
    # Hidden inside an otherwise valid snapshot, next to a real network.
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=_Payload(func, args), loss_fn=None), f)
    with pytest.raises(ModelError, match='not on the allow-list'):
        models.load_denoiser(model_path=str(path), family='edm')
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    net = _edm_net('vp-ddpmpp')
    path = tmp_path / 'src.pkl'
    edm.save_persistence_pickle(path, net)
    # Rewrite the module source stored in the pickle into code with a side effect, as a hostile file would.
    data = open(path, 'rb').read()
    src = __import__('inspect').getsource(en).encode('utf-8')
    evil = f'open({str(marker)!r}, "w").write("x")\n'.encode().ljust(len(src), b'#')
    assert data.count(src) >= 1
    open(path, 'wb').write(data.replace(src, evil))
    den = edm.load(str(path))
    assert not marker.exists()
    assert 'open(' in edm.read_persistence_pickle(path)['ema'].module_src
    x, sigma, _ = _inputs(0)
    with torch.no_grad():
        assert torch.equal(den(x, sigma), net(x, sigma))


def test_restricted_unpickler_reads_tensors_and_refuses_unknown_globals():
    from torch_utils.restricted_pickle import TORCH_TENSOR_GLOBALS, UnsafePickleError, restricted_load
    p = torch.nn.Parameter(torch.randn(2, 3))
    t = torch.arange(12.0).reshape(3, 4)[:, 1:]  # a strided view
    data = restricted_load(io.BytesIO(pickle.dumps({'p': p, 't': t, 'h': t.half()})), TORCH_TENSOR_GLOBALS)
    assert isinstance(data['p'], torch.nn.Parameter) and torch.equal(data['p'], p)
    assert torch.equal(data['t'], t) and data['h'].dtype == torch.float16
    with pytest.raises(UnsafePickleError, match='posix.system|os.system'):
        restricted_load(io.BytesIO(pickle.dumps(_Payload(os.system, ('true',)))), TORCH_TENSOR_GLOBALS)


# ---------------------------------------------------------------------------------------------------------
# guided-diffusion (ADM) and consistency-models networks.

ADM_ARCH = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult='1,2', attention_resolutions='8',
                num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
CLASSIFIER_ARCH = dict(classifier_width=32, classifier_depth=1, classifier_attention_resolutions='8',
                       classifier_num_head_channels=16, classifier_channel_mult='1,2')


def _adm_unet(num_classes=5, learn_sigma=True, **overrides):
    kwargs = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6 if learn_sigma else 3,
                  num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_classes=num_classes,
                  num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
    kwargs.update(overrides)
    torch.manual_seed(3)
    return _perturb(adm.UNetModel(**kwargs), seed=4)


def _adm_classifier(num_classes=5):
    torch.manual_seed(5)
    return _perturb(adm.EncoderUNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=num_classes,
                                         num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                                         num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                                         pool='attention'), seed=6)


def _independent_vp_table():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return abar, np.sqrt((1 - abar) / abar)


def _independent_timestep(sigma):
    abar, _ = _independent_vp_table()
    y = -np.log(abar)
    return np.interp(np.log1p(np.asarray(sigma, dtype=np.float64) ** 2), y, np.arange(1000))


def test_adm_sigma_table_and_timestep_map():
    unet = _adm_unet()
    den = adm.ADMDenoiser(unet, dict(image_size=16), adm.vp_alphas_cumprod('linear', 1000))
    abar, sigmas = _independent_vp_table()
    np.testing.assert_allclose(den.sigma_table.double().numpy(), sigmas, rtol=1e-6)
    assert den.sigma_min == pytest.approx(sigmas[0]) and den.sigma_max == pytest.approx(sigmas[-1])
    # At table entries the timestep is the integer index; between them, linear in log(1 + sigma^2).
    idx = torch.tensor([0, 1, 500, 998, 999])
    t = den.timestep(torch.as_tensor(sigmas)[idx].float())
    np.testing.assert_allclose(t.numpy(), idx.numpy(), atol=2e-3)
    mid = torch.tensor([0.5, 3.0, 60.0])
    np.testing.assert_allclose(den.timestep(mid).numpy(), _independent_timestep(mid.numpy()), atol=1e-3)


def test_adm_round_trip_with_classifier_guidance(tmp_path):
    unet, classifier = _adm_unet(), _adm_classifier()
    torch.save(unet.state_dict(), tmp_path / 'diffusion.pt')
    torch.save(classifier.state_dict(), tmp_path / 'classifier.pt')
    w = 3.0
    den = models.load_denoiser(model_path=str(tmp_path / 'diffusion.pt'), family='adm',
                               classifier_path=str(tmp_path / 'classifier.pt'), guidance_type='cg',
                               guidance_rate=w, **ADM_ARCH, **CLASSIFIER_ARCH)
    assert den.sample_shape == (3, 16, 16) and den.label_dim == 5
    x, sigma, cond = _inputs(5, res=16)
    out, feature = den(x, sigma, cond, return_bottleneck=True)

    # Independent computation on the written instances: VE -> VP input, fractional timestep, first 3 of the
    # 6 output channels as eps, eps - sqrt(1 - abar) * w * grad log p(y | x_t, t), D = x - sigma * eps.
    s = sigma.double().reshape(-1, 1, 1, 1)
    x_vp = (x.double() / (1 + s ** 2).sqrt()).float()
    t = torch.as_tensor(_independent_timestep(sigma.numpy())).float()
    y = cond.argmax(1)
    with torch.no_grad():
        raw = unet(x_vp, t, y)
    assert raw.shape[1] == 6
    x_in = x_vp.clone().requires_grad_(True)
    logp = F.log_softmax(classifier(x_in, t), dim=-1)[torch.arange(3), y].sum()
    grad = torch.autograd.grad(logp, x_in)[0].double()
    eps = raw[:, :3].double() - (s / (1 + s ** 2).sqrt()) * w * grad
    expect = x.double() - s * eps
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-4)
    assert feature.shape == (3, 8 * 8)  # middle block at 16 / 2
    assert not torch.equal(out, models.load_denoiser(model_path=str(tmp_path / 'diffusion.pt'), family='adm',
                                                     **ADM_ARCH)(x, sigma, cond))


def test_adm_unconditional_and_architecture_errors(tmp_path):
    unet = _adm_unet(num_classes=None, learn_sigma=False, use_new_attention_order=True)
    torch.save(unet.state_dict(), tmp_path / 'uncond.pt')
    den = adm.load(str(tmp_path / 'uncond.pt'), use_new_attention_order=True, **ADM_ARCH)
    assert den.label_dim == 0
    x, sigma, _ = _inputs(0, res=16)
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        expect = x - s * unet(x / (1 + s ** 2).sqrt(), torch.as_tensor(_independent_timestep(sigma.numpy())).float())
    torch.testing.assert_close(den(x, sigma), expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match='do not fit'):
        adm.load(str(tmp_path / 'uncond.pt'), **dict(ADM_ARCH, num_res_blocks=2))
    with pytest.raises(ModelError, match='classifier_path'):
        adm.load(str(tmp_path / 'uncond.pt'), guidance_type='cg', **ADM_ARCH)


def test_adm_loading_is_weights_only(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'weight': _Payload(os.system, (f'touch {marker}',))}, tmp_path / 'evil.pt')
    with pytest.raises(ModelError, match='weights-only'):
        adm.load(str(tmp_path / 'evil.pt'), **ADM_ARCH)
    assert not marker.exists()


def test_cm_round_trip(tmp_path):
    # Consistency-models checkpoints store attention projections as 1x1 2-d convs, q/k/v split before heads.
    unet = _adm_unet(num_classes=None, learn_sigma=False, use_scale_shift_norm=False, use_new_attention_order=True,
                     attention_conv_dims=2)
    assert unet.middle_block[1].qkv.weight.ndim == 4
    torch.save(unet.state_dict(), tmp_path / 'edm_bedroom256_ema.pt')
    den = models.load_denoiser(model_path=str(tmp_path / 'edm_bedroom256_ema.pt'), family='cm',
                               **dict(ADM_ARCH, use_scale_shift_norm=False))
    assert (den.sigma_min, den.sigma_max, den.label_dim) == (0.002, 80.0, 0)
    x, sigma, _ = _inputs(0, res=16)
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt()
    with torch.no_grad():
        F_x = unet((c_in * x.double()).float(), 250 * torch.log(sigma))
    torch.testing.assert_close(den(x, sigma).double(), c_skip * x.double() + c_out * F_x.double(),
                               rtol=1e-4, atol=1e-4)


def test_attention_layouts_differ():
    # The two q/k/v channel layouts are genuinely different computations (guards against a no-op flag).
    qkv = torch.randn(2, 3 * 2 * 4, 5)
    a = adm.qkv_attention(qkv, 2, split_heads_first=True)
    b = adm.qkv_attention(qkv, 2, split_heads_first=False)
    assert not torch.allclose(a, b)
    # One head: both layouts are plain softmax(q k^T / sqrt(C)) v.
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]
    ref = torch.einsum('bts,bcs->bct', torch.softmax(torch.einsum('bct,bcs->bts', q, k) / math.sqrt(8), -1), v)
    torch.testing.assert_close(adm.qkv_attention(qkv, 1, split_heads_first=False), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Conversion to safetensors + JSON.

def _check_converted(den, dest, cond=None, res=RES):
    convert.save_converted(den, dest)
    loaded = models.load_denoiser(model_path=f'{dest}.safetensors', family='safetensors')
    assert type(loaded) is type(den)
    x, sigma, _ = _inputs(den.label_dim, res=res)
    out_a, feat_a = den(x, sigma, cond, return_bottleneck=True)
    out_b, feat_b = loaded(x, sigma, cond, return_bottleneck=True)
    assert torch.equal(out_a, out_b) and torch.equal(feat_a, feat_b)
    assert (loaded.sigma_min, loaded.sigma_max, loaded.sample_shape, loaded.label_dim) == \
        (den.sigma_min, den.sigma_max, den.sample_shape, den.label_dim)
    return loaded


@pytest.mark.parametrize('case', ['vp-ddpmpp', 'edm-adm-cond'])
def test_convert_edm(case, tmp_path):
    path = tmp_path / 'net.pkl'
    edm.save_persistence_pickle(path, _edm_net(case))
    den = edm.load(str(path))
    label_dim = EDM_CASES[case][2]
    _check_converted(den, tmp_path / 'converted', _inputs(label_dim)[2])


def test_convert_adm_and_cm(tmp_path):
    torch.save(_adm_unet().state_dict(), tmp_path / 'd.pt')
    torch.save(_adm_classifier().state_dict(), tmp_path / 'c.pt')
    den = adm.load(str(tmp_path / 'd.pt'), classifier_path=str(tmp_path / 'c.pt'), guidance_type='cg',
                   guidance_rate=2.0, **ADM_ARCH, **CLASSIFIER_ARCH)
    loaded = _check_converted(den, tmp_path / 'adm', _inputs(5, res=16)[2], res=16)
    assert loaded.guidance_type == 'cg' and loaded.guidance_rate == 2.0
    cm_unet = _adm_unet(num_classes=None, learn_sigma=False, use_new_attention_order=True, attention_conv_dims=2)
    torch.save(cm_unet.state_dict(), tmp_path / 'cm.pt')
    _check_converted(adm.load_cm(str(tmp_path / 'cm.pt'), **ADM_ARCH), tmp_path / 'cm', res=16)


def test_convert_cli(tmp_path):
    from click.testing import CliRunner
    path = tmp_path / 'net.pkl'
    edm.save_persistence_pickle(path, _edm_net('vp-ddpmpp'))
    result = CliRunner().invoke(convert.main, [f'--src={path}', '--family=edm', f'--dest={tmp_path / "out"}'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / 'out.safetensors') and os.path.isfile(tmp_path / 'out.json')
    with pytest.raises(ModelError, match='missing'):
        convert.load(str(tmp_path / 'nothing.safetensors'))


# ---------------------------------------------------------------------------------------------------------
# Download cache and configs.

def test_open_model_file_local_and_cached(tmp_path):
    local = tmp_path / 'model.pt'
    local.write_bytes(b'x')
    assert open_model_file(str(local)) == str(local)
    with pytest.raises(ModelError, match='does not exist'):
        open_model_file(str(tmp_path / 'missing.pt'))
    url = 'https://example.invalid/models/edm-test.pkl'
    cached = cached_path(url, str(tmp_path / 'cache'))
    os.makedirs(os.path.dirname(cached))
    open(cached, 'wb').write(b'cached')
    assert open_model_file(url, cache_dir=str(tmp_path / 'cache')) == cached  # no network touched


def test_offline_download_names_url_and_destination(tmp_path, monkeypatch):
    for var in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    url = 'http://127.0.0.1:9/edm-unreachable.pkl'  # local port 9 refuses at once: no outside network
    with pytest.raises(ModelError) as info:
        open_model_file(url, cache_dir=str(tmp_path), timeout=5, verbose=False)
    message = str(info.value)
    assert url in message and os.path.join(str(tmp_path), 'edm-unreachable.pkl') in message
    assert not glob.glob(str(tmp_path / '*'))  # no partial file left


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


@pytest.mark.parametrize('name', ['cifar10', 'ffhq', 'afhqv2', 'imagenet64', 'imagenet256', 'lsun_bedroom',
                                  'lsun_cat'])
def test_configs(name):
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, f'{name}.yaml')))
    assert cfg['dataset_name'] == name
    model = cfg['model']
    assert model['family'] in models.FAMILIES and model['model_path'].startswith('https://')
    assert cfg['sample']['solver'] and cfg['sample']['num_steps'] >= 2
    assert cfg['fid_ref'].endswith('.npz')
    if model['family'] in ('adm', 'cm'):
        loader_args = set(adm.ADM_DEFAULTS) | set(adm.CLASSIFIER_DEFAULTS) | {
            'family', 'model_path', 'classifier_path', 'guidance_type', 'guidance_rate', 'clip_denoised',
            'noise_schedule', 'diffusion_steps', 'sigma_min', 'sigma_max'}
        assert set(model) <= loader_args
