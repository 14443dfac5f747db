"""Time schedules: decreasing float64 tensors of N noise levels from sigma_max to sigma_min."""
import math

import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete', 'flowmatch')
VP_EPS = 1e-3   # the VP end time of the time_uniform schedule


def vp_fit(sigma_min, sigma_max, eps_s=VP_EPS):
    """beta_d, beta_min of the VP schedule sigma(tau) = sqrt(exp(beta_d tau^2/2 + beta_min tau) - 1) that maps
    tau = 1 to sigma_max and tau = eps_s to sigma_min."""
    lmax, lmin = math.log(sigma_max ** 2 + 1), math.log(sigma_min ** 2 + 1)
    beta_d = 2 * (lmin / eps_s - lmax) / (eps_s - 1)
    return beta_d, lmax - beta_d / 2


def vp_sigma(tau, beta_d, beta_min):
    return torch.sqrt(torch.expm1(0.5 * beta_d * tau ** 2 + beta_min * tau))


def vp_tau(sigma, beta_d, beta_min):
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)) - beta_min) / beta_d


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7.0, net=None,
                 device=None):
    """num_steps time points (num_steps - 1 steps), as in the seeds' get_schedule."""
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    rho = float(schedule_rho)
    if schedule_type == 'polynomial':
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + u * (b - a)) ** rho
    elif schedule_type == 'logsnr':
        sigmas = torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))
    elif schedule_type == 'time_uniform':
        beta_d, beta_min = vp_fit(sigma_min, sigma_max)
        tau = (1 + u * (VP_EPS ** (1 / rho) - 1)) ** rho
        sigmas = vp_sigma(tau, beta_d, beta_min)
    elif schedule_type == 'discrete':
        table = getattr(net, 'sigma_table', None)
        if table is None:
            raise ValueError("schedule_type='discrete' needs a discrete-time model (one with a sigma table); "
                             f"use one of {', '.join(s for s in SCHEDULES if s != 'discrete')} for this model")
        table = torch.as_tensor(table, dtype=torch.float64).cpu()
        # Continuous time tau = (n + 1) / M over the table's indices n; polynomial in tau with exponent rho.
        M = len(table)
        t_max, t_min = (discrete_index(table, sigma_max) + 1) / M, (discrete_index(table, sigma_min) + 1) / M
        tau = (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
        sigmas = discrete_sigma(table, tau * M - 1)
    elif schedule_type == 'flowmatch':
        # Uniform in unshifted flow time, then shifted by the model's shift: t' = s t / (1 + (s - 1) t), where
        # t = sigma / (1 + sigma) is the flow time of VE noise level sigma.
        shift = float(getattr(net, 'flow_shift', None) or 1.0)
        unshift = lambda t: t / (shift - (shift - 1) * t)
        t_hi, t_lo = unshift(sigma_max / (1 + sigma_max)), unshift(sigma_min / (1 + sigma_min))
        t = t_hi + u * (t_lo - t_hi)
        t = shift * t / (1 + (shift - 1) * t)
        sigmas = t / (1 - t)
    else:
        raise ValueError(f"unknown schedule_type {schedule_type!r}; allowed: {', '.join(SCHEDULES)}")
    sigmas[0], sigmas[-1] = sigma_max, sigma_min   # exact end points whatever the rounding
    return sigmas if device is None else sigmas.to(device)


def discrete_index(table, sigma):
    """Fractional index of sigma in an increasing sigma table (linear interpolation in log sigma)."""
    log_table = torch.log(table)
    s = torch.log(torch.as_tensor(sigma, dtype=torch.float64)).clamp(log_table[0], log_table[-1])
    hi = torch.searchsorted(log_table, s.reshape(-1)).clamp(1, len(table) - 1).reshape(s.shape)
    lo = hi - 1
    frac = (s - log_table[lo]) / (log_table[hi] - log_table[lo])
    return lo + frac


def discrete_sigma(table, index):
    """Sigma at a fractional table index (linear interpolation in log sigma)."""
    index = torch.as_tensor(index, dtype=torch.float64).clamp(0, len(table) - 1)
    lo = index.floor().long().clamp(max=len(table) - 2)
    frac = index - lo
    log_table = torch.log(table)
    return torch.exp(log_table[lo] * (1 - frac) + log_table[lo + 1] * frac)
