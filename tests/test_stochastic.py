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
    which is first order too and 4-8x less accurate than plain Euler here."""
    model = gaussian('diag')
    errs = errors('sed_ref', model, [32, 64, 128], target_beta=0.0, **options)
    assert errs[0] > errs[1] > errs[2]
    assert 0.85 < orders(errs)[-1] < 1.2, (errs, orders(errs))
    euler = errors('euler_maruyama', model, [128], beta=0.0)
    if options.get('S_max', math.inf) < math.inf:
        assert errs[-1] > 2 * euler[0]
    else:
        assert errs[-1] == pytest.approx(euler[0], rel=0.05)
