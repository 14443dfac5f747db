"""The numerical core: schedules, solvers registered by name, and the one entry point `sample`.

Pure functions over a denoiser (models/base.py): no I/O, no model-family special cases.
"""
import contextlib
import math
from dataclasses import dataclass

import torch

from solvers import classical, stochastic
from solvers.exact import exact, solve_exact  # noqa: F401
from solvers.schedules import SCHEDULES, get_schedule


@dataclass(frozen=True)
class SolverInfo:
    fn: object
    evals_per_step: int          # denoiser evaluations per step
    orders: tuple = (None,)      # allowed max_order values (None: the option does not apply)
    default_order: int = None
    stochastic: bool = False     # takes a per-image noise source (noise=solvers.noise.ImageNoise(seeds))
    nfe: object = None           # nfe(num_steps, denoise_to_zero, **options) where the count is not per step


SOLVERS = {
    'euler': SolverInfo(classical.euler, 1),
    'ddim': SolverInfo(classical.ddim, 1),          # Euler with eta > 0: stochastic DDIM (needs noise=)
    'heun': SolverInfo(classical.heun, 2),
    'dpm': SolverInfo(classical.dpm, 2),
    'dpmpp': SolverInfo(classical.dpmpp, 1, (1, 2, 3), 3),
    'unipc': SolverInfo(classical.unipc, 1, (1, 2, 3), 3),
    'deis': SolverInfo(classical.deis, 1, (1, 2, 3, 4), 4),
    'ipndm': SolverInfo(classical.ipndm, 1, (1, 2, 3, 4), 4),
    'ipndm_v': SolverInfo(classical.ipndm_v, 1, (1, 2, 3, 4), 4),
    # stochastic samplers (solvers/stochastic.py); a JVP pass counts as one evaluation, reported apart
    'edm_sde': SolverInfo(stochastic.edm_sde, 2, stochastic=True),
    'euler_maruyama': SolverInfo(stochastic.euler_maruyama, 1, stochastic=True),
    'sed2': SolverInfo(stochastic.sed2, 1, stochastic=True, nfe=lambda num_steps, denoise_to_zero=False,
                       drift='lagged', **_: (num_steps - 1) * (2 if drift == 'fresh' else 1)
                       + int(drift != 'fresh') + int(bool(denoise_to_zero))),
    'sed_ref': SolverInfo(stochastic.sed_ref, 1, stochastic=True, nfe=lambda num_steps, **_: num_steps),
}
# Named variants of a solver's update (--variant); the first is the default.
VARIANTS = {'unipc': ('bh2', 'bh1'), 'dpmpp': classical.DPMPP_VARIANTS}


def default_variant(solver):
    """The variant a solver runs when none is given (None for solvers without variants)."""
    return VARIANTS.get(solver, (None,))[0]


def ode_solvers():
    """Names of the deterministic probability-flow ODE solvers, the ones compared against the exact ODE solution
    (ddim is left out: at eta = 0 it is euler)."""
    return [name for name, info in SOLVERS.items() if not info.stochastic and name != 'ddim']


def register(name, info):
    """Add a solver (learned solvers register themselves this way)."""
    SOLVERS[name] = info


def nfe_formula(solver, num_steps, afs=False, denoise_to_zero=False, **_):
    """Denoiser evaluations per sample of a classical solver run (the counted value must match it)."""
    info = SOLVERS[solver]
    if info.nfe is not None:
        return info.nfe(num_steps, denoise_to_zero=denoise_to_zero, **_)
    return info.evals_per_step * (num_steps - 1) - int(bool(afs)) + int(bool(denoise_to_zero))


def check_options(solver, num_steps, schedule_type='polynomial', sigma_min=None, sigma_max=None, max_order=None,
                  variant=None, schedule_rho=None, afs=False, denoise_to_zero=False, **options):
    """Raise ValueError naming the bad option and its allowed values. sigma_min/sigma_max/schedule_rho may be None
    (not known yet: the model's); the checks that need them are then left for when they are."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(sorted(SOLVERS))}")
    if schedule_type not in SCHEDULES:
        raise ValueError(f"unknown schedule_type {schedule_type!r}; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 2 (it counts time points, num_steps - 1 "
                         "steps)")
    orders = SOLVERS[solver].orders
    if max_order is not None and max_order not in orders:
        allowed = 'none (the option does not apply)' if orders == (None,) else f'{orders[0]}-{orders[-1]}'
        raise ValueError(f"max_order={max_order} is out of range for solver {solver!r}; allowed: {allowed}")
    if schedule_rho is not None and not (math.isfinite(schedule_rho) and schedule_rho > 0):
        raise ValueError(f"schedule_rho={schedule_rho} must be a finite number > 0")
    for name, value in (('sigma_min', sigma_min), ('sigma_max', sigma_max)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value} must be a finite noise level > 0 (0 < sigma_min < sigma_max)")
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} and sigma_max={sigma_max} must satisfy 0 < sigma_min < sigma_max")
    if variant is not None:
        if solver not in VARIANTS:
            raise ValueError(f"variant={variant!r} given, but solver {solver!r} has no variants (solvers with "
                             f"variants: {', '.join(sorted(VARIANTS))}); drop the variant")
        if variant not in VARIANTS[solver]:
            raise ValueError(f"variant={variant!r} is not a variant of solver {solver!r}; allowed: "
                             f"{', '.join(sorted(VARIANTS[solver]))}")
    if SOLVERS[solver].stochastic:
        stochastic.check_options(solver, **options)
    if nfe_formula(solver, num_steps, afs, denoise_to_zero) < 1:
        raise ValueError(f"solver {solver!r} with num_steps={num_steps} and afs=True makes no denoiser evaluation "
                         "(the images would be the scaled noise); use num_steps >= 3 or afs=False")


def check_grid(sigmas):
    """Return (sigmas without a final 0, whether it ended at 0); raise ValueError for a grid that is not strictly
    decreasing, is negative, or has too few positive points."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 time points; got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()) or sigmas[-1] < 0:
        raise ValueError(f"sigmas must be finite, strictly decreasing and >= 0; got {sigmas.tolist()}")
    ends_at_zero = bool(sigmas[-1] == 0)
    if ends_at_zero:
        sigmas = sigmas[:-1]
        if len(sigmas) < 2:
            raise ValueError("a grid ending at sigma = 0 needs at least 2 positive time points before the 0; got "
                             f"{len(sigmas)}")
    return sigmas, ends_at_zero


def check_eval_grid(sigmas, eval_sigmas):
    """The decoupled evaluation grid cut to the grid's positive points; raise ValueError unless it has the grid's
    length and is finite and positive there (it need not be decreasing: LD3 bounds its moves instead)."""
    sigmas, eval_sigmas = torch.as_tensor(sigmas), torch.as_tensor(eval_sigmas)
    if eval_sigmas.shape != sigmas.shape:
        raise ValueError(f"eval_sigmas must have the grid's shape {tuple(sigmas.shape)}; got "
                         f"{tuple(eval_sigmas.shape)}")
    if len(sigmas) and sigmas[-1] == 0:
        eval_sigmas = eval_sigmas[:-1]
    if not bool(torch.isfinite(eval_sigmas).all()) or not bool((eval_sigmas > 0).all()):
        raise ValueError(f"eval_sigmas must be finite and positive at the grid's positive points; got "
                         f"{eval_sigmas.tolist()}")
    return eval_sigmas


def sample(net, latents, solver='euler', num_steps=6, schedule_type='polynomial', schedule_rho=7.0, sigma_min=None,
           sigma_max=None, afs=False, denoise_to_zero=False, max_order=None, predict_x0=True, lower_order_final=True,
           cond=None, predictor=None, sigmas=None, eval_sigmas=None, return_trajectory=False, **options):
    """Integrate from unit-Gaussian `latents` [B, C, H, W] to samples with a registered solver.

    With a `predictor` (a trained learned-solver predictor), its stored settings are used and the keyword
    settings ignored. `sigmas` overrides the schedule (a strictly decreasing tensor; num_steps is then its length); a
    final 0 is taken as a final Euler step, i.e. denoise_to_zero at the last positive sigma. `eval_sigmas` (needs
    `sigmas`) is a decoupled evaluation grid of the same length: the network is queried there, the coefficients use
    `sigmas` (a final 0 of the grid is matched by a final 0 or any value of eval_sigmas, which then goes unused
    except by denoise_to_zero's call at eval_sigmas' last positive point).
    dtype and device follow the latents.
    """
    if predictor is not None:
        return predictor.sample(net, latents, cond=cond, return_trajectory=return_trajectory)
    sigma_min = net.sigma_min if sigma_min is None else float(sigma_min)
    sigma_max = net.sigma_max if sigma_max is None else float(sigma_max)
    if eval_sigmas is not None and sigmas is None:
        raise ValueError("eval_sigmas (a decoupled evaluation grid) needs the grid itself: pass sigmas as well")
    if sigmas is not None:
        if eval_sigmas is not None:
            eval_sigmas = check_eval_grid(sigmas, eval_sigmas)
        sigmas, ends_at_zero = check_grid(sigmas)
        # A final step to sigma = 0 (the k-diffusion habit) is an Euler step, which lands exactly on D(x; s_last).
        denoise_to_zero = denoise_to_zero or ends_at_zero
        num_steps = len(sigmas)
    check_options(solver, num_steps, schedule_type, sigma_min, sigma_max, max_order, schedule_rho=schedule_rho,
                  afs=afs, denoise_to_zero=denoise_to_zero, **options)
    info = SOLVERS[solver]
    if info.stochastic and (afs or eval_sigmas is not None):
        raise ValueError(f"{solver} is a stochastic sampler: afs and eval_sigmas apply to the ODE solvers only; "
                         "drop them or choose an ODE solver")
    if max_order is None:
        max_order = info.default_order
    if sigmas is None:
        sigmas = get_schedule(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho, net=net)
    sigmas = torch.as_tensor(sigmas).to(device=latents.device, dtype=latents.dtype)
    x = latents * sigmas[0]
    if eval_sigmas is not None:
        options = dict(options, eval_sigmas=torch.as_tensor(eval_sigmas).to(device=latents.device,
                                                                            dtype=latents.dtype))
    opts = dict(options, max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                schedule_rho=schedule_rho)
    if opts.get('variant') is None:
        opts['variant'] = default_variant(solver)
    return info.fn(net, x, sigmas, cond, afs=afs, denoise_to_zero=denoise_to_zero,
                   return_trajectory=return_trajectory, **opts)


class CallCounter:
    """Counts denoiser evaluations: `rows` is the total batch rows evaluated, `calls` the number of (sequential)
    network calls. NFE per sample = rows / batch; sequential rounds = calls. Forward-mode (JVP) passes are counted
    in both and also apart, in `jvp_rows` / `jvp_calls` (one such pass costs about 1.5-3 plain calls)."""

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self.jvp_calls = 0
        self.jvp_rows = 0

    def nfe(self, batch):
        return self.rows / batch


@contextlib.contextmanager
def count_calls(net):
    """Within the block, every call of `net` is counted (works for any nn.Module denoiser)."""
    counter = CallCounter()

    def hook(module, args, kwargs):
        rows = (args[0] if args else kwargs['x']).shape[0]
        counter.calls += 1
        counter.rows += rows
        if stochastic.in_jvp_pass():
            counter.jvp_calls += 1
            counter.jvp_rows += rows

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


from solvers.bridge import k_sampler  # noqa: E402,F401  (the k-diffusion calling convention; needs SOLVERS)
