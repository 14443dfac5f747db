"""Predictors that parametrise learned solvers, saved as safetensors + JSON (no code in the file).

EPDPredictor: per step and point, tables for position r (sigmoid), direction scale c, time scale a and simplex
weights w (softmax). AMEDPredictor: a small network from the bottleneck feature and the step's times to (r, c, a).
LD3Predictor: the N + 1 time points of a classical solver (and optionally a decoupled grid at which the network is
queried), learned by training/ld3.py. All carry `settings`: everything needed to sample with them (solver, schedule,
steps, points, afs, scales, dataset, sample shape, sigma range, guidance).
"""
import math

import torch
import torch.nn.functional as F

import solvers
from solvers.learned import amed, epd


def bounded_scale(raw, scale, temperature=1.0):
    """Map a raw parameter to (1 - scale, 1 + scale); exactly 1 when scale is 0."""
    if not scale:
        return torch.ones_like(raw)
    return 2 * scale * torch.sigmoid(temperature * raw) + 1 - scale


class LearnedPredictor(torch.nn.Module):
    kind = None

    def __init__(self, settings):
        super().__init__()
        self.settings = dict(settings)

    def learn_grid(self):
        """With settings['learn_schedule'], the time grid is a parameter too (LD3's: log-sigma gaps proportional to
        softmax(schedule_theta), ends pinned at sigma_max and sigma_min); start_grid() sets it to a given grid."""
        if self.settings.get('learn_schedule'):
            self.schedule_theta = torch.nn.Parameter(torch.ones(self.settings['num_steps'], dtype=torch.float64))

    def start_grid(self, sigmas):
        with torch.no_grad():
            self.schedule_theta.copy_(theta_for(sigmas))

    def schedule(self, net):
        """The time grid; a learned one keeps its gradient (train.py trains it; sampling runs under no_grad)."""
        s = self.settings
        if s.get('learn_schedule'):
            # theta[0] cancels out of the grid; detached, its gradient is exactly 0 rather than rounding noise that
            # Adam would scale up to steps (harmless to the grid, but it would make 2 workers differ from 1).
            theta = torch.cat([self.schedule_theta[:1].detach(), self.schedule_theta[1:]])
            return ld3_grid(theta, torch.zeros_like(theta), s['sigma_min'], s['sigma_max'], 0.0)[0]
        if s.get('t_steps'):   # an explicit grid (a converted reference predictor keeps the grid it was trained on)
            return torch.tensor(s['t_steps'], dtype=torch.float64)
        return solvers.get_schedule(s['num_steps'], s['sigma_min'], s['sigma_max'], s['schedule_type'],
                                    s['schedule_rho'], net=net)

    def nfe(self):
        """Sequential denoiser rounds per sample (the papers' NFE): 2 per step, 1 less with AFS."""
        return 2 * (self.settings['num_steps'] - 1) - int(bool(self.settings['afs']))

    def evaluations(self):
        """Denoiser evaluations per sample (each parallel point counts)."""
        return (self.settings['num_steps'] - 1) * (1 + self.points) - int(bool(self.settings['afs']))

    points = 1

    def summary(self):
        s = self.settings
        return dict(solver=s['sampler_stu'], predictor=self.kind, num_steps=s['num_steps'],
                    schedule_type='learned' if s.get('learn_schedule') else s['schedule_type'],
                    schedule_rho=s['schedule_rho'], afs=s['afs'],
                    sigma_min=s['sigma_min'], sigma_max=s['sigma_max'])

    def sampling_options(self):
        """The solver options this predictor fixes, as sample.py names them (max_order, predict_x0 and
        lower_order_final only where its solver uses them)."""
        s = self.settings
        fixed = {k: v for k, v in self.summary().items() if k != 'predictor'}
        if s['sampler_stu'] in ('ipndm', 'dpmpp'):
            fixed['max_order'] = s.get('max_order') or 3
        if s['sampler_stu'] == 'dpmpp':
            fixed.update(predict_x0=s.get('predict_x0', True), lower_order_final=s.get('lower_order_final', True))
        return fixed

    def check_model(self, net):
        shape = tuple(self.settings['sample_shape'])
        if tuple(net.sample_shape) != shape:
            raise ValueError(f"the predictor was trained for samples of shape {shape}, but the model makes "
                             f"{tuple(net.sample_shape)}; use a predictor trained for this model")

    def sample(self, net, latents, cond=None, return_trajectory=False):
        sigmas = self.schedule(net).to(device=latents.device, dtype=latents.dtype)
        return self.solve(net, latents * sigmas[0], sigmas, cond, return_trajectory=return_trajectory)


class EPDPredictor(LearnedPredictor):
    kind = 'epd'

    def __init__(self, settings, generator=None):
        super().__init__(settings)
        steps, K = settings['num_steps'] - 1, settings['num_points']
        self.points = K
        # Start from a second-order method: points spread symmetrically around the midpoint in log sigma
        # (r in about 0.38-0.62), equal weights, unit scales. With K = 1 this is exactly DPM-Solver-2. (The
        # reference draws every entry from N(0, 1), which starts far from any consistent method.)
        spread = torch.linspace(-0.5, 0.5, K, dtype=torch.float64) if K > 1 else torch.zeros(1, dtype=torch.float64)
        self.r_params = torch.nn.Parameter(spread.repeat(steps, 1))
        self.scale_dir_params = torch.nn.Parameter(torch.zeros(steps, K, dtype=torch.float64))
        self.scale_time_params = torch.nn.Parameter(torch.zeros(steps, K, dtype=torch.float64))
        self.weight_params = torch.nn.Parameter(torch.zeros(steps, K, dtype=torch.float64))
        self.learn_grid()

    def table(self, step, dtype=torch.float64):
        s = self.settings
        r = torch.sigmoid(self.r_params[step])
        c = bounded_scale(self.scale_dir_params[step], s['scale_dir'], 0.5)
        a = bounded_scale(self.scale_time_params[step], s['scale_time'], 0.5)
        w = torch.softmax(self.weight_params[step], dim=0)
        return tuple(v.to(dtype) for v in (r, c, a, w))

    def solve(self, net, x, sigmas, cond=None, return_trajectory=False):
        s = self.settings
        plugin = 'ipndm' if s['sampler_stu'] == 'ipndm' else None
        reference_afs = s['afs'] and s.get('afs_formula') == 'reference'

        def run(net, x, sigmas):
            return epd(ReferenceAFS(net) if reference_afs else net, x, sigmas, cond,
                       table=lambda n: self.table(n, x.dtype), afs=s['afs'] and not reference_afs,
                       fcn=s.get('fcn', False), plugin=plugin, max_order=s.get('max_order') or 3,
                       return_trajectory=return_trajectory)
        if s.get('ode_space', 've') == 've':
            return run(net, x, sigmas)
        # ode_space 'flow': the same update in rectified-flow coordinates (EPD-Solver++ on SD3/FLUX): flow time
        # t = sigma / (1 + sigma), state x / (1 + sigma), probes geometric in t. Mapped back to VE at the end.
        out = run(FlowTime(net), x / (1 + sigmas[0]), sigmas / (1 + sigmas))
        if not return_trajectory:
            return out * (1 + sigmas[-1])
        x_flow, states = out
        return x_flow * (1 + sigmas[-1]), states * (1 + sigmas).reshape(-1, *([1] * x.ndim))


class ReferenceAFS:
    """The reference repositories' analytical first step, for predictors trained with it (afs_formula
    'reference'): the run's first call runs no network and returns the denoised value implied by the slope
    x / sqrt(1 + sigma^2), with a zero bottleneck feature. (solvers.common.afs_slope, x sigma / (1 + sigma^2), is the
    exact slope for N(0, I) data; the two differ by 8e-5 relative at sigma = 80, about 0.4% of the CIFAR-10 output
    after the 5-NFE table's steps.)"""

    def __init__(self, net, feature_dim=None):
        self.net, self.feature_dim, self.first = net, feature_dim, True

    def __call__(self, x, sigma, cond=None, return_bottleneck=False):
        if not self.first:
            return self.net(x, sigma, cond, return_bottleneck=True) if return_bottleneck else self.net(x, sigma, cond)
        self.first = False
        denoised = x - sigma * x / torch.sqrt(1 + sigma ** 2)
        return (denoised, x.new_zeros(x.shape[0], self.feature_dim)) if return_bottleneck else denoised


class FlowTime:
    """A VE denoiser seen in rectified-flow coordinates: D at state x_f and flow time t is D(x_f (1 + s), s) with
    s = t / (1 - t) (x_f = (1 - t) x0 + t n is the VE state x0 + s n divided by 1 + s); the slope
    (x_f - D) / t is the flow's velocity."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, cond=None, return_bottleneck=False):
        sigma = t / (1 - t)
        scale = (1 + sigma).reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(sigma) and sigma.ndim else 1 + sigma
        if return_bottleneck:
            return self.net(x * scale, sigma, cond, return_bottleneck=True)
        return self.net(x * scale, sigma, cond)


def time_embedding(sigma, channels=8, kind='log_sigma'):
    """Sinusoidal embedding of log sigma (log: sigma spans 1e-3 to 1e2, raw sigma would saturate).
    kind='sigma': the reference AMED predictor's embedding of raw sigma, frequencies 10000^(-j / (channels/2 - 1))."""
    if kind == 'sigma':
        half = channels // 2
        freqs = (1e-4) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
        angles = sigma.to(torch.float64).reshape(-1, 1) * freqs.to(sigma.device)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    freqs = torch.exp(torch.arange(channels // 2, dtype=torch.float64) * (-math.log(100.0) / (channels // 2)))
    angles = torch.log(sigma.to(torch.float64)).reshape(-1, 1) * freqs.to(sigma.device) * 4
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class AMEDPredictor(LearnedPredictor):
    kind = 'amed'

    def __init__(self, settings, generator=None):
        super().__init__(settings)
        F_in = settings['feature_dim']
        hidden = settings.get('hidden_dim', 128)
        self.feature_net = torch.nn.Sequential(torch.nn.Linear(F_in, hidden), torch.nn.SiLU(),
                                               torch.nn.Linear(hidden, 4))
        self.time_net = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(4 + 16, 3)
        with torch.no_grad():
            for layer in (self.feature_net[0], self.feature_net[2], self.time_net, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(layer.in_features))
                layer.bias.zero_()
        self.learn_grid()
        self.double()

    def params(self, feature, t_cur, t_next):
        s = self.settings
        B = feature.shape[0]
        kind = s.get('time_embedding', 'log_sigma')
        emb = torch.cat([F.silu(self.time_net(time_embedding(t.reshape(1), kind=kind))) for t in (t_cur, t_next)],
                        dim=1)
        u = torch.cat([self.feature_net(feature.to(torch.float64).reshape(B, -1)), emb.expand(B, -1)], dim=1)
        out = self.head(u)
        r = torch.sigmoid(out[:, 0])
        c = bounded_scale(out[:, 1], s['scale_dir'])
        a = bounded_scale(out[:, 2], s['scale_time'])
        return tuple(v.to(feature.dtype) for v in (r, c, a))

    def solve(self, net, x, sigmas, cond=None, return_trajectory=False):
        s = self.settings
        base = s['sampler_stu']
        afs = s['afs']
        if afs and s.get('afs_formula') == 'reference':
            net, afs = ReferenceAFS(net, s['feature_dim']), False
        return amed(net, x, sigmas, cond, params=self.params, base=base, afs=afs, feature_dim=s['feature_dim'],
                    max_order=s.get('max_order') or 3, predict_x0=s.get('predict_x0', True),
                    lower_order_final=s.get('lower_order_final', True), return_trajectory=return_trajectory)


def theta_for(sigmas):
    """theta that gives exactly this grid (up to rounding): the grid's gaps in log sigma are proportional to
    exp(theta[1:]); theta[0] does not enter the grid (set to the mean)."""
    gaps = torch.log(sigmas[:-1].to(torch.float64) / sigmas[1:].to(torch.float64))
    theta = torch.log(gaps / gaps.sum())
    return torch.cat([theta.mean().reshape(1), theta])


def ld3_grid(theta, delta, sigma_min, sigma_max, win_rate):
    """LD3's grids from its parameters (length N + 1 each): the solver grid sigmas and the evaluation grid.

    u = normalised cumsum(softmax(theta)) runs from 0 to 1 and sets log sigma = log sigma_max + u (log sigma_min -
    log sigma_max): strictly decreasing, ends pinned, and theta = const gives the grid uniform in log sigma (the
    logsnr schedule). The evaluation grid moves each interior point in log sigma by delta, clipped to win_rate times
    the smallest log gap of the grid (a bound on the actual gaps, detached), so for win_rate <= 0.5 it keeps the
    grid's order; delta = 0 gives the grid itself."""
    c = torch.cumsum(torch.softmax(theta, 0), 0)
    u = (c - c[0]) / (c[-1] - c[0])
    hi, lo = math.log(sigma_max), math.log(sigma_min)
    logs = hi + u * (lo - hi)
    inner = logs[1:-1]
    gaps = torch.cat([logs[:1].new_tensor([hi]), inner, logs[:1].new_tensor([lo])]).diff().neg()
    bound = (win_rate * gaps.min()).detach()
    moved = inner + torch.clamp(delta[1:-1], -bound, bound)
    ends = theta.new_tensor([sigma_max]), theta.new_tensor([sigma_min])
    return torch.cat([ends[0], inner.exp(), ends[1]]), torch.cat([ends[0], moved.exp(), ends[1]])


class LD3Predictor(LearnedPredictor):
    """A learned time grid (LD3) for the classical solver settings['solver'] with settings['num_steps'] points."""
    kind = 'ld3'

    def __init__(self, settings, generator=None):
        super().__init__(settings)
        n = settings['num_steps']
        self.theta = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))
        self.delta = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def grids(self):
        s = self.settings
        sigmas, evals = ld3_grid(self.theta, self.delta, s['sigma_min'], s['sigma_max'], s['win_rate'])
        return sigmas, (evals if s.get('decoupled', True) else None)

    def schedule(self, net=None):
        return self.grids()[0].detach()

    def nfe(self):
        return solvers.nfe_formula(self.settings['solver'], self.settings['num_steps'])

    evaluations = nfe

    def summary(self):
        s = self.settings
        return dict(solver=s['solver'], predictor=self.kind, num_steps=s['num_steps'], schedule_type='ld3',
                    afs=False, sigma_min=s['sigma_min'], sigma_max=s['sigma_max'])

    def sampling_options(self):
        s = self.settings
        fixed = {k: v for k, v in self.summary().items() if k != 'predictor'}
        fixed.update({k: s[k] for k in ('max_order', 'variant', 'predict_x0', 'lower_order_final')
                      if s.get(k) is not None})
        return fixed

    def check_model(self, net):
        super().check_model(net)
        s = self.settings
        if s['sigma_max'] > net.sigma_max * (1 + 1e-9) or s['sigma_min'] < net.sigma_min * (1 - 1e-9):
            raise ValueError(f"the learned schedule spans sigma {s['sigma_max']:g} to {s['sigma_min']:g}, outside "
                             f"this model's range {net.sigma_max:g} to {net.sigma_min:g}; train a schedule for this "
                             "model")

    def run(self, net, latents, sigmas, eval_sigmas=None, cond=None, return_trajectory=False):
        """The solver from unit-Gaussian latents on the given grids (training passes grids with gradients)."""
        s = self.settings
        opts = {k: s[k] for k in ('max_order', 'variant', 'predict_x0', 'lower_order_final') if s.get(k) is not None}
        return solvers.sample(net, latents, s['solver'], sigmas=sigmas.to(latents), cond=cond,
                              eval_sigmas=None if eval_sigmas is None else eval_sigmas.to(latents),
                              return_trajectory=return_trajectory, **opts)

    def sample(self, net, latents, cond=None, return_trajectory=False):
        sigmas, evals = self.grids()
        return self.run(net, latents, sigmas, evals, cond, return_trajectory)


PREDICTORS = {'epd': EPDPredictor, 'amed': AMEDPredictor, 'ld3': LD3Predictor}
