"""Grids ending at sigma = 0 and the bridges to other calling conventions, checked against exact answers."""
import pytest
import torch

import solvers
from solvers.noise import ImageNoise


def latents(net, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *net.sample_shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize('name', sorted(n for n in solvers.SOLVERS if n in (
    'euler', 'heun', 'dpm', 'dpmpp', 'unipc', 'deis', 'ipndm', 'ipndm_v')))
def test_grid_ending_at_zero(gmm_2d, name):
    z = latents(gmm_2d)
    sigmas = solvers.get_schedule(33, 0.002, 80.0).double()
    zero_ended = torch.cat([sigmas, sigmas.new_zeros(1)])
    out = solvers.sample(gmm_2d, z, name, sigmas=zero_ended, lower_order_final=False)
    assert torch.isfinite(out).all()
    # A final Euler step from s to 0 is x + (0 - s) (x - D) / s = D(x; s): the state at sigmas[-1], denoised.
    before = solvers.sample(gmm_2d, z, name, sigmas=sigmas, lower_order_final=False)
    torch.testing.assert_close(out, gmm_2d(before, sigmas[-1]), rtol=0, atol=1e-12)
    # ... and it lands near the exact ODE solution at sigma = 0 (the exact flow of x at sigma_min, denoised).
    x_end = solvers.solve_exact(gmm_2d, z * sigmas[0], sigmas[0], sigmas[-1])
    assert (out - gmm_2d(x_end, sigmas[-1])).abs().max() < (0.2 if name == 'euler' else 0.03)


@pytest.mark.parametrize('grid', [[80.0, 10.0, 10.0, 0.002], [80.0, 1.0, 5.0, 0.002], [80.0, 1.0, -0.1],
                                  [80.0, 0.0, 0.0], [80.0, 0.0], [80.0, float('nan'), 0.1]])
def test_bad_grid_refused(gmm_2d, grid):
    with pytest.raises(ValueError, match='sigma'):
        solvers.sample(gmm_2d, latents(gmm_2d, 2), 'heun', sigmas=torch.tensor(grid, dtype=torch.float64))


# -- the k-diffusion calling convention -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits():
    from models.analytic import digit_mixture
    return digit_mixture(components_per_class=2, rank=3, size=8)


def k_cfg_model(net):
    """A denoiser written the k-diffusion way (model(x, sigma, **extra_args), sigma of shape [B]): classifier-free
    guidance over the class-conditional mixture as k-diffusion's CFGDenoiser does it, one batched call on
    [uncond; cond]. It reads only the mixture's exact conditional posterior mean."""
    def model(x, sigma, cond=None, cond_scale=1.0):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        B = x.shape[0]
        prior = net.class_prior().expand(B, -1)
        flat = torch.cat([x, x]).reshape(2 * B, -1)
        both = net._posterior_mean(flat, torch.cat([sigma, sigma]), net._component_log_prior(
            torch.cat([prior, cond]), 2 * B)).reshape(2 * B, *x.shape[1:])
        uncond, conditional = both[:B], both[B:]
        return uncond + (conditional - uncond) * cond_scale
    return model


def guided(net, rate):
    from models.analytic import digit_mixture
    return digit_mixture(components_per_class=2, rank=3, size=8, guidance_type='cfg', guidance_rate=rate)


def labels(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.one_hot(torch.randint(10, (n,), generator=g), 10).double()


@pytest.fixture(scope='module')
def guided_case(digits):
    """The guided mixture, latents, labels, a 13-point grid and the exact guided ODE solution at its end."""
    net = guided(digits, 2.0)
    z, y = latents(net, 6), labels(6)
    sigmas = solvers.get_schedule(13, net.sigma_min, net.sigma_max).double()
    return net, z, y, sigmas, solvers.solve_exact(net, z * sigmas[0], sigmas[0], sigmas[-1], cond=y)


@pytest.mark.parametrize('name', sorted(solvers.SOLVERS))
@pytest.mark.parametrize('ends_at_zero,afs', [(False, False), (True, False), (False, True)])
def test_k_sampler_matches_sample(digits, guided_case, name, ends_at_zero, afs):
    net, z, y, sigmas, exact = guided_case
    if ends_at_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        exact = net(exact, net.sigma_min, y)
    extra = dict(noise=ImageNoise(range(z.shape[0]))) if solvers.SOLVERS[name].stochastic else {}
    if extra and afs:
        with pytest.raises(ValueError, match='ODE solvers only'):
            solvers.sample(net, z, name, sigmas=sigmas, cond=y, afs=afs, **extra)
        return
    if name == 'sed_ref' and ends_at_zero:
        with pytest.raises(ValueError, match='drop denoise_to_zero'):
            solvers.sample(net, z, name, sigmas=sigmas, cond=y, **extra)
        return
    ref = solvers.sample(net, z, name, sigmas=sigmas, cond=y, afs=afs, **extra)
    fn = solvers.k_sampler(name, afs=afs, **extra)
    out = fn(k_cfg_model(digits), z * sigmas[0], sigmas, extra_args={'cond': y, 'cond_scale': 2.0})
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # Not a self-comparison only: the run lands near the exact guided ODE solution (at sigma_min, or denoised
    # there when the grid ends at 0); the solvers' errors at 12 steps are 0.015-0.065 RMS. (AFS assumes
    # zero-mean data; the digits' dark background makes its first step up to 0.4 RMS off for multistep methods.)
    # (An SDE sampler's path is not the ODE's: for those the bridge is checked against solvers.sample only.)
    if not afs and not extra:
        assert (out - exact).pow(2).mean().sqrt() < 0.1


@pytest.mark.parametrize('options', [dict(max_order=2, lower_order_final=False), dict(predict_x0=False)])
def test_k_sampler_options_reach_the_solver(digits, options):
    net = guided(digits, 2.0)
    z, y = latents(net, 4), labels(4)
    sigmas = solvers.get_schedule(6, net.sigma_min, net.sigma_max).double()
    out = solvers.k_sampler('dpmpp', **options)(k_cfg_model(digits), z * sigmas[0], sigmas,
                                                {'cond': y, 'cond_scale': 2.0})
    torch.testing.assert_close(out, solvers.sample(net, z, 'dpmpp', sigmas=sigmas, cond=y, **options), rtol=0,
                               atol=1e-12)
    assert not torch.allclose(out, solvers.sample(net, z, 'dpmpp', sigmas=sigmas, cond=y), atol=1e-6)


def predictor_settings(kind, **kw):
    s = dict(dataset_name='gmm_digits', sampler_stu='epd' if kind == 'epd' else 'amed', sampler_tea='euler',
             num_steps=4, M=1, num_points=3, afs=False, scale_dir=0.3, scale_time=0.3, fcn=False, loss='l2',
             alpha=10, schedule_type='polynomial', schedule_rho=7, sigma_min=0.002, sigma_max=80.0, max_order=3,
             sample_shape=[3, 8, 8], feature_dim=64)
    s.update(kw)
    return s


@pytest.mark.parametrize('kind,student', [('epd', 'epd'), ('epd', 'ipndm'), ('amed', 'amed'), ('amed', 'dpmpp')])
@pytest.mark.parametrize('ends_at_zero', [False, True])
def test_k_sampler_runs_learned_predictors(digits, kind, student, ends_at_zero):
    from training.predictors import PREDICTORS
    pred = PREDICTORS[kind](predictor_settings(kind, sampler_stu=student), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():        # tables away from their initial values, so every entry matters
        for p in pred.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=p.dtype))
    net = guided(digits, 2.0)
    z, y = latents(net, 5), labels(5)
    ref = solvers.sample(net, z, predictor=pred, cond=y)
    sigmas = pred.schedule(net).double()
    if ends_at_zero:
        ref = net(ref, sigmas[-1], y)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    out = solvers.k_sampler(pred)(k_cfg_model(digits), z * sigmas[0], sigmas, extra_args={'cond': y,
                                                                                           'cond_scale': 2.0})
    # 1e-11: the two paths add the guided terms in different orders (measured up to 1.4e-12 apart)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match='trained for 4 time points'):
        solvers.k_sampler(pred)(k_cfg_model(digits), z * 80, solvers.get_schedule(6, 0.002, 80.0).double(),
                                {'cond': y, 'cond_scale': 2.0})


@pytest.mark.parametrize('name', ['euler', 'heun', 'dpmpp'])
def test_k_sampler_callback(digits, name):
    z, y = latents(digits, 3), labels(3)
    sigmas = torch.cat([solvers.get_schedule(5, 0.002, 80.0).double(), torch.zeros(1, dtype=torch.float64)])
    seen = []
    solvers.k_sampler(name)(k_cfg_model(digits), z * sigmas[0], sigmas, {'cond': y}, callback=seen.append,
                            disable=True)
    assert [s['i'] for s in seen] == list(range(len(sigmas) - 1))
    for step in seen:
        assert float(step['sigma']) == float(sigmas[step['i']])
        torch.testing.assert_close(step['denoised'], digits(step['x'], step['sigma'], y), rtol=0, atol=1e-12)
    if name == 'euler':     # Euler's evaluated states are its states: the first is the initial state
        assert torch.equal(seen[0]['x'], z * sigmas[0])


@pytest.mark.parametrize('args,match', [
    (('rk45',), 'unknown solver'),
    (('dpmpp', dict(max_order=5)), 'max_order=5'),
    (('heun', dict(num_steps=5)), 'unknown option.*num_steps'),
    ((42,), 'solver name or a trained predictor'),
])
def test_k_sampler_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        solvers.k_sampler(args[0], **(args[1] if len(args) > 1 else {}))


def test_k_sampler_refuses_a_bad_grid(digits):
    fn = solvers.k_sampler('heun')
    with pytest.raises(ValueError, match='strictly decreasing'):
        fn(k_cfg_model(digits), latents(digits, 2), torch.tensor([80.0, 1.0, 5.0, 0.0], dtype=torch.float64),
           {'cond': labels(2)})


# -- diffusers pipelines in memory ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_folders(tmp_path_factory):
    from tests.test_models_latent import BUILDERS
    root = tmp_path_factory.mktemp('tiny_pipelines')
    return {family: build(str(root / family)) for family, build in BUILDERS.items()}


def module_storage(*modules):
    return {p.data_ptr() for m in modules for p in list(m.parameters()) + list(m.buffers())}


@pytest.mark.parametrize('family', ['sd', 'ldm', 'dit', 'sd3', 'flux'])
def test_from_pipeline_equals_the_folder_and_shares_storage(tiny_folders, family):
    import diffusers
    import models
    from tests.test_models_latent import TINY_OPTIONS
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_folders[family])
    net = models.from_pipeline(pipe, **TINY_OPTIONS[family])
    ref = models.load_denoiser(model_path=tiny_folders[family], family=family, **TINY_OPTIONS[family])
    assert type(net) is type(ref) and net.sample_shape == ref.sample_shape
    assert (net.sigma_min, net.sigma_max, net.flow_shift) == (ref.sigma_min, ref.sigma_max, ref.flow_shift)
    # The same modules, not copies: every parameter and buffer of the denoiser's modules lives in the pipeline's
    # storage (the denoiser's own buffer, its log sigma table, is the only addition).
    pipe_modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert module_storage(*net.children()) <= module_storage(*pipe_modules)
    assert {name for name, _ in net.named_buffers() if '.' not in name} <= {'log_sigma_table'}
    assert net.network is (pipe.unet if family in ('sd', 'ldm') else pipe.transformer)
    if hasattr(ref, 'encode_prompts') and ref.prompt_keys:
        cond_net, cond_ref = net.encode_prompts(['a cat', 'a dog']), ref.encode_prompts(['a cat', 'a dog'])
    elif ref.label_dim:
        cond_net = cond_ref = torch.nn.functional.one_hot(torch.tensor([3, 7]), ref.label_dim).float()
    else:
        cond_net = cond_ref = None
    x = torch.randn(2, *ref.sample_shape, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([ref.sigma_max, 1.0])
    with torch.no_grad():
        out, out_ref = net(x, sigma, cond_net), ref(x, sigma, cond_ref)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(net.decode(out), ref.decode(out_ref), rtol=0, atol=1e-6)
        # A change to the pipeline's weights is seen by the denoiser (shared, not copied).
        for weight in (pipe.unet if family in ('sd', 'ldm') else pipe.transformer).parameters():
            weight.add_(0.05)
        assert not torch.allclose(net(x, sigma, cond_net), out, atol=1e-4)


def test_from_pipeline_runs_a_predictor(tiny_folders):
    import diffusers
    import models
    from training.predictors import EPDPredictor
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_folders['sd'])
    net = models.from_pipeline(pipe, guidance_rate=3.0)
    ref = models.load_denoiser(model_path=tiny_folders['sd'], family='sd', guidance_rate=3.0)
    pred = EPDPredictor(predictor_settings('epd', dataset_name='sd', sample_shape=list(net.sample_shape),
                                           sigma_min=net.sigma_min, sigma_max=net.sigma_max))
    z = torch.randn(2, *net.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = solvers.sample(net, z, predictor=pred, cond=net.encode_prompts(['a cat', 'a dog']))
        out_ref = solvers.sample(ref, z, predictor=pred, cond=ref.encode_prompts(['a cat', 'a dog']))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)


def test_from_pipeline_bad_input(tiny_folders):
    import diffusers
    import models
    from models import ModelError
    with pytest.raises(ModelError, match='takes a diffusers pipeline'):
        models.from_pipeline(object())
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_folders['dit'])
    with pytest.raises(ModelError, match='takes no dtype'):
        models.from_pipeline(pipe, dtype='bf16')
    with pytest.raises(ModelError, match='does not take option.*prompt_file'):
        models.from_pipeline(pipe, prompt_file='x')
