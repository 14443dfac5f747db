"""Learned solvers: EPD (ensemble of parallel directions), the EPD plugin on iPNDM, AMED and its plugins.

Same shape as the classical solvers: pure functions over a denoiser, differentiable in the states, the sigmas
and the predictor's parameters. The learned parameters arrive as callables:
  epd:  table(step) -> (r, c, a, w), each [K] (one table for the batch) or [B, K] (a table per sample, as in RL
        rollouts): positions in log sigma, direction scales, time scales, weights
  amed: params(feature [B, F], s_cur, s_next) -> (r, c, a), each [B]
"""
import torch

from solvers.classical import IPNDM_COEFFS, _multistep_order, dpmpp_increment
from solvers.common import Trajectory, afs_slope, query_grid, repeat_cond, slope


def _first(net, x, sigma, cond, afs, with_feature=False, feature_dim=64, eval_sigma=None):
    """Slope at a step's start (AFS or one denoiser call, queried at eval_sigma if given); with_feature also
    returns the bottleneck feature."""
    eval_sigma = sigma if eval_sigma is None else eval_sigma
    from models.base import pooled_feature
    if afs:
        d = afs_slope(x, sigma)
        # No network call: the feature is the pooled AFS denoised estimate at the bottleneck's size (not zeros).
        feature = pooled_feature(x - sigma * d, size=round(feature_dim ** 0.5)) if with_feature else None
        return d, feature
    if with_feature:
        denoised, feature = net(x, eval_sigma, cond, return_bottleneck=True)
        return (x - denoised) / sigma, feature
    return slope(net, x, sigma, cond, eval_sigma)[0], None


def _parallel_slopes(net, probes, sigmas_eval, sigmas_div, cond):
    """Evaluate K probes per sample in one batched call. probes [B, K, C, H, W]; sigmas [B, K]."""
    B, K = probes.shape[:2]
    flat = probes.reshape(B * K, *probes.shape[2:])
    denoised = net(flat, sigmas_eval.reshape(B * K), repeat_cond(cond, K)).reshape(probes.shape)
    return (probes - denoised) / sigmas_div.reshape(B, K, *([1] * (probes.ndim - 2)))


def _ab_direction(d, history):
    coeffs = IPNDM_COEFFS[len(history) + 1]
    return coeffs[0] * d + sum(c * h for c, h in zip(coeffs[1:], history))


def epd(net, x, sigmas, cond=None, *, table, afs=False, fcn=False, return_trajectory=False, plugin=None,
        max_order=3, denoise_to_zero=False, eval_sigmas=None, **_):
    """EPD step: x_{n+1} = x_n + (t_{n+1} - t_n) sum_k w_k c_k g_k, with g_k the slope at the probe
    y_k = x_n + (s_k - t_n) d_n, s_k = t_{n+1}^{r_k} t_n^{1 - r_k}, evaluated at the scaled time a_k s_k.
    All K probes of a step are one batched denoiser call: 2 sequential calls per step (1 at an AFS step).
    plugin='ipndm' moves the probes with iPNDM's Adams-Bashforth extrapolation of the past slopes.
    With eval_sigmas (a decoupled grid), the probes' query times come from it by the same formula."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    history = []
    for n in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[n], sigmas[n + 1]
        d, _ = _first(net, x, t_cur, cond, afs and n == 0, eval_sigma=q[n])
        r, c, a, w = table(n)
        if fcn and n == len(sigmas) - 2:
            c = torch.ones_like(c)
        direction = d if plugin != 'ipndm' else _ab_direction(d, history)
        if plugin == 'ipndm':
            history = [d.detach()] + history[:max_order - 2] if max_order > 1 else []
        s = t_next ** r * t_cur ** (1 - r)                                       # [K] or [B, K]
        per_point = lambda v: v.reshape(v.shape[0] if v.ndim == 2 else 1, -1, *([1] * (x.ndim - 1)))
        s_eval = s if eval_sigmas is None else q[n + 1] ** r * q[n] ** (1 - r)
        probes = x[:, None] + per_point(s - t_cur) * direction[:, None]
        B = x.shape[0]
        g = _parallel_slopes(net, probes, (a * s_eval).expand(B, -1), s.expand(B, -1), cond)
        x = x + (t_next - t_cur) * (per_point(w * c) * g).sum(1)
        traj.add(x)
    if denoise_to_zero:
        x = net(x, q[-1], cond)
        traj.add(x)
    return traj.finish(x)


def amed(net, x, sigmas, cond=None, *, params, base='amed', afs=False, return_trajectory=False, max_order=3,
         denoise_to_zero=False, feature_dim=64, predict_x0=True, lower_order_final=True, eval_sigmas=None, **_):
    """AMED-Solver (base='amed') and the AMED plugins (base='euler', 'dpm', 'ipndm', 'dpmpp'): per step, a small
    network predicts from the bottleneck feature of the step's first call an intermediate time s (fraction r in
    log sigma), a direction scale c and a time scale a. 2 denoiser calls per step (1 at an AFS step).
    The DPM-Solver++ plugin runs the multistep method on the interleaved grid t_0, s_0, t_1, s_1, ... with c
    scaling the model-dependent part of the update into t_{n+1}."""
    traj = Trajectory(return_trajectory, x)
    q = query_grid(sigmas, eval_sigmas)
    history = []
    outputs, times = [], []                        # DPM-Solver++ plugin buffers, newest first
    total = 2 * (len(sigmas) - 1)                  # steps of the interleaved grid
    view = (-1,) + (1,) * (x.ndim - 1)
    for n in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[n], sigmas[n + 1]
        d, feature = _first(net, x, t_cur, cond, afs and n == 0, with_feature=True, feature_dim=feature_dim,
                            eval_sigma=q[n])
        r, c, a = params(feature, t_cur, t_next)                              # each [B]
        s = t_next ** r * t_cur ** (1 - r)
        if base == 'ipndm':
            y = x + (s - t_cur).reshape(view) * _ab_direction(d, history[:max_order - 1])
            history = ([d.detach()] + history)[:max(max_order - 1, 0)]
        elif base == 'dpmpp':
            outputs = [(x - t_cur * d) if predict_x0 else d] + outputs[:2]
            times = [t_cur] + times[:2]
            order = min(_multistep_order(2 * n, total, max_order, lower_order_final), len(outputs))
            y_base, y_inc = dpmpp_increment(x, s.reshape(view), outputs, times, order, predict_x0)
            y = y_base + y_inc
        else:
            y = x + (s - t_cur).reshape(view) * d
        s_eval = s if eval_sigmas is None else q[n + 1] ** r * q[n] ** (1 - r)
        denoised = net(y, a * s_eval, cond)
        g = (y - denoised) / s.reshape(view)
        if base == 'dpmpp':
            outputs = [denoised if predict_x0 else g] + outputs[:2]
            times = [s.reshape(view)] + times[:2]
            order = min(_multistep_order(2 * n + 1, total, max_order, lower_order_final), len(outputs))
            x_base, x_inc = dpmpp_increment(y, t_next, outputs, times, order, predict_x0)
            x = x_base + c.reshape(view) * x_inc
        elif base == 'amed':
            x = x + (c * (t_next - t_cur)).reshape(view) * g
        elif base == 'euler':
            x = y + (c * (t_next - s)).reshape(view) * g
        elif base == 'dpm':
            x = x + (c * (t_next - t_cur)).reshape(view) * ((1 / (2 * r)).reshape(view) * g
                                                             + (1 - 1 / (2 * r)).reshape(view) * d)
        elif base == 'ipndm':
            x = y + (c * (t_next - s)).reshape(view) * _ab_direction(g, history[:max_order - 1])
            history = ([g.detach()] + history)[:max(max_order - 1, 0)]
        else:
            raise ValueError(f"unknown AMED base solver {base!r}; allowed: amed, euler, dpm, ipndm, dpmpp")
        traj.add(x)
    if denoise_to_zero:
        x = net(x, q[-1], cond)
        traj.add(x)
    return traj.finish(x)
