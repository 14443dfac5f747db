"""Pieces shared by every solver: the slope of the probability-flow ODE, AFS, trajectories, conditions."""
import torch


def slope(net, x, sigma, cond=None, eval_sigma=None):
    """d = (x - D(x; sigma)) / sigma, the right-hand side of dx/dsigma; also returns D. With eval_sigma (a
    decoupled evaluation grid, LD3) the network is queried at eval_sigma while sigma stays the coefficient:
    d = (x - D(x; eval_sigma)) / sigma."""
    denoised = net(x, sigma if eval_sigma is None else eval_sigma, cond)
    return (x - denoised) / sigma, denoised


def query_grid(sigmas, eval_sigmas):
    """The noise levels at which the network is queried at each grid point: the grid itself, or the decoupled
    evaluation grid of the same length. Solvers index it like the grid (point i -> query i), so the two grids are
    matched by position, never by value."""
    return sigmas if eval_sigmas is None else eval_sigmas


def afs_slope(x, sigma):
    """Analytical first step: the slope that is exact when the data are N(0, I), D = x / (1 + sigma^2).
    It replaces the first denoiser call (one NFE saved); at sigma_max = 80 it is within 1e-4 of x / sigma."""
    return x * sigma / (1 + sigma ** 2)


def first_slope(net, x, sigma, cond, afs, eval_sigma=None):
    """Slope and denoised value at a step's first time point, with or without AFS (which calls no network)."""
    if afs:
        d = afs_slope(x, sigma)
        return d, x - sigma * d
    return slope(net, x, sigma, cond, eval_sigma)


def repeat_cond(cond, times):
    """Repeat a condition (tensor, dict/list of tensors, or None) `times` times along the batch axis,
    sample-major (sample b's copies are adjacent), to match a batch expanded the same way."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(times, dim=0)
    if isinstance(cond, dict):
        return {k: repeat_cond(v, times) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(repeat_cond(v, times) for v in cond)
    return cond


class Trajectory:
    """Collects the states of a run when asked to; `finish` returns x or (x, stacked states)."""

    def __init__(self, enabled, x0):
        self.states = [x0] if enabled else None

    def add(self, x):
        if self.states is not None:
            self.states.append(x)

    def finish(self, x):
        return x if self.states is None else (x, torch.stack(self.states))
