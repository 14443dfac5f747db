"""The exact solution of the probability-flow ODE for any denoiser, by a high-order adaptive integrator.

dx/dlog(sigma) = x - D(x; sigma), integrated with scipy's DOP853 (8th order) in float64 at tight tolerance.
This is the ground truth for tests, benchmarks and the exact teacher of distillation.
"""
import numpy as np
import torch


@torch.no_grad()
def solve_exact(net, x, sigma_from, sigma_to, cond=None, at_sigmas=None, rtol=1e-9, atol=1e-9):
    """Integrate from x at sigma_from down to sigma_to. Returns the endpoint in x's dtype, or, with at_sigmas
    (decreasing, within the range), a tensor [len(at_sigmas), *x.shape] of the states there."""
    shape, dtype, device = x.shape, x.dtype, x.device
    batch = shape[0]

    def rhs(log_sigma, y):
        state = torch.as_tensor(y, dtype=torch.float64, device=device).reshape(shape)
        sigma = torch.full((batch,), float(np.exp(log_sigma)), dtype=torch.float64, device=device)
        return (state - net(state, sigma, cond).to(torch.float64)).reshape(-1).cpu().numpy()

    t_span = (float(np.log(sigma_from)), float(np.log(sigma_to)))
    t_eval = None if at_sigmas is None else np.log(np.asarray([float(s) for s in at_sigmas], dtype=np.float64))
    if t_eval is not None:
        # solve_ivp requires t_eval inside the span; clip the end points' rounding.
        t_eval = np.clip(t_eval, min(t_span), max(t_span))
    from scipy.integrate import solve_ivp   # here: scipy.integrate takes ~1 s to import, and most CLI runs never call it
    result = solve_ivp(rhs, t_span, x.detach().to(torch.float64).reshape(-1).cpu().numpy(), method='DOP853',
                       rtol=rtol, atol=atol, t_eval=t_eval)
    if not result.success:
        raise RuntimeError(f'exact ODE integration failed: {result.message}')
    if at_sigmas is None:
        return torch.as_tensor(result.y[:, -1], device=device).reshape(shape).to(dtype)
    states = torch.as_tensor(result.y.T, device=device).reshape(len(t_eval), *shape)
    return states.to(dtype)


def exact(net, x, sigmas, cond=None, *, denoise_to_zero=False, return_trajectory=False, rtol=1e-9, atol=1e-9, **_):
    """The exact solver in the shared signature (a teacher for distillation and a reference for tests)."""
    if return_trajectory:
        states = solve_exact(net, x, sigmas[0], sigmas[-1], cond, at_sigmas=sigmas, rtol=rtol, atol=atol)
        x = states[-1]
    else:
        x = solve_exact(net, x, sigmas[0], sigmas[-1], cond, rtol=rtol, atol=atol)
    if denoise_to_zero:
        x = net(x, sigmas[-1], cond)
        if return_trajectory:
            states = torch.cat([states, x[None]])
    return (x, states) if return_trajectory else x
