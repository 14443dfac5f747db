"""Parallel-in-time sampling: a sequential solver's whole run solved as one lower-triangular system by fixed-point
iteration over a sliding window, every evaluation of an iteration in one batched denoiser call.

The step form. Every solver here is explicit and affine in the initial noise, the denoiser outputs and the noise
draws, with coefficients that depend only on the grid (and a learned predictor's tables). `trace_scheme` runs the
sequential solver once on coefficient vectors instead of images and reads off, for its M evaluations in order,

    e_m   = A_m z + sum_{j<m} B_mj D_j + sum_q N_mq xi_q,      D_j = D(e_j; s_j),     m = 0 .. M - 1,
    out   = A_M z + sum_{j<M} B_Mj D_j + sum_q N_Mq xi_q,

z the unit latents, xi_q the noise draws. Unknowns 1..M are the evaluation inputs and the output (e_M = out).
Multistep solvers (DPM-Solver++, UniPC, iPNDM, DEIS) and multi-stage ones (Heun, DPM-2, EPD's parallel points)
need nothing else: their intermediate evaluations are further unknowns. AMED is not affine (a network of the
state picks its times), so it has no step form.

Equations. The order-k equation of unknown m anchors it at unknown a = max(m - k, f) (f: the window's frozen
start) by the exact identity  e_m = r e_a + sum_j (B_mj - r B_aj) D_j + ...  with r = A_m / A_a, which cancels the
latents. For DDIM this is the reference's order-k unrolled recursion; order 1 is the step-by-step recursion,
order >= window the cumulative (Picard, ParaDiGMS) form. Iterating X <- X + R^(k)(X) makes unknowns 1..i exact
after i iterations (the system is triangular), so M iterations reproduce the sequential run.

Triangular Anderson acceleration (ParaTAA): unknown m mixes its last `memory_size` iterates with one small
least-squares problem over the residuals of the unknowns it depends on (f, m], per image.

Units. States are compared in VP units, x / sqrt(1 + sigma^2) (the DDIM states of the reference): tolerances,
the Anderson inner products and the initial guess (new unknowns copy the last guess in these units). In VE units
the state at sigma = 80 is 80 times larger and dominated the residuals: every tolerance was far tighter at high
noise than at low noise and the Anderson weights saw only the first steps.

Stopping rules (per image; images that stop leave the batched call):
- 'residual' (the references'): an unknown is converged when the RMS of its first-order residual is <= tol; the
  frozen start advances to the first unconverged unknown (it received a plain update from converged inputs).
  A per-step tolerance does not bound the final error: a small frozen error can flip the image into another
  mode of the data.
- 'final' (the default): once the window reaches the output, the frozen start advances only by what the
  triangular structure makes exact (one unknown per iteration, or to the first unknown whose residual is not
  exactly 0; while a shorter window slides towards the output it advances by the per-step rule with tol, else a
  window of W would take M - W rounds to get there), and the image stops when the
  window reaches the output and the a-posteriori error estimate c_i q / (1 - q) is at most final_tol in two
  consecutive iterations; c_i is the RMS change a plain update of the output would make (its cumulative equation
  from the frozen start through the current denoiser values, VP units) and q = c_i / c_{i-1} < 1; the output is
  that plain update. A bound on what users see for a contracting iteration. For TAA c_i is this residual, not the
  Anderson step's change: measured, an Anderson step that stalled (memory 4) changed the output by little in two
  consecutive iterations while it was still in the wrong mode. (A single small change is no bound either:
  measured, a change below 1e-2 left errors of 3e-2.)

Safeguard (guard): Anderson mixing slows the phase in which a mode decision travels down the trajectory and
speeds up the contracting phase after it; unknown m is mixed only where the sum of its upstream squared residuals
fell below guard times the last iteration's, and takes the plain step elsewhere.
"""
from dataclasses import dataclass, field

import torch

PARALLEL_METHODS = ('taa', 'picard')
STOP_RULES = ('residual', 'final')
# Defaults measured in docs/parallel.md (DDIM-100 on the image-shaped mixture, 16 images): TAA memory 2 with the
# contraction guard and the final-state rule, 8.1 rounds per image on average, 14 for the slowest, errors against
# the sequential output below 4e-4 of the data range and no image in the wrong mode.
FINAL_TOL = 5e-3
GUARD = 0.5


# -- the step form ---------------------------------------------------------------------------------------------

@dataclass
class Scheme:
    """A sequential solver as a lower-triangular affine system (float64, on the CPU)."""
    times: torch.Tensor       # [M] sigma passed to the denoiser at evaluation m
    levels: torch.Tensor      # [M + 1] noise level of each unknown (the output's last)
    coef_z: torch.Tensor      # [M + 1] coefficient of the unit latents
    coef_d: torch.Tensor      # [M + 1, M] coefficients of the denoiser outputs, strictly lower triangular
    coef_n: torch.Tensor      # [M + 1, Q] coefficients of the noise draws
    noise_keys: list = field(default_factory=list)   # the Q keys the solver drew noise with, in order
    rounds: int = 0           # sequential denoiser calls of the solver (its latency in rounds)

    @property
    def num_evals(self):
        return len(self.times)


class _Tracer:
    """Stands in for the denoiser while tracing: records each row's input coefficients and sigma, and answers
    with a fresh unit coefficient (D_m's column). Every other attribute is the real denoiser's."""

    forward_ad = False      # a solver that differentiates the denoiser takes its finite-difference path (refused)

    def __init__(self, net, width, offset, scale=1.0):
        self._net, self._width, self._offset, self._scale = net, width, offset, scale
        self.inputs, self.times, self.calls = [], [], 0

    def __getattr__(self, name):
        return getattr(self._net, name)

    def __call__(self, x, sigma, cond=None, return_bottleneck=False):
        if return_bottleneck:
            raise ValueError("this solver reads the denoiser's features to choose its steps (AMED), so it is not "
                             "affine and has no parallel step form; use euler, ddim, dpmpp, unipc, ipndm, deis, "
                             "heun, dpm or an EPD predictor")
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = torch.zeros_like(x)
        for row in range(x.shape[0]):
            m = len(self.times)
            self.inputs.append(x[row].reshape(-1).clone())
            self.times.append(float(sigma[row]))
            if self._width:
                out[row].view(-1)[self._offset + m] = self._scale
        return out


class _NoiseTracer:
    def __init__(self, width, offset, scale=1.0):
        self.width, self.offset, self.scale, self.keys = width, offset, scale, []

    def __call__(self, key, like):
        out = torch.zeros_like(like)
        if self.width:
            out.view(like.shape[0], -1)[:, self.offset + len(self.keys)] = self.scale
        self.keys.append(key)
        return out


def trace_scheme(run, net, out_level):
    """The step form of `run(net, latents, noise) -> output`, a sequential solver called on one flat 'image'.

    run must draw every random number through `noise(key, like)` (None when it draws none). out_level: the noise
    level of the output (the grid's last sigma, 0 after a final denoising)."""
    def trace(width, m_off, q_off, scale=1.0):
        tracer, noise = _Tracer(net, width, m_off, scale), _NoiseTracer(width, q_off, scale)
        z = torch.zeros(1, max(width, 1), dtype=torch.float64)
        if width:
            z[0, 0] = scale
        with torch.no_grad():
            out = run(tracer, z, noise)
        return tracer, noise, out
    tracer, noise, _ = trace(0, 0, 0)                  # count the evaluations and draws
    M, Q = len(tracer.times), len(noise.keys)
    tracer, noise, out = trace(1 + M + Q, 1, 1 + M)
    if len(tracer.times) != M or len(noise.keys) != Q:
        raise ValueError("the solver's evaluations changed between two traces; it has no fixed step form")
    rows = torch.stack(tracer.inputs + [out.reshape(-1)]).to(torch.float64)        # [M + 1, 1 + M + Q]
    # Affine with grid-only coefficients: scaling every input by 2 scales every row by 2 (exactly, in binary
    # floating point). A solver that differentiates the denoiser (finite differences scaled by the state) or picks
    # its steps from the state fails this.
    tracer2, noise2, out2 = trace(1 + M + Q, 1, 1 + M, scale=2.0)
    rows2 = (torch.stack(tracer2.inputs + [out2.reshape(-1)]).to(torch.float64)
             if len(tracer2.times) == M and len(noise2.keys) == Q else None)
    if rows2 is None or not torch.allclose(rows2, 2 * rows, rtol=1e-9, atol=1e-12 * float(rows.abs().max())):
        raise ValueError("this solver is not affine in the denoiser outputs (it differentiates the denoiser, e.g. "
                         "sed2, or chooses its steps from the state, e.g. AMED), so it has no parallel step form; "
                         "use euler, ddim, dpmpp, unipc, ipndm, deis, heun, dpm, edm_sde, euler_maruyama, sed_ref or "
                         "an EPD predictor")
    coef_d = rows[:, 1:1 + M]
    if M and bool((torch.triu(coef_d[:M], 0) != 0).any()):
        raise ValueError("an evaluation depends on its own or a later denoiser output; the solver is not explicit")
    levels = torch.tensor(tracer.times + [float(out_level)], dtype=torch.float64)
    return Scheme(torch.tensor(tracer.times, dtype=torch.float64), levels, rows[:, 0].clone(), coef_d.clone(),
                  rows[:, 1 + M:].clone(), list(noise.keys), tracer.calls)


# -- options ---------------------------------------------------------------------------------------------------

def check_parallel_options(method, num_evals, window_size=None, order=None, memory_size=None, max_steps=None,
                           tol=1e-4, stop='final', final_tol=FINAL_TOL, lmd=1e-3):
    """Raise ValueError naming the bad option and what is allowed."""
    if method not in PARALLEL_METHODS:
        raise ValueError(f"unknown parallel method {method!r}; allowed: {', '.join(PARALLEL_METHODS)}")
    if window_size is not None and not 1 <= window_size <= num_evals:
        raise ValueError(f"window_size={window_size} must be between 1 and the number of denoiser evaluations of "
                         f"the sequential run ({num_evals})")
    if order is not None and order < 1:
        raise ValueError(f"order={order} must be >= 1")
    if memory_size is not None and memory_size < 1:
        raise ValueError(f"memory_size={memory_size} must be >= 1 (1 = no acceleration)")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1 (it caps the parallel iterations)")
    if tol is None or tol < 0:
        raise ValueError(f"tol={tol} must be >= 0")
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule {stop!r}; allowed: {', '.join(STOP_RULES)}")
    if stop == 'final' and (final_tol is None or final_tol < 0):
        raise ValueError("stop='final' needs final_tol >= 0 (the RMS change of the output to stop at)")
    if lmd < 0:
        raise ValueError(f"lmd={lmd} must be >= 0")


def _index_cond(cond, index):
    """The rows `index` of a condition (tensor, dict/list of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[index.to(cond.device)]
    if isinstance(cond, dict):
        return {k: _index_cond(v, index) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_index_cond(v, index) for v in cond)
    return cond


def evaluate_all(call, rows):
    """The default evaluator: all rows of the window in one call (see torch_utils.distributed.split_evaluate)."""
    return call(0, rows)


# -- the solver ------------------------------------------------------------------------------------------------

def solve_parallel(net, scheme, latents, cond=None, noise=None, method='taa', window_size=None, order=None,
                   memory_size=None, max_steps=None, tol=1e-4, stop='final', final_tol=FINAL_TOL, lmd=1e-3,
                   return_iterates=False, init_trajectory=None, variation_steps=None, evaluate=evaluate_all,
                   guard=GUARD):
    """Solve `scheme` (from trace_scheme) from unit latents [B, ...] by fixed-point iteration.

    window_size: unknowns updated per image per iteration (default: all). order: how many unknowns back each
    equation is anchored (default: the window, the cumulative form). memory_size: TAA history (default 2 for
    'taa'; 'picard' is memory 1, order = window). lmd: Tikhonov weight relative to the mean diagonal of each
    Gram matrix. guard: mix an unknown only where its upstream residual norm fell below guard times the last
    iteration's (None: always; the reference's TAA). noise: a source `noise(key, like)` for stochastic schemes (every draw is made up front).
    init_trajectory [M + 1, B, ...] with variation_steps K: start from a previous run's unknowns and re-solve
    only the last K (the reference's warm start). evaluate(call, rows): how the rows of the batched call are
    evaluated (e.g. split across workers); call(lo, hi) evaluates rows lo:hi.

    Returns (output [B, ...] in the latents' dtype, stats) with stats: iterations (sequential rounds of the
    batch), rounds [B] (per image), evals_per_image [B], residual [B] (largest first-order residual of the
    unknowns accepted as converged in the image's last iteration, VP units), final_change [B], converged [B], trajectory [M + 1, B, ...] (float64), and
    with return_iterates the output's estimate after every iteration [iters, B, ...].
    """
    M = scheme.num_evals
    if memory_size is None:
        memory_size = 2 if method == 'taa' else 1
    check_parallel_options(method, M, window_size, order, memory_size, max_steps, tol, stop, final_tol, lmd)
    if guard is not None and not guard > 0:
        raise ValueError(f"guard={guard} must be > 0 (or None for unguarded Anderson mixing)")
    if scheme.noise_keys and noise is None:
        raise ValueError("this solver draws noise (eta > 0); pass a per-image noise source (solvers.noise)")
    window = M if window_size is None else window_size
    if method == 'picard':
        memory_size, order = 1, window
    order = window if order is None else order
    dev, f64 = latents.device, torch.float64
    B, shape = latents.shape[0], latents.shape[1:]
    D = latents[0].numel()
    sc = {k: getattr(scheme, k).to(dev) for k in ('times', 'levels', 'coef_z', 'coef_d', 'coef_n')}
    vp = torch.sqrt(1 + sc['levels'] ** 2)                               # [M + 1] VP scale of each unknown
    z = latents.reshape(B, D).to(f64)
    base = sc['coef_z'][:, None, None] * z[None]                         # [M + 1, B, D] the known part
    if scheme.noise_keys:
        draws = torch.stack([noise(k, latents).reshape(B, D).to(f64) for k in scheme.noise_keys])   # [Q, B, D]
        base = base + torch.einsum('mq,qbd->mbd', sc['coef_n'], draws)
    if bool((sc['coef_d'][0] != 0).any()):
        raise ValueError("the first evaluation depends on a denoiser output; the scheme has no known start")

    X = torch.zeros((M + 1, B, D), dtype=f64, device=dev)
    X[0] = base[0]
    den = torch.zeros((M, B, D), dtype=f64, device=dev)                 # latest D of each evaluation
    fresh = torch.zeros((M, B), dtype=torch.bool, device=dev)            # den is D at the current X
    frozen = torch.zeros(B, dtype=torch.long, device=dev)               # unknowns 0..frozen are final
    init_to = torch.zeros(B, dtype=torch.long, device=dev)              # unknowns 0..init_to hold a guess
    if init_trajectory is not None:
        init = torch.as_tensor(init_trajectory).to(device=dev, dtype=f64).reshape(-1, B, D)
        if init.shape[0] != M + 1:
            raise ValueError(f"the initial trajectory has {init.shape[0]} states, the solver {M + 1}; it comes "
                             "from another solver or grid")
        K = M if variation_steps is None else int(variation_steps)
        if not 1 <= K <= M:
            raise ValueError(f"variation_steps={K} must be between 1 and the number of evaluations ({M})")
        X[1:] = init[1:]
        frozen[:] = M - K
        init_to[:] = M
    m_idx = torch.arange(M + 1, device=dev)
    coef_scale = float(sc['coef_d'].abs().max()) if M else 0.0         # below 1e-12 of it: a rounding zero
    j_idx = torch.arange(M, device=dev)
    mem = memory_size
    mem_x = torch.zeros((mem, M + 1, B, D), dtype=f64, device=dev) if mem > 1 else None   # newest first
    mem_r = torch.zeros_like(mem_x) if mem > 1 else None
    count = torch.zeros((M + 1, B), dtype=torch.long, device=dev)
    active = frozen < M
    rounds = torch.zeros(B, dtype=torch.long)
    evals = torch.zeros(B, dtype=torch.long)
    residual = torch.full((B,), float('nan'), dtype=f64)
    change = torch.full((B,), float('nan'), dtype=f64)
    iterates = []
    cap = max_steps if max_steps is not None else M      # the triangular system is exact after M rounds
    iterations = 0
    calm = torch.zeros(B, dtype=torch.long)            # consecutive iterations with the estimate below final_tol
    while bool(active.any()) and iterations < cap:
        end = torch.clamp(frozen + window, max=M)                        # unknowns (frozen, end] are updated
        # New unknowns copy the last guess, in VP units.
        grow = active & (init_to < end)
        for b in torch.nonzero(grow).reshape(-1).tolist():
            lo, hi = int(init_to[b]), int(end[b])
            X[lo + 1:hi + 1, b] = X[lo, b] / vp[lo] * vp[lo + 1:hi + 1, None]
            init_to[b] = hi
        upd = active[None] & (m_idx[:, None] > frozen[None]) & (m_idx[:, None] <= end[None])   # [M + 1, B]
        # Anchors and coefficients of the order-k and first-order equations.
        coef_k, anchor_k, ratio_k = _equations(sc, frozen, order, m_idx)
        coef_1, anchor_1, ratio_1 = _equations(sc, frozen, 1, m_idx)
        # Evaluations: the window's own, plus earlier ones the equations use whose D is not at the current state
        # (unknowns frozen in the last iteration, multistep history after a warm start): no extra round.
        need = (active[None] & (j_idx[:, None] >= frozen[None]) & (j_idx[:, None] < end[None]))
        uses = ((coef_k.abs() + coef_1.abs()) * upd[..., None]).amax(0).T > 1e-12 * coef_scale   # [M, B]
        if stop == 'final':     # the output's cumulative equation (the final-state test) uses these too
            coef_o, anchor_o, ratio_o = _output_equation(sc, frozen)
            uses = uses | ((coef_o.abs() * (end == M)[:, None]).T > 1e-12 * coef_scale)
        need = need | (uses & ~fresh & active[None])
        jj, bb = torch.nonzero(need, as_tuple=True)
        order_rows = torch.argsort(bb * (M + 1) + jj)                    # image-major: an image's points adjacent
        jj, bb = jj[order_rows], bb[order_rows]
        rows_x = X[jj, bb].reshape((-1,) + shape).to(latents.dtype)
        rows_s = sc['times'][jj].to(latents.dtype)
        rows_c = _index_cond(cond, bb)

        def call(lo, hi):
            if hi <= lo:
                return torch.zeros((0, D), dtype=latents.dtype, device=dev)
            with torch.no_grad():
                return net(rows_x[lo:hi], rows_s[lo:hi], _index_cond(rows_c, torch.arange(lo, hi))
                           if rows_c is not None else None).reshape(hi - lo, D)
        out = evaluate(call, len(jj))
        den[jj, bb] = out.to(f64)
        fresh[jj, bb] = True
        evals += torch.bincount(bb.cpu(), minlength=B)
        rounds += active.cpu().long()
        iterations += 1
        # Residuals of the updated unknowns.
        rhs_k = _rhs(X, base, den, coef_k, anchor_k, ratio_k)
        rhs_1 = _rhs(X, base, den, coef_1, anchor_1, ratio_1)
        rk = (rhs_k - X) * upd[..., None]
        r1 = _rms((rhs_1 - X) / vp[:, None, None]) * upd                 # [M + 1, B]
        # First unconverged unknown per image (the end of the window if none).
        if stop == 'residual':
            bad = upd & (r1 > tol)
        else:       # sliding (the window short of the output): the per-step rule; then only exactness
            bad = upd & (r1 > torch.where(end < M, tol, 0.0)[None])
        first_bad = torch.where(bad.any(0), torch.where(bad, m_idx[:, None], M + 1).min(0).values, end)
        # Residual at stop: the largest among the unknowns accepted as converged (before the first unconverged
        # one, which gets a plain update from them), or the window's largest if none was.
        accepted = upd & (m_idx[:, None] < first_bad[None])
        last_res = torch.where(accepted.any(0), (r1 * accepted).max(0).values, r1.max(0).values)
        residual = torch.where(active.cpu(), last_res.cpu(), residual)
        new = X + rk
        if mem > 1:
            new = _taa(new, X, rk, upd, mem_x, mem_r, count, first_bad, frozen, vp, lmd, m_idx, guard)
        if stop == 'final':
            # The change a plain update of the output would make, from the frozen start through every current
            # denoiser value (Picard's step; for TAA the residual, which an Anderson step that stalls cannot hide).
            b_all = torch.arange(B, device=dev)
            plain_out = (ratio_o[:, None] * X[anchor_o, b_all] + base[M] - ratio_o[:, None] * base[anchor_o, b_all]
                         + torch.einsum('bj,jbd->bd', coef_o, den))
            step_change = (_rms(plain_out - X[M]) / vp[M]).cpu()
        out_before = X[M].clone()
        X = torch.where(upd[..., None], new, X)
        if stop == 'residual':
            step_change = (_rms(X[M] - out_before) / vp[M]).cpu()
        fresh &= ~upd[:M]
        reach = active.cpu() & (end == M).cpu()
        prev_change = torch.where(reach, change, torch.full_like(change, float('nan')))
        change = torch.where(reach, step_change, change)
        # A posteriori error estimate of a contraction: |x_i - x*| <= c_i q / (1 - q), q = c_i / c_{i-1}.
        q = change / prev_change
        estimate = torch.where(q < 1, change * q / (1 - q), torch.full_like(change, float('inf')))
        # Advance the frozen start.
        if stop == 'residual':
            frozen = torch.where(active, first_bad, frozen)
        else:
            frozen = torch.where(active, torch.maximum(frozen + 1, torch.minimum(first_bad, end)), frozen)
            calm = torch.where(reach & (estimate <= final_tol), calm + 1, torch.zeros_like(calm))
            done = active & (end == M) & (calm.to(dev) >= 2)
            X[M] = torch.where(done[:, None], plain_out, X[M])     # the estimate bounds the plain update's error
            frozen = torch.where(done, torch.full_like(frozen, M), frozen)
        frozen = torch.clamp(frozen, max=M)
        active = frozen < M
        if return_iterates:
            iterates.append(X[M].clone())
    stats = dict(iterations=iterations, rounds=rounds, evals_per_image=evals, residual=residual,
                 final_change=change, converged=(frozen >= M).cpu(), trajectory=X.reshape((M + 1, B) + shape),
                 sequential_rounds=scheme.rounds)
    if return_iterates:
        stats['iterates'] = torch.stack(iterates).reshape((-1, B) + shape).to(latents.dtype)
    return X[M].reshape((B,) + shape).to(latents.dtype), stats


def _rms(x):
    """RMS over the last axis ([..., D] -> [...])."""
    return x.pow(2).mean(-1).sqrt()


def _equations(sc, frozen, order, m_idx):
    """Per unknown m and image b: the anchor a = max(m - order, frozen_b) (clamped below m), the ratio
    r = A_m / A_a (0 where A_a = 0: the cumulative form from the latents) and the coefficients of the denoiser
    outputs B_m - r B_a, [M + 1, B, M]."""
    anchor = torch.maximum(m_idx[:, None] - order, frozen[None])
    anchor = torch.minimum(anchor, torch.clamp(m_idx[:, None] - 1, min=0))
    A = sc['coef_z']
    A_a = A[anchor]
    ratio = torch.where(A_a != 0, A[:, None] / torch.where(A_a != 0, A_a, torch.ones_like(A_a)),
                        torch.zeros_like(A_a))
    coef = sc['coef_d'][:, None, :] - ratio[..., None] * sc['coef_d'][anchor]
    return coef, anchor, ratio


def _output_equation(sc, frozen):
    """The output's cumulative equation per image, anchored at the frozen start: coefficients [B, M], anchor and
    ratio [B]."""
    M = sc['coef_d'].shape[1]
    anchor = torch.clamp(frozen, max=M - 1)
    A = sc['coef_z']
    A_a = A[anchor]
    ratio = torch.where(A_a != 0, A[M] / torch.where(A_a != 0, A_a, torch.ones_like(A_a)), torch.zeros_like(A_a))
    return sc['coef_d'][M][None] - ratio[:, None] * sc['coef_d'][anchor], anchor, ratio


def _rhs(X, base, den, coef, anchor, ratio):
    """r X_a + (base_m - r base_a) + sum_j coef_mj D_j, for every unknown and image [M + 1, B, D]."""
    b_idx = torch.arange(X.shape[1], device=X.device)[None].expand_as(anchor)
    r = ratio[..., None]
    return (r * X[anchor, b_idx] + base - r * base[anchor, b_idx]
            + torch.einsum('mbj,jbd->mbd', coef, den))


def _taa(new, old, rk, upd, mem_x, mem_r, count, first_bad, frozen, vp, lmd, m_idx, guard=None):
    """Triangular Anderson mixing: unknown m of image b (after b's first unconverged unknown, with history)
    solves its own least-squares problem over the residual differences of the unknowns (frozen_b, m] it depends
    on, inner products in VP units; the update is x + R - sum_j gamma_j (dX_j + dR_j)."""
    m = mem_x.shape[0]
    push = upd[None, ..., None]
    mem_x.copy_(torch.where(push, torch.cat([old[None], mem_x[:-1]]), mem_x))
    mem_r.copy_(torch.where(push, torch.cat([rk[None], mem_r[:-1]]), mem_r))
    count.copy_(torch.where(upd, torch.clamp(count + 1, max=m), count))
    if int((count * upd).max()) < 2:
        return new
    w = (1 / vp)[None, :, None, None]
    valid = (torch.arange(m - 1, device=count.device)[:, None, None] < (count - 1)[None]) & upd[None]   # [m-1, M+1, B]
    dx = (mem_x[:-1] - mem_x[1:]) * valid[..., None]
    dr = (mem_r[:-1] - mem_r[1:]) * valid[..., None]
    drw, rkw = dr * w, rk * w[0]
    gram = torch.cumsum(torch.einsum('jmbd,lmbd->mbjl', drw, drw), 0)   # prefix over the unknowns (upstream)
    rhs = torch.cumsum(torch.einsum('jmbd,mbd->mbj', drw, rkw), 0)
    eye = torch.eye(m - 1, dtype=gram.dtype, device=gram.device)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)[..., None, None]
    gamma = torch.linalg.solve(gram + (lmd * scale + 1e-300) * eye, rhs[..., None])[..., 0]       # [M+1, B, m-1]
    use = upd & (m_idx[:, None] > first_bad[None]) & (count >= 2)
    if guard:
        # Safeguard: mix only where the upstream residual norm fell since the last iteration (the iteration is
        # contracting there); elsewhere (a mode decision still moving down the trajectory) take the plain step.
        # (Both over the unknowns updated now: a frozen unknown's last residual is not compared with a zero.)
        now = torch.cumsum((rkw ** 2).sum(-1), 0)
        before = torch.cumsum(((mem_r[1] * w[0]) ** 2).sum(-1) * upd, 0)
        use = use & (now < guard * before)
    gamma = gamma * use[..., None] * valid.permute(1, 2, 0)
    mix = torch.einsum('mbj,jmbd->mbd', gamma, dx + dr)
    return new - mix


# -- any registered solver or EPD predictor --------------------------------------------------------------------

def solver_scheme(net, solver='euler', num_steps=6, schedule_type='polynomial', schedule_rho=7.0, sigma_min=None,
                  sigma_max=None, sigmas=None, predictor=None, denoise_to_zero=False, eta=0.0, **options):
    """The step form of a registered solver's run (the options of solvers.sample) or of a learned predictor's."""
    import solvers
    if predictor is not None:
        grid = predictor.schedule(net).to(torch.float64)
        return trace_scheme(lambda tnet, z, noise: predictor.sample(tnet, z), net, float(grid[-1]))
    if solver not in solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(sorted(solvers.SOLVERS))}")
    if sigmas is not None:
        grid, ends_at_zero = solvers.check_grid(sigmas)
        denoise_to_zero = denoise_to_zero or ends_at_zero
    else:
        grid = solvers.get_schedule(num_steps, net.sigma_min if sigma_min is None else float(sigma_min),
                                    net.sigma_max if sigma_max is None else float(sigma_max), schedule_type,
                                    schedule_rho, net=net)
    if eta:
        if solver != 'ddim':
            raise ValueError(f"eta={eta} is for solver 'ddim' (stochastic DDIM); {solver!r} is deterministic")
        options = dict(options, eta=eta)
    opts = dict(options, solver=solver, num_steps=num_steps, schedule_type=schedule_type, schedule_rho=schedule_rho,
                sigma_min=sigma_min, sigma_max=sigma_max, sigmas=sigmas, denoise_to_zero=denoise_to_zero)
    out_level = 0.0 if denoise_to_zero else float(grid[-1])
    return trace_scheme(lambda tnet, z, noise: solvers.sample(tnet, z, noise=noise, **opts), net, out_level)


PARALLEL_KEYS = ('method', 'window_size', 'order', 'memory_size', 'max_steps', 'tol', 'stop', 'final_tol', 'lmd',
                 'return_iterates', 'init_trajectory', 'variation_steps', 'evaluate', 'guard')


def parallel_sample(net, latents, cond=None, noise=None, **options):
    """solvers.sample's run (same options, or predictor=) solved in parallel; the parallel options are those of
    solve_parallel. Returns (samples, stats)."""
    par = {k: options.pop(k) for k in PARALLEL_KEYS if k in options}
    scheme = solver_scheme(net, **options)
    return solve_parallel(net, scheme, latents, cond=cond, noise=noise, **par)
