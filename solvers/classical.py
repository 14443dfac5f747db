"""Classical ODE solvers over the denoiser protocol, one function per solver with one signature:

    solver(net, x, sigmas, cond=None, *, afs=False, denoise_to_zero=False, return_trajectory=False, **options)

`x` is the initial state at sigmas[0] (unit noise already scaled by sigma_max), `sigmas` a decreasing tensor of
N time points (N - 1 steps). Every solver also takes `eval_sigmas`, a decoupled evaluation grid of the same length
(LD3): the network is queried at eval_sigmas[i] where the solver would query sigmas[i] (at a derived point, such
as DPM-2's midpoint, the same formula applied to eval_sigmas), while every coefficient uses `sigmas`.
Returns the state at sigmas[-1] (or D of it with denoise_to_zero), and with return_trajectory also the stacked
states [N (+1), B, ...]. Everything is differentiable in x, sigmas, eval_sigmas and anything the denoiser depends
on: no no_grad, no in-place updates.
"""
import math

import torch

from solvers.common import Trajectory, first_slope, query_grid, slope
from solvers.schedules import vp_fit, vp_tau


def _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas=None):
    if denoise_to_zero:
        x = net(x, query_grid(sigmas, eval_sigmas)[-1], cond)
        traj.add(x)
    return traj.finish(x)


def euler(net, x, sigmas, cond=None, *, eval_sigmas=None,
          afs=False, denoise_to_zero=False, return_trajectory=False, **_):
    """Euler in sigma = deterministic DDIM. 1 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    for i in range(len(sigmas) - 1):
        d, _ = first_slope(net, x, sigmas[i], cond, afs and i == 0, q[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * d
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


def ddim(net, x, sigmas, cond=None, *, eta=0.0, noise=None, eval_sigmas=None, afs=False, denoise_to_zero=False,
         return_trajectory=False, **_):
    """DDIM(eta) in sigma: x' = D + s_down (x - D) / s + s_up xi with s_up = min(s', eta s' sqrt(1 - s'^2 / s^2))
    and s_down = sqrt(s'^2 - s_up^2), the VP DDIM update in VE units. eta = 0 is Euler, eta = 1 the ancestral
    (DDPM posterior) step. xi = noise(step, x): per image (solvers.noise), so any batch or a parallel-in-time
    solve draws the same numbers. 1 NFE per step."""
    if eta and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source (solvers.noise.ImageNoise of the images' seeds)")
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d, denoised = first_slope(net, x, s_cur, cond, afs and i == 0, q[i])
        if eta:
            s_up = torch.minimum(s_next, eta * s_next * torch.sqrt(1 - (s_next / s_cur) ** 2))
            s_down = torch.sqrt(s_next ** 2 - s_up ** 2)
            x = denoised + s_down * d + s_up * noise(i, x)
        else:
            x = x + (s_next - s_cur) * d
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


def heun(net, x, sigmas, cond=None, *, eval_sigmas=None,
         afs=False, denoise_to_zero=False, return_trajectory=False, **_):
    """EDM's second-order Heun method, corrected on every step (the grid ends at sigma_min > 0). 2 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d, _ = first_slope(net, x, s_cur, cond, afs and i == 0, q[i])
        x_pred = x + (s_next - s_cur) * d
        d_next, _ = slope(net, x_pred, s_next, cond, q[i + 1])
        x = x + (s_next - s_cur) * 0.5 * (d + d_next)
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


def dpm(net, x, sigmas, cond=None, *, eval_sigmas=None,
        afs=False, denoise_to_zero=False, return_trajectory=False, r=0.5, **_):
    """DPM-Solver-2 (single step): an intermediate point at fraction r of the step in log sigma. 2 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d, _ = first_slope(net, x, s_cur, cond, afs and i == 0, q[i])
        s_mid = s_next ** r * s_cur ** (1 - r)
        s_mid_eval = s_mid if eval_sigmas is None else q[i + 1] ** r * q[i] ** (1 - r)
        d_mid, _ = slope(net, x + (s_mid - s_cur) * d, s_mid, cond, s_mid_eval)
        x = x + (s_next - s_cur) * ((1 / (2 * r)) * d_mid + (1 - 1 / (2 * r)) * d)
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


# -- linear multistep methods on the slopes ---------------------------------------------------------------------

IPNDM_COEFFS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(net, x, sigmas, cond=None, *, eval_sigmas=None,
          afs=False, denoise_to_zero=False, return_trajectory=False, max_order=4,
          **_):
    """Improved PNDM: Adams-Bashforth with the fixed (uniform-step) coefficients on the slopes, lower-order warm
    start. Exactly AB-k on uniform grids; on non-uniform grids the fixed weights make it second order. 1 NFE/step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    history = []                                   # newest first
    for i in range(len(sigmas) - 1):
        d, _ = first_slope(net, x, sigmas[i], cond, afs and i == 0, q[i])
        history = [d] + history[:max_order - 1]
        coeffs = IPNDM_COEFFS[len(history)]
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * h for c, h in zip(coeffs, history))
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


def ipndm_v_weights(nodes, t_next):
    """Weights w_j with x_next = x_cur + sum_j w_j d(nodes[j]) exact when d is a polynomial of degree
    < len(nodes) in sigma: the integral over [nodes[0], t_next] of the Newton interpolant through the nodes
    (newest first). Written with divided differences, so it holds on any grid."""
    k = len(nodes)
    h = t_next - nodes[0]
    # Integral of prod_{m<j} (s - nodes[m]) over [nodes[0], nodes[0] + h], substituting s = nodes[0] + u:
    # prod_{m<j} (u + a_m) with a_m = nodes[0] - nodes[m]; integrate the polynomial in u exactly.
    a = [nodes[0] - nodes[m] for m in range(k)]
    integrals = []
    poly = [1.0]                                   # coefficients in u, lowest first
    for j in range(k):
        integrals.append(sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly)))
        # multiply by (u + a_j)
        poly = [(poly[p] * a[j] if p < len(poly) else 0) + (poly[p - 1] if p > 0 else 0) for p in range(len(poly) + 1)]
    # Divided differences expressed as weights on the node values: dd_j = sum_m coef[j][m] d_m.
    weights = [0.0] * k
    for j in range(k):
        for m in range(j + 1):
            denom = 1.0
            for l in range(j + 1):
                if l != m:
                    denom = denom * (nodes[m] - nodes[l])
            weights[m] = weights[m] + integrals[j] / denom
    return [w / h for w in weights]                # relative to the step h, as x + h * sum w_j d_j


def ipndm_v(net, x, sigmas, cond=None, *, eval_sigmas=None,
            afs=False, denoise_to_zero=False, return_trajectory=False, max_order=4,
            **_):
    """Variable-step Adams-Bashforth of order max_order on the slopes: exact on any grid for slopes that are
    polynomials of degree < order (unlike the reference's orders 3 and 4). 1 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    history = []
    for i in range(len(sigmas) - 1):
        d, _ = first_slope(net, x, sigmas[i], cond, afs and i == 0, q[i])
        history = [d] + history[:max_order - 1]
        weights = ipndm_v_weights([sigmas[i - j] for j in range(len(history))], sigmas[i + 1])
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(w * h for w, h in zip(weights, history))
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


_GAUSS = {}


def _gauss_legendre(n, like):
    if n not in _GAUSS:
        import numpy as np
        _GAUSS[n] = tuple(torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(n))
    nodes, weights = _GAUSS[n]
    return nodes.to(like.device), weights.to(like.device)


def deis_weights(tau_nodes, tau_a, tau_b, beta_d, beta_min, quad_points=32):
    """tAB-DEIS weights: integral over [tau_a, tau_b] of dsigma/dtau times the Lagrange basis of the nodes
    (in VP time tau), by Gauss-Legendre quadrature in float64."""
    g_nodes, g_weights = _gauss_legendre(quad_points, tau_a)
    half = (tau_b - tau_a) / 2
    tau = tau_a + half * (g_nodes + 1)
    # dsigma/dtau of sigma = sqrt(exp(q) - 1), q = beta_d tau^2 / 2 + beta_min tau.
    q = 0.5 * beta_d * tau ** 2 + beta_min * tau
    dsigma = 0.5 * (beta_d * tau + beta_min) * torch.exp(q) / torch.sqrt(torch.expm1(q))
    weights = []
    for j, tj in enumerate(tau_nodes):
        basis = torch.ones_like(tau)
        for m, tm in enumerate(tau_nodes):
            if m != j:
                basis = basis * (tau - tm) / (tj - tm)
        weights.append((g_weights * dsigma * basis).sum() * half)
    return weights


def deis(net, x, sigmas, cond=None, *, eval_sigmas=None,
         afs=False, denoise_to_zero=False, return_trajectory=False, max_order=4,
         **_):
    """DEIS tAB: the slopes' Lagrange interpolant in VP time tau, integrated exactly in sigma. Order max_order on
    any grid (lower-order warm start). 1 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    sig64 = sigmas.detach().to(torch.float64)
    beta_d, beta_min = vp_fit(float(sig64[-1]), float(sig64[0]))
    taus = vp_tau(sig64, beta_d, beta_min)
    history = []
    for i in range(len(sigmas) - 1):
        d, _ = first_slope(net, x, sigmas[i], cond, afs and i == 0, q[i])
        history = [d] + history[:max_order - 1]
        if len(history) == 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            weights = deis_weights([taus[i - j] for j in range(len(history))], taus[i], taus[i + 1], beta_d, beta_min)
            x = x + sum(w.to(x.dtype) * h for w, h in zip(weights, history))
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


# -- exponential-integrator multistep methods (log-SNR lambda = -log sigma) ---------------------------------------

def _multistep_order(i, num_steps, max_order, lower_order_final):
    """Warm start at order i + 1; with lower_order_final the final steps drop to the number of steps left (the
    last step is first order), which stabilises few-step runs whose last step is long in log sigma. As in the
    seeds, this applies whatever the number of steps (it caps the global order at 2: convergence studies turn
    it off)."""
    order = min(max_order, i + 1)
    if lower_order_final:
        order = min(order, num_steps - i)
    return order


DPMPP_VARIANTS = ('phi3', '2phi3')            # the first is the default


def dpmpp_increment(x, t, outputs, times, order, predict_x0=True, variant='phi3'):
    """One multistep DPM-Solver++ update from times[0] to t, split as x_t = base + increment, where the
    increment is the part that depends on the model outputs (newest first; data or noise predictions).
    variant weights the second divided difference at order 3: 'phi3' by phi_3 (the published update),
    '2phi3' by 2 phi_3 (third order; see docs/solvers.md)."""
    s0, m0 = times[0], outputs[0]
    h = torch.log(s0 / t)
    if predict_x0:
        phi1 = torch.expm1(-h)                    # e^{-h} - 1
        base, inc = (t / s0) * x, -phi1 * m0
    else:
        phi1 = torch.expm1(h)
        base, inc = x, -t * phi1 * m0
    if order >= 2:
        r0 = torch.log(times[1] / s0) / h
        d1_0 = (m0 - outputs[1]) / r0
        if order == 2:
            inc = inc - 0.5 * phi1 * d1_0 if predict_x0 else inc - 0.5 * t * phi1 * d1_0
        else:
            r1 = torch.log(times[2] / times[1]) / h
            d1_1 = (outputs[1] - outputs[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            weight = 2 if variant == '2phi3' else 1
            if predict_x0:
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                inc = inc + phi2 * d1 - weight * phi3 * d2
            else:
                phi2 = phi1 / h - 1
                phi3 = phi2 / h - 0.5
                inc = inc - t * phi2 * d1 - weight * t * phi3 * d2
    return base, inc


def dpmpp(net, x, sigmas, cond=None, *, eval_sigmas=None,
          afs=False, denoise_to_zero=False, return_trajectory=False, max_order=3,
          predict_x0=True, lower_order_final=True, variant='phi3', **_):
    """Multistep DPM-Solver++ (data prediction, predict_x0=True) or DPM-Solver (noise prediction), orders 1-3.
    No thresholding. variant='phi3' (default) is the update of diff-sampler, k-diffusion and diffusers (their 3M
    steps agree to float rounding); '2phi3' weights the second divided difference by 2 phi_3, which makes 3M third
    order where 'phi3' is second order. On the analytic model 'phi3' has the lower error at NFE 5-8 on all four
    schedules and up to NFE 20-40 on three of them; '2phi3' wins from NFE 30-60 on (docs/solvers.md). 1 NFE/step."""
    if variant not in DPMPP_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a DPM-Solver++ variant; allowed: {', '.join(DPMPP_VARIANTS)}")
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    num_steps = len(sigmas) - 1
    outputs, times = [], []                       # newest first
    for i in range(num_steps):
        d, denoised = first_slope(net, x, sigmas[i], cond, afs and i == 0, q[i])
        outputs = [denoised if predict_x0 else d] + outputs[:2]
        times = [sigmas[i]] + times[:2]
        order = min(_multistep_order(i, num_steps, max_order, lower_order_final), len(outputs))
        base, inc = dpmpp_increment(x, sigmas[i + 1], outputs, times, order, predict_x0, variant)
        x = base + inc
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)


def _unipc_coefficients(rks, hh, B_h, order):
    """UniPC's predictor and corrector weights for the given step ratios (rks ends with 1)."""
    phi_k = torch.expm1(hh) / hh - 1
    factorial = 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append(torch.stack([r ** (k - 1) for r in rks]))
        b.append(phi_k * factorial / B_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    if order == 1:
        rho_p, rho_c = None, torch.stack([0.5 * torch.ones_like(hh)])
    else:
        rho_p = torch.stack([0.5 * torch.ones_like(hh)]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        rho_c = torch.linalg.solve(R, b)
    return rho_p, rho_c


def unipc(net, x, sigmas, cond=None, *, eval_sigmas=None,
          afs=False, denoise_to_zero=False, return_trajectory=False, max_order=3,
          predict_x0=True, lower_order_final=True, variant='bh2', **_):
    """UniPC: multistep predictor UniP of order max_order with the corrector UniC after every step but the last;
    the corrector's model evaluation is reused by the next step, so 1 NFE per step."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    num_steps = len(sigmas) - 1
    d, denoised = first_slope(net, x, sigmas[0], cond, afs, q[0])
    outputs, times = [denoised if predict_x0 else d], [sigmas[0]]        # newest first
    for i in range(num_steps):
        s0, t = times[0], sigmas[i + 1]
        order = min(_multistep_order(i, num_steps, max_order, lower_order_final), len(outputs))
        last = i == num_steps - 1
        h = torch.log(s0 / t).to(torch.float64)
        hh = -h if predict_x0 else h
        B_h = hh if variant == 'bh1' else torch.expm1(hh)
        m0 = outputs[0]
        rks = [(torch.log(s0 / times[k]).to(torch.float64)) / h for k in range(1, order)] + [torch.ones_like(h)]
        diffs = [(outputs[k] - m0) / rks[k - 1].to(x.dtype) for k in range(1, order)]
        rho_p, rho_c = _unipc_coefficients(rks, hh, B_h, order)
        scale = 1 if predict_x0 else t                      # noise mode multiplies every correction by t
        if predict_x0:
            x_base = (t / s0) * x - torch.expm1(-h).to(x.dtype) * m0
        else:
            x_base = x - t * torch.expm1(h).to(x.dtype) * m0
        B = B_h.to(x.dtype) * scale
        x_pred = x_base if rho_p is None else x_base - B * sum(r.to(x.dtype) * dk for r, dk in zip(rho_p, diffs))
        if last:
            x = x_pred
        else:
            d_t, den_t = slope(net, x_pred, t, cond, q[i + 1])
            m_t = den_t if predict_x0 else d_t
            corr = sum((r.to(x.dtype) * dk for r, dk in zip(rho_c[:-1], diffs)), torch.zeros_like(x))
            x = x_base - B * (corr + rho_c[-1].to(x.dtype) * (m_t - m0))
            outputs = [m_t] + outputs[:max_order - 1]
            times = [t] + times[:max_order - 1]
        traj.add(x)
    return _finish(net, x, sigmas, cond, denoise_to_zero, traj, eval_sigmas)
