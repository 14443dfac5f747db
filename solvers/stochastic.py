"""Stochastic samplers over the denoiser protocol: EDM's stochastic Heun (Algorithm 2), Euler-Maruyama for the
EDM reverse SDE, and the second-order SDE sampler 2nd-SED in two variants.

Same signature as the classical solvers plus a noise source:

    solver(net, x, sigmas, cond=None, *, noise, denoise_to_zero=False, return_trajectory=False, **options)

`noise(key, like)` returns a standard Gaussian tensor shaped like `like` whose row b depends only on image b's
seed and the key (solvers/noise.py); each solver draws step i's noise under keys (i, stream). Nothing here
touches the global RNG, so an image is the same for any batch, worker count and resume point.

The reverse SDE (EDM eq. 6 with sigma(t) = t and the Langevin rate beta(t) = beta / sigma, beta >= 0
dimensionless) is, with f(x, sigma) = (x - D(x; sigma)) / sigma and sigma decreasing,

    dx = (1 + beta) f(x, sigma) dsigma + sqrt(2 beta sigma) dW,     Var dW = |dsigma|.

beta = 0 is the probability-flow ODE; every beta >= 0 has the same marginals p(x; sigma). The 2nd-SED variants:
- `sed2` (the clean scheme): the weak order-2 Ito-Taylor step of that SDE in the step variable s = -sigma, all
  first-derivative terms in one forward-mode directional derivative of the denoiser, the Laplacian term by
  evaluating at a randomly shifted point (no extra network call).
- `sed_ref` (the reference's scheme, as its code does it): Karras-time steps with noise injection, an Euler
  branch, and a "backward 2nd-order" branch above S_max built from the previous step's drift.
"""
import contextlib
import math

import torch

from solvers.common import Trajectory, repeat_cond, slope

RANDN_LIKE = ('db', 'ddb')
JVP_MODES = ('auto', 'jvp', 'fd')

# -- directional derivatives of the denoiser -----------------------------------------------------------------

JVP_STATE = {'depth': 0}     # > 0 while a forward-mode pass runs (solvers.count_calls reports those separately)


@contextlib.contextmanager
def _jvp_pass():
    JVP_STATE['depth'] += 1
    try:
        yield
    finally:
        JVP_STATE['depth'] -= 1


def in_jvp_pass():
    return JVP_STATE['depth'] > 0


def _sdpa_math():
    """Fused attention kernels have no forward-mode derivative; the math kernel (same result) has one."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:      # older torch
        return contextlib.nullcontext()


def denoiser_jvp(net, x, sigma, cond, v_x, v_sigma, mode='auto'):
    """(D(x; sigma), J_x D v_x + d_sigma D v_sigma) with sigma, v_sigma of shape [B].

    mode 'jvp': one forward-mode pass (torch.func.jvp; one network call, counted as a JVP pass). mode 'fd': a
    forward difference with step t = sqrt(eps) (1 + rms x) / rms v per image, D(x) and D(x + t v) in one batched
    call of 2B rows (one extra evaluation per image, no extra sequential round). eps is float32's even for
    float64 inputs (networks such as EDM's compute in float32 whatever the input dtype, where a float64-sized
    step would difference rounding noise), so the difference is accurate to about 3e-4 relative. mode 'auto': 'jvp' unless the denoiser says its forward is not
    forward-mode differentiable (`net.forward_ad` False, e.g. classifier guidance, which differentiates inside)."""
    if mode not in JVP_MODES:
        raise ValueError(f"unknown jvp mode {mode!r}; allowed: {', '.join(JVP_MODES)}")
    capable = getattr(net, 'forward_ad', True)
    if mode == 'auto':
        mode = 'jvp' if capable else 'fd'
    if mode == 'jvp':
        if not capable:
            raise ValueError(f"{type(net).__name__} cannot give a forward-mode JVP (its forward differentiates "
                             "internally); use the finite-difference directional derivative (jvp='fd')")
        try:
            with _jvp_pass(), _sdpa_math():
                return torch.func.jvp(lambda xx, ss: net(xx, ss, cond), (x, sigma), (v_x, v_sigma))
        except (RuntimeError, NotImplementedError) as e:
            raise ValueError(f"the denoiser's forward is not forward-mode differentiable ({str(e).splitlines()[0]}"
                             "); use the finite-difference directional derivative (jvp='fd')") from None
    B = x.shape[0]
    flat = lambda t: t.reshape(B, -1)
    eps = max(torch.finfo(x.dtype).eps, torch.finfo(torch.float32).eps)
    step = math.sqrt(eps) * (1 + flat(x).pow(2).mean(1).sqrt()) / flat(v_x).pow(2).mean(1).sqrt().clamp(min=1e-30)
    step = torch.where(flat(v_x).abs().amax(1) > 0, step, math.sqrt(eps) * (1 + sigma.abs()) /
                       v_sigma.abs().clamp(min=1e-30))
    step_x = step.reshape(B, *[1] * (x.ndim - 1))
    both_x = torch.stack([x, x + step_x * v_x], 1).reshape(2 * B, *x.shape[1:])
    both_s = torch.stack([sigma, sigma + step * v_sigma], 1).reshape(2 * B)
    out = net(both_x, both_s, repeat_cond(cond, 2)).reshape(B, 2, *x.shape[1:])
    return out[:, 0], (out[:, 1] - out[:, 0]) / step_x


def _sigma_vec(sigma, x):
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def _finish(net, x, sigma_last, cond, denoise_to_zero, traj):
    if denoise_to_zero:
        x = net(x, sigma_last, cond)
        traj.add(x)
    return traj.finish(x)


def _need_noise(noise):
    if noise is None:
        raise ValueError("a stochastic solver needs a noise source: noise=solvers.noise.ImageNoise(seeds)")
    return noise


def brownian(noise, i, like, h, randn_like):
    """(dW, dZ) over a step of length h > 0: dW ~ N(0, h) and dZ = int int dW ds. 'ddb': their exact joint law
    (Var dZ = h^3 / 3, Cov = h^2 / 2) from two standard normals n0, n1, dW = sqrt(h) (sqrt(3)/2 n0 + n1 / 2),
    dZ = sqrt(h^3 / 3) n0. 'db': the increment only, dZ = None."""
    n0 = noise((i, 0), like)
    if randn_like == 'db':
        return math.sqrt(h) * n0, None
    n1 = noise((i, 1), like)
    return math.sqrt(h) * (0.5 * math.sqrt(3) * n0 + 0.5 * n1), math.sqrt(h ** 3 / 3) * n0


# -- EDM Algorithm 2 -----------------------------------------------------------------------------------------

def edm_sde(net, x, sigmas, cond=None, *, noise=None, denoise_to_zero=False, return_trajectory=False, S_churn=0.0,
            S_min=0.0, S_max=float('inf'), S_noise=1.0, **_):
    """EDM's stochastic sampler: before each step raise the noise level to sigma_hat = sigma (1 + gamma),
    gamma = min(S_churn / N, sqrt(2) - 1) for S_min <= sigma <= S_max (N = len(sigmas), EDM's step count), by
    adding fresh noise of std sqrt(sigma_hat^2 - sigma^2) S_noise, then a Heun step from sigma_hat to the next
    level. With denoise_to_zero the final step to 0 is EDM's Euler step, churn included, so a grid of N points
    with denoise_to_zero is EDM's sampler of N steps (2N - 1 NFE). S_churn = 0 is the deterministic Heun."""
    noise = _need_noise(noise)
    traj = Trajectory(return_trajectory, x)
    n = len(sigmas)
    gamma_max = min(S_churn / n, math.sqrt(2) - 1)

    def churn(i, x, s):
        gamma = gamma_max if S_min <= float(s) <= S_max else 0.0
        if gamma == 0:
            return x, s
        s_hat = torch.as_tensor(net.round_sigma(s * (1 + gamma)), dtype=s.dtype, device=s.device)
        return x + (s_hat ** 2 - s ** 2).sqrt() * S_noise * noise(i, x), s_hat

    for i in range(n - 1):
        s_next = sigmas[i + 1]
        x_hat, s_hat = churn(i, x, sigmas[i])
        d, _ = slope(net, x_hat, s_hat, cond)
        x_pred = x_hat + (s_next - s_hat) * d
        d_next, _ = slope(net, x_pred, s_next, cond)
        x = x_hat + (s_next - s_hat) * 0.5 * (d + d_next)
        traj.add(x)
    if denoise_to_zero:
        x_hat, s_hat = churn(n - 1, x, sigmas[-1])
        x = net(x_hat, s_hat, cond)
        traj.add(x)
    return traj.finish(x)


# -- Euler-Maruyama ------------------------------------------------------------------------------------------

def euler_maruyama(net, x, sigmas, cond=None, *, noise=None, denoise_to_zero=False, return_trajectory=False,
                   beta=1.0, **_):
    """Euler-Maruyama for the reverse SDE: x+ = x + (1 + beta)(s+ - s) f(x, s) + sqrt(2 beta s (s - s+)) eps.
    Weak order 1. beta = 0 is Euler (DDIM); beta = 1 is EDM's beta(t) = sigma'/sigma. 1 NFE per step."""
    noise = _need_noise(noise)
    traj = Trajectory(return_trajectory, x)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d, _ = slope(net, x, s, cond)
        x = x + (1 + beta) * (s_next - s) * d
        if beta:
            x = x + (2 * beta * s * (s - s_next)).sqrt() * noise((i, 0), x)
        traj.add(x)
    return _finish(net, x, sigmas[-1], cond, denoise_to_zero, traj)


# -- 2nd-SED, the clean weak order-2 scheme -----------------------------------------------------------------

def sed2(net, x, sigmas, cond=None, *, noise=None, denoise_to_zero=False, return_trajectory=False, beta=1.0,
         randn_like='ddb', drift='lagged', laplacian=True, jvp='auto', **_):
    """Weak order-2 Ito-Taylor step of the reverse SDE in s = -sigma (step h = sigma - sigma_next > 0), with drift
    a = -(1 + beta) f and additive noise b = sqrt(2 beta sigma) (b' = -b / (2 sigma)):

        x+ = x + a h + b dW + [1/2 h^2 (d_s a + (grad a) a) + b (grad a) dZ] + 1/4 b^2 h^2 Lap a + b' (h dW - dZ).

    The bracket is one directional derivative of a along (v_x, v_s) = (1/2 h^2 a + b dZ, 1/2 h^2), i.e. one JVP
    of the denoiser along (v_x, v_sigma = -1/2 h^2): df = (v_x - J_D v) / sigma - f v_sigma / sigma.
    drift: the `a` inside the tangent, 'lagged' (the previous step's drift: one JVP pass per step, one plain
    call before the first step; still weak order 2, the lag costs O(h^3) per step) or 'fresh' (a plain call at
    this step first: 2 calls per step). laplacian: evaluate a and its JVP at x + b sqrt(h / 2) z with an
    independent z, whose mean effect h E[a(x + xi)] - h a = 1/4 b^2 h^2 Lap a is the Laplacian term (no
    extra call; without it the scheme is weak order 2 only where D is affine in x). randn_like 'ddb': exact
    joint (dW, dZ); 'db': dZ = h dW / 2 (also weak order 2). jvp: see denoiser_jvp. beta = 0 gives a
    deterministic second-order Taylor method for the probability-flow ODE."""
    noise = _need_noise(noise)
    traj = Trajectory(return_trajectory, x)
    a_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        h = float(s - s_next)
        b = math.sqrt(2 * beta * float(s))
        db_ds = -b / (2 * float(s))
        dW, dZ = brownian(noise, i, x, h, randn_like)
        if dZ is None:
            dZ = 0.5 * h * dW
        x_eval = x + b * math.sqrt(h / 2) * noise((i, 2), x) if laplacian and b > 0 else x
        s_vec = _sigma_vec(s, x)
        if a_prev is None or drift == 'fresh':
            a_prev = -(1 + beta) * (x_eval - net(x_eval, s_vec, cond)) / s
        v_x = 0.5 * h ** 2 * a_prev + b * dZ
        v_sigma = torch.full_like(s_vec, -0.5 * h ** 2)
        D, JD = denoiser_jvp(net, x_eval, s_vec, cond, v_x, v_sigma, jvp)
        f = (x_eval - D) / s
        a = -(1 + beta) * f
        jvp_a = -(1 + beta) * ((v_x - JD) / s - f * (-0.5 * h ** 2) / s)
        x = x + a * h + b * dW + jvp_a + db_ds * (h * dW - dZ)
        a_prev = a
        traj.add(x)
    return _finish(net, x, sigmas[-1], cond, denoise_to_zero, traj)


# -- 2nd-SED as the reference code does it ------------------------------------------------------------------

def karras_grid_params(sigmas, rho):
    """(A, B, dtau) of sigma(tau) = (A + B tau)^rho, tau = i / (N - 1), for a polynomial grid of that rho;
    ValueError if the grid is not one."""
    s = sigmas.detach().to(torch.float64).cpu()
    n = len(s)
    A, B = float(s[0]) ** (1 / rho), float(s[-1]) ** (1 / rho) - float(s[0]) ** (1 / rho)
    expect = (A + B * torch.arange(n, dtype=torch.float64) / (n - 1)) ** rho
    if not torch.allclose(s, expect, rtol=1e-5, atol=0):
        raise ValueError(f"sed_ref integrates the polynomial (Karras) grid of its rho={rho}; use "
                         f"schedule_type=polynomial with schedule_rho={rho} (or set rho to the grid's exponent)")
    return A, B, 1 / (n - 1)


def _binom(r, j):
    return math.gamma(r + 1) / (math.gamma(j + 1) * math.gamma(r - j + 1))


def ref_speed(sigma, delta, B, rho):
    """The reference's step speed gamma(delta) = sum_{j=1}^{floor(rho)-1} C(rho, j) B^j delta^(j-1)
    sigma^((rho-j)/rho), so gamma delta = (sigma^(1/rho) + B delta)^rho - sigma - (B delta)^rho for integer rho."""
    return sum(_binom(rho, j) * B ** j * delta ** (j - 1) * sigma ** ((rho - j) / rho)
               for j in range(1, int(math.floor(rho))))


def sed_ref(net, x, sigmas, cond=None, *, noise=None, denoise_to_zero=False, return_trajectory=False,
            schedule_rho=7.0, rho=None, randn_like='db', S_max=float('inf'), jvp='auto', **_):
    """2nd-SED as its reference code does it (spec: ld3_parataa_sed.md 3.3), on the Karras-time grid of len(sigmas)
    points plus 0 (len(sigmas) steps, one network call each). Per step: noise c dW (c = dtau^((rho-1)/2)
    (-B)^(rho/2)) moves the evaluation point to x_hat at the inflated level sigma_hat = sqrt(sigma^2 + c^2 dtau);
    Euler branch x+ = x + gamma delta' f(x_hat, sigma_hat) from the pre-injection x (its quirk S1); where i > 0 and
    sigma_hat >= S_max (needs 'ddb') its "backward 2nd-order" branch: one JVP along the previous step's drift,
    x+ = x_hat + gamma (delta' f + corr). The last step keeps the nominal dtau (quirk S2: it stops near
    sigma ~ 5e-4 instead of 0). S_max = inf (its default, and the setting of its recommended commands) never takes
    the second-order branch."""
    noise = _need_noise(noise)
    if denoise_to_zero:
        raise ValueError("sed_ref ends with its own final step from sigma_min; drop denoise_to_zero")
    rho = float(schedule_rho if rho is None else rho)
    A, B, dtau = karras_grid_params(sigmas, rho)
    n = len(sigmas)
    if S_max < float('inf') and randn_like != 'ddb':
        raise ValueError("sed_ref's second-order branch (S_max < inf) needs randn_like='ddb' (it uses dZ)")
    c = dtau ** ((rho - 1) / 2) * (-B) ** (rho / 2)
    traj = Trajectory(return_trajectory, x)
    f_prev = None
    for i in range(n):
        s = float(sigmas[i])
        if i < n - 1:
            s_next = float(sigmas[i + 1])
            dW, dZ = brownian(noise, i, x, dtau, randn_like)
            x_hat = x + c * dW
            s_hat = math.sqrt(s ** 2 + c ** 2 * dtau)
            delta = (s_next ** (1 / rho) - s_hat ** (1 / rho)) / B
        else:
            x_hat, s_hat, delta = x, s, dtau
        gamma = ref_speed(s_hat, delta, B, rho)
        s_vec = _sigma_vec(s_hat, x)
        if i > 0 and i < n - 1 and s_hat >= S_max:
            v_x = 0.5 * delta ** 2 * gamma * f_prev / s_hat + c * dZ / s_hat
            v_sigma = torch.full_like(s_vec, 0.5 * delta ** 2 / s_hat)
            D, J = denoiser_jvp(net, x_hat, s_vec, cond, v_x, v_sigma, jvp)
            corr = delta ** 2 * gamma * f_prev / s_hat + 0.5 * delta ** 2 * c * dW / s_hat + dZ / s_hat - J
            f = (x_hat - D) / s_hat
            x = x_hat + gamma * (delta * f + corr)
        else:
            f = (x_hat - net(x_hat, s_vec, cond)) / s_hat
            x = x + gamma * delta * f
        f_prev = f
        traj.add(x)
    return traj.finish(x)


# -- options -------------------------------------------------------------------------------------------------

def check_options(solver, S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0, beta=1.0, randn_like=None,
                  drift='lagged', jvp='auto', **_):
    """Raise ValueError naming the bad stochastic-sampler option and what is allowed."""
    if S_churn < 0:
        raise ValueError(f"S_churn={S_churn} must be >= 0 (0 = no churn)")
    if S_min > S_max:
        raise ValueError(f"S_min={S_min} must be <= S_max={S_max} (churn applies for S_min <= sigma <= S_max)")
    if S_noise < 0:
        raise ValueError(f"S_noise={S_noise} must be >= 0")
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0 (the Langevin rate; 0 = the probability-flow ODE)")
    if randn_like is not None and randn_like not in RANDN_LIKE:
        raise ValueError(f"unknown randn_like {randn_like!r}; allowed: db (Brownian increment only), ddb (joint "
                         "increment and its time integral)")
    if drift not in ('lagged', 'fresh'):
        raise ValueError(f"unknown drift {drift!r}; allowed: lagged, fresh")
    if jvp not in JVP_MODES:
        raise ValueError(f"unknown jvp mode {jvp!r}; allowed: {', '.join(JVP_MODES)}")
    if solver == 'sed_ref' and S_max < float('inf') and randn_like != 'ddb':
        raise ValueError("sed_ref's second-order branch (S_max < inf) needs randn_like=ddb (it uses dZ)")


# The stochastic-sampler options and the samplers that use them: sample.py refuses an option a sampler does not
# use (an ODE solver uses none), rather than ignore it.
OPTION_USERS = {'S_churn': ('edm_sde',), 'S_min': ('edm_sde',), 'S_max': ('edm_sde', 'sed_ref'),
                'S_noise': ('edm_sde',), 'beta': ('euler_maruyama', 'sed2'), 'randn_like': ('sed2', 'sed_ref'),
                'drift': ('sed2',), 'jvp': ('sed2', 'sed_ref')}
SAMPLERS = {'edm_sde': edm_sde, 'euler_maruyama': euler_maruyama, 'sed2': sed2, 'sed_ref': sed_ref}


def option_defaults(solver):
    """{option: default} of the OPTION_USERS options that `solver` takes ({} for the others)."""
    import inspect
    if solver not in SAMPLERS:
        return {}
    params = inspect.signature(SAMPLERS[solver]).parameters
    return {name: params[name].default for name, users in OPTION_USERS.items() if solver in users}


def unused_option(solver, given):
    """The first option in `given` (names of options set) that `solver` does not use, with a one-line reason;
    None if all apply."""
    for name in given:
        users = OPTION_USERS[name]
        if solver not in users:
            kind = 'a stochastic sampler' if solver in SAMPLERS else 'a deterministic ODE solver'
            return name, (f"--{name} applies to {', '.join(users)} only; {solver} is {kind} that does not use it: "
                          f"drop --{name} or choose --sampler_stu={users[0]}")
    return None
