"""Stochastic samplers (solvers/stochastic.py) against exact answers.

Exactness: on a single-Gaussian model N(mu, Sigma) the denoiser is affine in x, so every sampler's step is affine
in the state and in the standard normals it draws; its output is Gaussian. We get that Gaussian exactly (no
Monte-Carlo) by running the sampler on a batch of basis inputs: row 0 starts at the initial mean with all noise
zero, the next rows move the start along the columns of the initial covariance's Cholesky factor, and each further
row sets one coordinate of one noise draw to 1 (the noise source below hands out basis vectors by key). The exact
answer is independent of the solver code: started from the exact noised law N(mu, Sigma + sigma_max^2 I), every
sampler of the reverse SDE (any Langevin rate, churn or none) targets N(mu, Sigma + sigma_min^2 I).
"""
import math

import pytest
import torch

import solvers
from models.analytic import GaussianMixture, image_mixture, planar_mixture
from models.base import Denoiser
from solvers import stochastic
from solvers.noise import ImageNoise

F64 = torch.float64


# -- single-Gaussian models --------------------------------------------------------------------------------------

D_DIM = 6


class Gaussian(Denoiser):
    """The exact denoiser of N(mu, Sigma), Sigma = Q diag(lam) Q^T: D(x; sigma) = mu + Q diag(lam / (lam +
    sigma^2)) Q^T (x - mu), affine in x. (A few matrix products: cheap under forward-mode AD.)"""

    def __init__(self, mu, Q, lam, sample_shape, sigma_min, sigma_max):
        super().__init__()
        self.mu, self.Q, self.lam = mu, Q, lam
        self.sample_shape, self.sigma_min, self.sigma_max = sample_shape, sigma_min, sigma_max

    def denoise(self, x, sigma, cond=None):
        y = (x.reshape(x.shape[0], -1) - self.mu) @ self.Q
        gain = self.lam / (self.lam + sigma.reshape(-1, 1) ** 2)
        return (self.mu + (gain * y) @ self.Q.T).reshape(x.shape), None

    @property
    def covariance(self):
        return (self.Q * self.lam) @ self.Q.T


def gaussian(kind, sigma_min=0.01, sigma_max=20.0):
    """N(mu, Sigma) on 6 dimensions (sample shape 1 x 2 x 3). 'diag': Sigma diagonal in the pixel basis;
    'lowrank': a rank-2 part along random orthonormal directions plus an isotropic floor."""
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(D_DIM, generator=g, dtype=F64)
    if kind == 'diag':
        Q, lam = torch.eye(D_DIM, dtype=F64), torch.tensor([1.5, 0.8, 0.4, 0.2, 0.1, 0.05], dtype=F64)
    else:
        Q = torch.linalg.qr(torch.randn(D_DIM, D_DIM, generator=g, dtype=F64))[0]
        lam = torch.tensor([2.0, 0.5] + [0.0] * (D_DIM - 2), dtype=F64) + 0.05
    return Gaussian(mu, Q, lam, (1, 2, 3), sigma_min, sigma_max)


class BasisNoise:
    """A noise source handing out basis vectors: draw `key` gives row start[key] + j the unit vector e_j (all other
    rows zero). With record=True it hands out zeros and records the keys asked for, in order."""

    def __init__(self, start=None, d=D_DIM):
        self.start, self.d, self.keys = start or {}, d, []

    def __call__(self, key, like):
        key = key if isinstance(key, tuple) else (key,)
        out = torch.zeros_like(like)
        if key in self.start:
            lo = self.start[key]
            out.reshape(out.shape[0], -1)[lo:lo + self.d] = torch.eye(self.d, dtype=like.dtype)
        elif key not in self.keys:
            self.keys.append(key)
        return out


def output_law(solver, model, num_steps, x0_mean, x0_cov, rho=7.0, **options):
    """Mean [d] and covariance [d, d] of the sampler's output when x0 ~ N(x0_mean, x0_cov), exactly (the sampler
    is affine in x0 and in its noise draws on a Gaussian model)."""
    d = D_DIM
    sigmas = solvers.get_schedule(num_steps, model.sigma_min, model.sigma_max, 'polynomial', rho)
    fn = solvers.SOLVERS[solver].fn
    shape = (1, 2, 3)
    probe = BasisNoise()
    fn(model, x0_mean.reshape(1, *shape).clone(), sigmas, noise=probe, schedule_rho=rho, **options)
    start = {key: 1 + d + k * d for k, key in enumerate(probe.keys)}
    rows = 1 + d + len(start) * d
    x0 = x0_mean.expand(rows, d).clone()
    x0[1:1 + d] += torch.linalg.cholesky(x0_cov).T
    noise = BasisNoise(start)
    out = fn(model, x0.reshape(rows, *shape), sigmas, noise=noise, schedule_rho=rho, **options).reshape(rows, d)
    assert not noise.keys, f"{solver} drew other noise keys on the second pass: {noise.keys}"
    cols = out[1:] - out[0]
    return out[0], cols.T @ cols


def weak_error(mean, cov, mean_ref, cov_ref):
    """|mean error| + |covariance error|_F: zero only for the exact law, and of the order of the weak error of
    test functions up to second degree."""
    return float((mean - mean_ref).norm() + (cov - cov_ref).norm())


def matrix_power(S, p):
    """S^p for a symmetric positive definite S."""
    w, Q = torch.linalg.eigh(S)
    return (Q * w ** p) @ Q.T


def sde_law(model, beta, x0_mean, x0_cov, sigma_end=None):
    """The exact law at sigma_end (default sigma_min) of the reverse SDE dx = (1 + beta) f dsigma +
    sqrt(2 beta sigma) dW from x0 ~ N(x0_mean, x0_cov) at sigma_max, in closed form: with y = x - mu and
    S(sigma) = Sigma + sigma^2 I the drift is (1 + beta) sigma S^-1 y, so y's transition matrix is
    Phi = (S_end S_max^-1)^((1 + beta) / 2), and since the law N(0, S) is carried along exactly,
    Cov = S_end + Phi (x0_cov - S_max) Phi."""
    Sigma, mu = model.covariance, model.mu
    eye = torch.eye(D_DIM, dtype=F64)
    s_end = model.sigma_min if sigma_end is None else sigma_end
    S_end, S_max = Sigma + s_end ** 2 * eye, Sigma + model.sigma_max ** 2 * eye
    Phi = matrix_power(S_end, (1 + beta) / 2) @ matrix_power(S_max, -(1 + beta) / 2)   # the factors commute
    return mu + Phi @ (x0_mean - mu), S_end + Phi @ (x0_cov - S_max) @ Phi.T


def errors(solver, model, steps, start='sampler', target_beta=None, sigma_end=None, **options):
    """Weak errors of the sampler's output after each number of steps in `steps` (num_steps = steps + 1).
    start='sampler': x0 ~ N(0, sigma_max^2 I), as sample() starts, against the closed-form law of the SDE of
    Langevin rate target_beta (the sampler's own beta unless given). start='exact': x0 ~ N(mu, Sigma + sigma_max^2 I),
    against the noised data law N(mu, Sigma + sigma_end^2 I), the target of every marginal-preserving sampler."""
    eye = torch.eye(D_DIM, dtype=F64)
    if start == 'sampler':
        x0_mean, x0_cov = torch.zeros(D_DIM, dtype=F64), model.sigma_max ** 2 * eye
    else:
        x0_mean, x0_cov = model.mu, model.covariance + model.sigma_max ** 2 * eye
    if target_beta is None:
        target_beta = options.get('beta', 1.0)
    ref = sde_law(model, target_beta, x0_mean, x0_cov, sigma_end)
    out = []
    for n in steps:
        mean, cov = output_law(solver, model, n + 1, x0_mean, x0_cov, **options)
        out.append(weak_error(mean, cov, *ref))
    return out


def orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


# -- the propagation itself, against per-step matrices derived by hand ------------------------------------------

def test_basis_propagation_matches_the_per_step_closed_form():
    """Euler-Maruyama on N(mu, Sigma): y+ = A y + q eps with y = x - mu, A = I + (1 + beta)(s+ - s)(I - K)/s,
    K = Sigma (Sigma + s^2 I)^-1, q^2 = 2 beta s (s - s+); so m+ = A m, C+ = A C A^T + q^2 I. The basis-vector
    propagation must give the same law."""
    model, beta = gaussian('lowrank'), 0.7
    eye = torch.eye(D_DIM, dtype=F64)
    Sigma, mu = model.covariance, model.mu
    x0_mean, x0_cov = torch.full((D_DIM,), 0.3, dtype=F64), 2.0 * model.sigma_max ** 2 * eye
    sigmas = solvers.get_schedule(9, model.sigma_min, model.sigma_max, 'polynomial', 7.0).tolist()
    m, C = x0_mean - mu, x0_cov
    for s, s_next in zip(sigmas, sigmas[1:]):
        K = Sigma @ torch.linalg.inv(Sigma + s ** 2 * eye)
        A = eye + (1 + beta) * (s_next - s) * (eye - K) / s
        m, C = A @ m, A @ C @ A.T + 2 * beta * s * (s - s_next) * eye
    mean, cov = output_law('euler_maruyama', model, 9, x0_mean, x0_cov, beta=beta)
    torch.testing.assert_close(mean, mu + m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, C, rtol=1e-12, atol=1e-10)


def test_closed_form_law_is_the_fixed_point_of_the_exact_start():
    """The reference law: from the exact noised law it returns the noised data law (for every beta), and it
    moves a wrong start's mean by the transition (S_end / S_max)^((1 + beta) / 2)."""
    model = gaussian('lowrank')
    eye = torch.eye(D_DIM, dtype=F64)
    S_max = model.covariance + model.sigma_max ** 2 * eye
    for beta in (0.0, 1.0, 3.0):
        mean, cov = sde_law(model, beta, model.mu, S_max)
        torch.testing.assert_close(mean, model.mu)
        torch.testing.assert_close(cov, model.covariance + model.sigma_min ** 2 * eye)
    lam = model.lam[0]
    direction = model.Q[:, 0]
    mean, _ = sde_law(model, 1.0, model.mu + direction, S_max)
    ratio = (lam + model.sigma_min ** 2) / (lam + model.sigma_max ** 2)
    torch.testing.assert_close(mean, model.mu + ratio * direction)


# -- weak orders ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['diag', 'lowrank'])
@pytest.mark.parametrize('beta', [1.0, 0.5, 0.0])
def test_euler_maruyama_is_weak_order_one(kind, beta):
    errs = errors('euler_maruyama', gaussian(kind), [32, 64, 128], beta=beta)
    assert errs[0] > errs[1] > errs[2]
    assert abs(orders(errs)[-1] - 1) < 0.1, (errs, orders(errs))


@pytest.mark.parametrize('kind', ['diag', 'lowrank'])
@pytest.mark.parametrize('beta,randn_like', [(1.0, 'ddb'), (1.0, 'db'), (0.5, 'ddb'), (0.0, 'ddb')])
def test_sed2_with_a_fresh_drift_is_weak_order_two(kind, beta, randn_like):
    errs = errors('sed2', gaussian(kind), [16, 32, 64], beta=beta, randn_like=randn_like, drift='fresh')
    assert errs[0] > errs[1] > errs[2]
    assert 1.85 < orders(errs)[-1] < 2.35, (errs, orders(errs))


def test_sed2_default_lagged_drift_is_second_order_in_accuracy():
    """The default (lagged drift, one JVP pass per step) approaches order 2 from below (1.52, 1.71, 1.86, 1.93,
    1.97 from 32 to 1024 steps on this model; too slow to run here past 128) and is far more accurate than
    Euler-Maruyama at the same steps."""
    model = gaussian('diag')
    errs = errors('sed2', model, [32, 64, 128])
    em = errors('euler_maruyama', model, [128])
    assert errs[0] > errs[1] > errs[2]
    assert orders(errs)[-1] > 1.6, (errs, orders(errs))
    assert errs[-1] < em[0] / 100


@pytest.mark.parametrize('options', [dict(S_churn=10.0), dict(S_churn=10.0, S_min=0.05, S_max=1.0),
                                     dict(S_churn=5.0, S_noise=1.0)])
def test_edm_sde_churn_is_second_order_from_the_exact_law(options):
    """Churn raises the noise level exactly along the forward process and Heun integrates the ODE, so from the
    exact noised law the sampler's only error is Heun's: order 2 (S_churn / N stays under EDM's cap
    sqrt(2) - 1 at these step counts)."""
    errs = errors('edm_sde', gaussian('lowrank'), [32, 64, 128], start='exact', **options)
    assert errs[0] > errs[1] > errs[2]
    assert 1.85 < orders(errs)[-1] < 2.2, (errs, orders(errs))


def test_edm_sde_without_churn_is_heun_on_the_ode():
    errs = errors('edm_sde', gaussian('diag'), [32, 64, 128], target_beta=0.0, S_churn=0.0)
    assert 1.9 < orders(errs)[-1] < 2.1, (errs, orders(errs))


@pytest.mark.parametrize('options', [dict(randn_like='db'), dict(randn_like='ddb', S_max=0.5)])
def test_sed_ref_is_first_order(options):
    """The reference's scheme: its injected noise (std (-B dtau)^(rho/2) per step) vanishes faster than the step,
    so it integrates the probability-flow ODE; measured against that ODE's exact law it is first order, with
    its Euler branch (db, the recommended commands) or with its "backward 2nd-order" branch above S_max (ddb),
    which is first order too and 8-15x less accurate than plain Euler here."""
    model = gaussian('diag')
    errs = errors('sed_ref', model, [32, 64, 128], target_beta=0.0, **options)
    assert errs[0] > errs[1] > errs[2]
    assert 0.85 < orders(errs)[-1] < 1.2, (errs, orders(errs))
    euler = errors('euler_maruyama', model, [128], beta=0.0)
    if options.get('S_max', math.inf) < math.inf:
        assert errs[-1] > 5 * euler[0]
    else:
        assert errs[-1] == pytest.approx(euler[0], rel=0.05)


# -- directional derivatives of the denoiser ------------------------------------------------------------------

def mixture_jvp_closed_form(model, x, sigma, v_x, v_sigma):
    """J_x D v_x + d_sigma D v_sigma of a Gaussian mixture's exact denoiser, from dense per-component matrices:
    with S_k = Sigma_k + sigma^2 I, m_k = mu_k + Sigma_k S_k^-1 (x - mu_k) and responsibilities r_k = softmax(l_k),
    l_k = log w_k + log N(x; mu_k, S_k): dD = sum_k dr_k m_k + r_k dm_k, dr_k = r_k (dl_k - sum_j r_j dl_j),
    dl_k = -(S_k^-1 (x - mu_k)) . v_x + sigma (|S_k^-1 (x - mu_k)|^2 - tr S_k^-1) v_sigma,
    dm_k = Sigma_k S_k^-1 v_x - 2 sigma Sigma_k S_k^-2 (x - mu_k) v_sigma. One image at a time, float64."""
    K, d, _ = model.bases.shape
    out = []
    for b in range(x.shape[0]):
        xb, vb, s, vs = x[b].reshape(d), v_x[b].reshape(d), float(sigma[b]), float(v_sigma[b])
        logl, means, dl, dm = [], [], [], []
        for k in range(K):
            U = model.bases[k]
            Sig = (U * model.eigvals[k]) @ U.T + model.iso_vars[k] * torch.eye(d, dtype=F64)
            S_inv = torch.linalg.inv(Sig + s ** 2 * torch.eye(d, dtype=F64))
            r = xb - model.means[k]
            g = S_inv @ r
            logl.append(model.log_weights[k] - 0.5 * (r @ g + torch.logdet(Sig + s ** 2 * torch.eye(d, dtype=F64))))
            means.append(model.means[k] + Sig @ g)
            dl.append(-g @ vb + s * (g @ g - torch.trace(S_inv)) * vs)
            dm.append(Sig @ S_inv @ vb - 2 * s * Sig @ S_inv @ g * vs)
        resp = torch.softmax(torch.stack(logl), 0)
        dl = torch.stack(dl)
        dr = resp * (dl - (resp * dl).sum())
        out.append(sum(dr[k] * means[k] + resp[k] * dm[k] for k in range(K)).reshape(x.shape[1:]))
    return torch.stack(out)


def tangents(shape, batch, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    v_x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    sigma = torch.tensor([0.05, 0.7, 3.0][:batch], dtype=dtype)
    v_sigma = torch.tensor([0.4, -0.3, 1.1][:batch], dtype=dtype)
    return x, sigma, v_x, v_sigma


def single_gaussian_mixture():
    model = gaussian('lowrank')
    return GaussianMixture(model.mu[None], model.Q[:, :2][None], (model.lam[:2] - 0.05)[None],
                           torch.tensor([0.05], dtype=F64), torch.ones(1, dtype=F64), (1, 2, 3), name='gauss')


@pytest.mark.parametrize('build', [single_gaussian_mixture, planar_mixture,
                                   lambda: image_mixture(num_components=3, rank=2, size=4)])
def test_jvp_of_the_analytic_models_matches_the_closed_form(build):
    model = build()
    x, sigma, v_x, v_sigma = tangents(model.sample_shape, 3)
    x = x * 1.5 + model.data_mean().reshape(model.sample_shape)
    expect = mixture_jvp_closed_form(model, x, sigma, v_x, v_sigma)
    D, J = stochastic.denoiser_jvp(model, x, sigma, None, v_x, v_sigma, 'jvp')
    torch.testing.assert_close(D, model(x, sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J, expect, rtol=1e-9, atol=1e-9)
    # the forward difference (step ~ sqrt(float32 eps)) is first order: ~1e-2 where responsibilities switch fast
    _, J_fd = stochastic.denoiser_jvp(model, x, sigma, None, v_x, v_sigma, 'fd')
    assert float((J_fd - expect).norm() / expect.norm()) < 2e-2


def test_jvp_of_the_single_gaussian_is_its_affine_map():
    """D = mu + K (x - mu), K = Sigma S^-1: J_x D v = K v and d_sigma D = -2 sigma Sigma S^-2 (x - mu)."""
    model = gaussian('lowrank')
    x, sigma, v_x, v_sigma = tangents(model.sample_shape, 3)
    _, J = stochastic.denoiser_jvp(model, x, sigma, None, v_x, v_sigma, 'jvp')
    eye = torch.eye(D_DIM, dtype=F64)
    for b in range(3):
        S_inv = torch.linalg.inv(model.covariance + sigma[b] ** 2 * eye)
        K = model.covariance @ S_inv
        expect = K @ v_x[b].reshape(-1) - 2 * sigma[b] * K @ S_inv @ (x[b].reshape(-1) - model.mu) * v_sigma[b]
        torch.testing.assert_close(J[b].reshape(-1), expect, rtol=1e-12, atol=1e-12)


def _adm_denoiser(tmp_path):
    from tests.test_models_pixel import ADM_ARCH, _adm_unet
    import models
    unet = _adm_unet(num_classes=None, learn_sigma=True, image_size=8)
    torch.save(unet.state_dict(), tmp_path / 'adm.pt')
    return models.load_denoiser(model_path=str(tmp_path / 'adm.pt'), family='adm',
                                **dict(ADM_ARCH, image_size=8, attention_resolutions='4')), None


def _edm_denoiser(tmp_path):
    import models
    from tests.helpers_models import write_edm_pickle
    return models.load_denoiser(model_path=write_edm_pickle(tmp_path / 'edm.pkl'), family='edm'), None


def _diffusers_denoiser(family):
    def build(tmp_path):
        import models
        from tests.test_models_latent import BUILDERS, TINY_OPTIONS
        den = models.load_denoiser(model_path=BUILDERS[family](str(tmp_path / family)), family=family,
                                   **TINY_OPTIONS[family])
        cond = den.encode_prompts(['a red square']) if getattr(den, 'prompt_keys', None) else None
        if den.label_dim:
            cond = torch.nn.functional.one_hot(torch.tensor([3]), den.label_dim).float()
        return den, cond
    return build


NETWORKS = {'edm': _edm_denoiser, 'adm': _adm_denoiser,
            'ldm': _diffusers_denoiser('ldm'), 'sd': _diffusers_denoiser('sd'), 'dit': _diffusers_denoiser('dit')}


@pytest.mark.parametrize('family', [pytest.param(f, marks=pytest.mark.slow) if f in ('ldm', 'sd', 'dit') else f
                                    for f in NETWORKS])
def test_jvp_through_the_network_families(family, tmp_path):
    """Forward-mode AD through tiny EDM (SongUNet with attention), ADM (attention at 4x4), diffusers UNet2DModel
    (attention blocks), UNet2DConditionModel (cross-attention) and DiT: the JVP equals J @ v from
    torch.func.jacfwd, and a central difference (independent of denoiser_jvp's forward difference, which is
    checked too at its accuracy, about sqrt(float32 eps))."""
    torch.manual_seed(0)
    net, cond = NETWORKS[family](tmp_path)
    shape = net.sample_shape
    x, sigma, v_x, v_sigma = (t[1:2] for t in tangents(shape, 2, dtype=torch.float32))   # sigma = 0.7
    D, J = stochastic.denoiser_jvp(net, x, sigma, cond, v_x, v_sigma, 'jvp')
    with torch.no_grad():
        torch.testing.assert_close(D, net(x, sigma, cond), rtol=1e-5, atol=1e-5)
    with stochastic._sdpa_math():
        Jx, Js = torch.func.jacfwd(lambda a, s: net(a, s, cond), argnums=(0, 1))(x, sigma)
    n = x.numel()
    expect = (Jx.reshape(n, n) @ v_x.reshape(n) + Js.reshape(n) * v_sigma).reshape(x.shape)
    rel = lambda a: float((a - J).norm() / J.norm())
    assert rel(expect) < 1e-4
    t = 1e-3   # small: discrete-time models interpolate their timestep piecewise-linearly in sigma
    with torch.no_grad():
        central = (net(x + t * v_x, sigma + t * v_sigma, cond) - net(x - t * v_x, sigma - t * v_sigma, cond)) / (2 * t)
    assert rel(central) < 5e-3
    _, J_fd = stochastic.denoiser_jvp(net, x, sigma, cond, v_x, v_sigma, 'fd')
    assert rel(J_fd) < 5e-2


# -- bad inputs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('options,match', [(dict(randn_like='dbb'), "unknown randn_like 'dbb'"),
                                           (dict(S_churn=-1.0), 'S_churn=-1.0 must be >= 0'),
                                           (dict(S_min=2.0, S_max=1.0), 'S_min=2.0 must be <= S_max=1.0'),
                                           (dict(beta=-0.5), 'beta=-0.5 must be >= 0'),
                                           (dict(jvp='reverse'), "unknown jvp mode 'reverse'")])
def test_bad_options_are_refused_in_one_line(options, match):
    for solver in ('edm_sde', 'euler_maruyama', 'sed2', 'sed_ref'):
        with pytest.raises(ValueError, match=match) as err:
            solvers.check_options(solver, 5, **options)
        assert '\n' not in str(err.value)


class NoForwardAD(Denoiser):
    """A denoiser whose forward differentiates internally (as classifier guidance does): forward_ad = False."""
    sample_shape = (1, 2, 3)
    forward_ad = False

    def denoise(self, x, sigma, cond=None):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2), None


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0.5

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class OpaqueOp(Denoiser):
    """Claims forward-mode support but runs an autograd.Function without a jvp rule."""
    sample_shape = (1, 2, 3)

    def denoise(self, x, sigma, cond=None):
        return _Opaque.apply(x), None


def test_jvp_on_a_model_that_cannot_give_one():
    from solvers import count_calls
    x, sigma, v_x, v_sigma = tangents((1, 2, 3), 2)
    with pytest.raises(ValueError, match="cannot give a forward-mode JVP.*jvp='fd'"):
        stochastic.denoiser_jvp(NoForwardAD(), x, sigma, None, v_x, v_sigma, 'jvp')
    with pytest.raises(ValueError, match="not forward-mode differentiable.*jvp='fd'") as err:
        stochastic.denoiser_jvp(OpaqueOp(), x, sigma, None, v_x, v_sigma, 'jvp')
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match='not forward-mode differentiable'):
        solvers.sample(OpaqueOp(), torch.randn(2, 1, 2, 3, dtype=F64), 'sed2', 4, noise=ImageNoise([0, 1]),
                       jvp='jvp')
    # auto: the finite difference, one batched call of 2B rows, counted as evaluations and not as a JVP pass
    net = NoForwardAD()
    with count_calls(net) as counter:
        _, J = stochastic.denoiser_jvp(net, x, sigma, None, v_x, v_sigma, 'auto')
    assert (counter.calls, counter.rows, counter.jvp_calls) == (1, 4, 0)
    s = sigma.reshape(-1, 1, 1, 1)
    expect = v_x / (1 + s ** 2) - 2 * s * x / (1 + s ** 2) ** 2 * v_sigma.reshape(-1, 1, 1, 1)
    assert float((J - expect).norm() / expect.norm()) < 1e-3


def test_sed_ref_second_order_branch_needs_ddb():
    with pytest.raises(ValueError, match='needs randn_like=ddb'):
        solvers.check_options('sed_ref', 5, randn_like='db', S_max=1.0)
