"""Parallel-in-time sampling: the whole trajectory of a sequential solver solved as one lower-triangular system by
fixed-point iteration over a sliding window, every window evaluation in one batched denoiser call per iteration.

Methods: plain Picard iteration (ParaDiGMS: order = window, memory_size = 1) and Triangular Anderson Acceleration
(ParaTAA: order-k unrolled equations, per-time-point Anderson mixing over the upstream residuals).

The step form used here is the affine one, x_{i+1} = a_i x_i + b_i D(x_i; s_i); Euler in sigma (= deterministic
DDIM) has a_i = s_{i+1} / s_i, b_i = 1 - s_{i+1} / s_i. Indices run in sampling order: x_0 is the initial state
(fixed), x_1 .. x_{N-1} are the unknowns.

Stopping rules:
- 'residual' (the references'): an index is converged when the RMS of its first-order residual is <= tol for
  every image; the window's frozen start advances to the first unconverged index. A per-step tolerance does not
  bound the final error (a small frozen error can flip a trajectory into another mode).
- 'final': the frozen start advances only by what the triangular structure makes exact (one index per
  iteration), and the run stops once the whole remaining trajectory is in the window and the final state changed
  by at most `final_tol` (RMS per image) in the last iteration.
"""
import torch

from solvers.common import repeat_cond
from solvers.schedules import get_schedule

PARALLEL_METHODS = ('taa', 'picard')
PARALLEL_SOLVERS = ('euler',)
STOP_RULES = ('residual', 'final')


def step_coefficients(solver, sigmas):
    """(a, b) of the affine step form x_{i+1} = a_i x_i + b_i D(x_i; s_i), float64 [N - 1] each."""
    if solver not in PARALLEL_SOLVERS:
        raise ValueError(f"solver {solver!r} has no parallel step form yet; allowed: {', '.join(PARALLEL_SOLVERS)}")
    s = sigmas.to(torch.float64)
    a = s[1:] / s[:-1]
    return a, 1 - a


def check_parallel_options(method, solver, num_steps, window_size, order, memory_size, max_steps, tol, stop,
                           final_tol):
    """Raise ValueError naming the bad option and what is allowed."""
    if method not in PARALLEL_METHODS:
        raise ValueError(f"unknown parallel method {method!r}; allowed: {', '.join(PARALLEL_METHODS)}")
    if solver not in PARALLEL_SOLVERS:
        raise ValueError(f"solver {solver!r} has no parallel step form yet; use one of: {', '.join(PARALLEL_SOLVERS)}")
    steps = num_steps - 1
    if window_size is not None and not 1 <= window_size <= steps:
        raise ValueError(f"window_size={window_size} must be between 1 and the number of steps ({steps})")
    if order is not None and order < 1:
        raise ValueError(f"order={order} must be >= 1")
    if memory_size < 1:
        raise ValueError(f"memory_size={memory_size} must be >= 1 (1 = no acceleration)")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1 (it caps the parallel iterations)")
    if tol < 0:
        raise ValueError(f"tol={tol} must be >= 0")
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule {stop!r}; allowed: {', '.join(STOP_RULES)}")
    if stop == 'final' and (final_tol is None or final_tol < 0):
        raise ValueError("stop='final' needs final_tol >= 0 (the RMS change of the final state to stop at)")


def _rms(x):
    """RMS over everything but the first two axes ([P, B, ...] -> [P, B])."""
    return x.flatten(2).pow(2).mean(-1).sqrt()


def parallel_sample(net, latents, solver='euler', num_steps=6, schedule_type='polynomial', schedule_rho=7.0,
                    sigma_min=None, sigma_max=None, sigmas=None, cond=None, method='taa', window_size=None,
                    order=None, memory_size=None, max_steps=None, tol=1e-3, stop='residual', final_tol=None,
                    lmd=1e-3, return_iterates=False, **_):
    """Solve the trajectory of `solver` from unit-Gaussian `latents` [B, C, H, W] in parallel.

    window_size: time points evaluated per iteration (default: all steps). order: how many steps back each
    equation reaches (default: the window, i.e. the cumulative Picard form). memory_size: TAA history (default 2
    for 'taa'; 'picard' is memory 1). lmd: Tikhonov weight relative to the mean diagonal of each Gram matrix.
    Returns (samples, stats) with stats = dict(iterations (sequential rounds), evals_per_image, residual (largest
    first-order RMS residual in the last window), final_change, converged, and with return_iterates the final
    state after every iteration [iters, B, ...]). Algebra in float64; the output has the latents' dtype.
    """
    sigma_min = net.sigma_min if sigma_min is None else float(sigma_min)
    sigma_max = net.sigma_max if sigma_max is None else float(sigma_max)
    if sigmas is not None:
        num_steps = len(sigmas)
    if memory_size is None:
        memory_size = 2 if method == 'taa' else 1
    check_parallel_options(method, solver, num_steps, window_size, order, memory_size, max_steps, tol, stop,
                           final_tol)
    if method == 'picard':
        memory_size, order = 1, None
    if sigmas is None:
        sigmas = get_schedule(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, net=net)
    sigmas = torch.as_tensor(sigmas).to(device=latents.device, dtype=torch.float64)
    steps = num_steps - 1
    window = steps if window_size is None else window_size
    order = window if order is None else order
    a, b = step_coefficients(solver, sigmas)
    cum = torch.cat([torch.ones(1, dtype=torch.float64, device=a.device), torch.cumprod(a, 0)])   # C_j
    batch, shape = latents.shape[0], latents.shape[1:]
    expand = (-1,) + (1,) * (len(shape) + 1)

    X = torch.zeros((num_steps, batch) + shape, dtype=torch.float64, device=latents.device)
    X[0] = latents.to(torch.float64) * sigmas[0]
    m = memory_size
    mem_x = torch.zeros((m,) + X.shape, dtype=torch.float64, device=X.device)   # newest first
    mem_r = torch.zeros_like(mem_x)
    count = torch.zeros(num_steps, dtype=torch.long, device=X.device)
    frozen, initialised = 0, 0      # x_0..x_frozen are final; x_0..x_initialised hold a guess
    iterations = evals = 0
    residual = final_change = float('nan')
    iterates = []
    cap = max_steps if max_steps is not None else steps   # the triangular system is exact after `steps` rounds
    while frozen < steps and iterations < cap:
        end = min(frozen + window, steps)
        if initialised < end:       # new indices copy the last guess
            X[initialised + 1:end + 1] = X[initialised]
            initialised = end
        p = torch.arange(frozen, end, device=X.device)               # evaluation points, update indices p + 1
        rows = X[frozen:end].transpose(0, 1).reshape((-1,) + shape)  # image-major: image b's points adjacent
        with torch.no_grad():
            den = net(rows.to(latents.dtype), sigmas[frozen:end].repeat(batch).to(latents.dtype),
                      repeat_cond(cond, end - frozen))
        den = den.to(torch.float64).reshape((batch, end - frozen) + shape).transpose(0, 1)
        iterations += 1
        evals += end - frozen
        bd = b[p].view(expand) * den                                 # b_p D_p  [P, B, ...]
        old = X[frozen + 1:end + 1]
        r1 = a[p].view(expand) * X[frozen:end] + bd - old            # first-order residual
        # order-k right-hand side: x_j = C_j (x_m / C_m + sum_{p=m}^{j-1} b_p D_p / C_{p+1}), m = max(j - k, frozen)
        j = p + 1
        anchor = torch.clamp(j - order, min=frozen)
        prefix = torch.cat([torch.zeros_like(bd[:1]), torch.cumsum(bd / cum[j].view(expand), 0)])  # S at frozen..end
        rhs = cum[j].view(expand) * (X[anchor] / cum[anchor].view(expand) + prefix[j - frozen]
                                     - prefix[anchor - frozen])
        rk = rhs - old
        res = _rms(r1).amax(1)                                       # [P] worst image per index
        residual = float(res.max())
        if stop == 'residual':
            bad = torch.nonzero(res > tol)
            first_bad = int(bad[0]) if len(bad) else end - frozen    # window position of the first unconverged
        else:
            first_bad = 0
        new = old + rk
        if m > 1:
            new = _taa_update(new, old, rk, mem_x, mem_r, count, frozen, end, first_bad, lmd)
        final_before = X[end].clone()
        X[frozen + 1:end + 1] = new
        if return_iterates:
            iterates.append(X[end].clone())
        final_change = float(_rms((X[end] - final_before)[None]).max()) if end == steps else float('nan')
        if stop == 'residual':
            # the first unconverged index got a plain update from converged inputs: it is final too
            frozen = min(frozen + 1 + first_bad, end)
        else:
            frozen += 1
            if end == steps and final_change <= final_tol:
                frozen = steps
    stats = dict(iterations=iterations, evals_per_image=evals, residual=residual, final_change=final_change,
                 converged=frozen >= steps)
    if return_iterates:
        stats['iterates'] = torch.stack(iterates).to(latents.dtype)
    return X[steps].to(latents.dtype), stats


def _taa_update(new, old, rk, mem_x, mem_r, count, frozen, end, first_bad, lmd):
    """Triangular Anderson mixing for the window positions after the first unconverged one: each index solves its
    own small least-squares problem over the residual differences of the indices it depends on (prefix sums over
    the window, frozen + 1 .. itself), per image."""
    idx = slice(frozen + 1, end + 1)
    m = mem_x.shape[0]
    mem_x[:, idx] = torch.roll(mem_x[:, idx], 1, 0)
    mem_r[:, idx] = torch.roll(mem_r[:, idx], 1, 0)
    mem_x[0, idx], mem_r[0, idx] = old, rk
    count[idx] = torch.clamp(count[idx] + 1, max=m)
    cnt = count[idx]                                            # [P]
    if int(cnt.max()) < 2:
        return new
    dx = (mem_x[:-1, idx] - mem_x[1:, idx])                     # [m-1, P, B, ...] newest differences first
    dr = (mem_r[:-1, idx] - mem_r[1:, idx])
    valid = (torch.arange(m - 1, device=cnt.device)[:, None] < (cnt - 1)[None]).to(dx.dtype)   # [m-1, P]
    vshape = valid.shape + (1,) * (dx.ndim - 2)
    dx, dr = dx * valid.view(vshape), dr * valid.view(vshape)
    drf, rkf = dr.flatten(3), rk.flatten(2)                     # [m-1, P, B, D], [P, B, D]
    gram = torch.cumsum(torch.einsum('jpbd,lpbd->pbjl', drf, drf), 0)       # prefix over the window
    rhs = torch.cumsum(torch.einsum('jpbd,pbd->pbj', drf, rkf), 0)
    eye = torch.eye(m - 1, dtype=gram.dtype, device=gram.device)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)[..., None, None]
    gamma = torch.linalg.solve(gram + lmd * scale * eye + 1e-300 * eye, rhs[..., None])[..., 0]   # [P, B, m-1]
    use = (torch.arange(len(cnt), device=cnt.device) > first_bad) & (cnt >= 2)
    gamma = gamma * use.to(gamma.dtype)[:, None, None]
    mix = torch.einsum('pbj,jpbd->pbd', gamma, (dx + dr).flatten(3)).view(new.shape)
    return new - mix
