"""GITS: a coarse time grid chosen from a fine teacher grid by dynamic programming over one-step errors.

A teacher solver runs on a fine grid of T points from a few noises (the trajectory X[0..T-1]); the raw slopes
E[i] = (X[i] - D(X[i]; s_i)) / s_i are taken at its points. The cost of jumping from fine point i to fine point j > i
is the error of one Euler step from the teacher's X[i] with slope E[i], measured at X[j] (`metric`: 'l1', 'l2', or
'dev', the signed change of the deviation from the straight start-to-end line). The coarse grid of K steps is the
path 0 = m_0 < m_1 < ... < m_K = T - 1 of least weighted cost sum_k coeff^k C[m_k, m_{k+1}] (coeff > 1 weights the
later, low-noise steps more). Pure functions: the cost table is cached by the caller (training/gits.py).
"""
import math

import torch

METRICS = ('dev', 'l1', 'l2')


def teacher_trajectory(net, x, sigmas, solver, cond=None, **options):
    """The teacher's states X [T, B, ...] on the fine grid `sigmas` (T points, x at sigmas[0]) and the raw slopes
    E [T - 1, B, ...] at its first T - 1 points (one extra evaluation per point, so any teacher solver works)."""
    from solvers import SOLVERS
    _, states = SOLVERS[solver].fn(net, x, sigmas, cond, return_trajectory=True, **options)
    slopes = torch.stack([(states[i] - net(states[i], sigmas[i], cond)) / sigmas[i]
                          for i in range(len(sigmas) - 1)])
    return states, slopes


def deviation(points, start, end):
    """Per-sample L2 norm of the part of (end - point) orthogonal to (end - start). points [..., B, ...]."""
    axis = (end - start).flatten(1)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rel = (end - points).flatten(points.dim() - end.dim() + 1)
    along = (rel * axis).sum(-1, keepdim=True) * axis
    return (rel - along).norm(dim=-1)


def cost_sums(states, slopes, sigmas, metric='dev'):
    """Per-batch sums (over samples) of the cost terms: C_sum [T, T] with C_sum[i, j] (i < j) the sum over the
    batch of the jump's cost term, and dev_sum [T] the sum of the teacher's own deviations (0 for l1/l2). The cost
    table is (C_sum - dev_sum[None, :]) / count over all batches (cost_table)."""
    if metric not in METRICS:
        raise ValueError(f"unknown GITS metric {metric!r}; allowed: {', '.join(METRICS)}")
    T = len(sigmas)
    sums = torch.zeros(T, T, dtype=torch.float64)
    dev_sum = torch.zeros(T, dtype=torch.float64)
    start, end = states[0], states[-1]
    if metric == 'dev':
        dev_sum = deviation(states, start, end).sum(-1).to(torch.float64).cpu()
    for i in range(T - 1):
        targets = states[i + 1:]                                          # [T - i - 1, B, ...]
        steps = (sigmas[i + 1:] - sigmas[i]).reshape(-1, *[1] * (states.dim() - 1)).to(states)
        jumped = states[i] + steps * slopes[i]
        if metric == 'dev':
            term = deviation(jumped, start, end)
        elif metric == 'l1':
            term = (jumped - targets).flatten(2).abs().sum(-1)
        else:
            term = (jumped - targets).flatten(2).norm(dim=-1)
        sums[i, i + 1:] = term.sum(-1).to(torch.float64).cpu()
    return sums, dev_sum


def cost_table(sums, dev_sum, count):
    """C [T, T]: mean cost of the jump i -> j for i < j, +inf elsewhere."""
    T = sums.shape[0]
    cost = (sums - dev_sum[None, :]) / count
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.where(upper, cost, torch.full_like(cost, math.inf))


def dp_search(cost, num_steps, coeff=1.15):
    """Indices [0, m_1, ..., T - 1] (num_steps of them, num_steps - 1 jumps) of the path of least cost
    sum_k coeff^k cost[m_k, m_{k+1}]: V[i][1] = C[i][T-1], V[i][k] = min_{i < m < T-1} C[i][m] + coeff V[m][k-1];
    ties go to the smallest m."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    T = cost.shape[0]
    K = num_steps - 1
    if not 1 <= K <= T - 1:
        raise ValueError(f"GITS: {num_steps} time points cannot be chosen from a fine grid of {T}; use between 2 and "
                         f"{T} time points, or a finer teacher grid")
    value = torch.full((K + 1, T), math.inf, dtype=torch.float64)
    choice = torch.full((K + 1, T), -1, dtype=torch.long)
    value[1] = cost[:, T - 1]
    value[1, T - 1] = math.inf
    for k in range(2, K + 1):
        for i in range(T - 1):
            cands = cost[i, i + 1:T - 1] + coeff * value[k - 1, i + 1:T - 1]
            if len(cands) and torch.isfinite(cands).any():
                best = int(torch.argmin(cands))          # first minimum
                value[k, i], choice[k, i] = cands[best], i + 1 + best
    path, node = [0], 0
    for k in range(K, 1, -1):
        node = int(choice[k, node])
        path.append(node)
    path.append(T - 1)
    return path
