"""The k-diffusion calling convention: every registered solver and every learned predictor as a sampler function

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x

over a denoiser written the k-diffusion / ComfyUI way, `model(x, sigma, **extra_args) -> D(x; sigma)` with sigma a
tensor of shape [batch]. As in k-diffusion, `x` is the initial state already scaled by sigmas[0] and `sigmas` is
the decreasing grid (a final 0 is taken as a final Euler step, i.e. a denoise at the last positive sigma). No I/O:
`disable` (the progress-bar switch of those UIs) is accepted and ignored.
"""
import torch

import solvers
from solvers.common import repeat_cond

# The options a classical solver takes through the bridge (the grid comes from the caller).
OPTIONS = ('afs', 'max_order', 'predict_x0', 'lower_order_final', 'variant', 'r', 'noise')


class KDiffusionDenoiser(torch.nn.Module):
    """A k-diffusion-style model(x, sigma, **extra_args) seen through the denoiser protocol (models/base.py).

    Batches larger than the caller's (EPD's K parallel points are one call on B*K rows, sample-major) get the
    batch-shaped entries of extra_args (tensors whose first axis is the caller's batch) repeated to match.
    The k-diffusion convention exposes no network activation, so the bottleneck feature AMED reads is the pooled
    denoised estimate (what the analytic models, which have no network, give too).
    """

    def __init__(self, model, extra_args, batch, grid=None, callback=None):
        super().__init__()
        self.model, self.extra_args, self.batch = model, dict(extra_args or {}), batch
        self.grid = [] if grid is None else [float(s) for s in grid]
        self.callback = callback
        self.reported = -1                     # the last grid index passed to the callback

    def _args(self, rows):
        if rows == self.batch:
            return self.extra_args
        if rows % self.batch:
            raise ValueError(f"a batch of {rows} rows is not a multiple of the sampler's batch {self.batch}")
        times = rows // self.batch
        return {k: repeat_cond(v, times) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == self.batch
                else v for k, v in self.extra_args.items()}

    def forward(self, x, sigma, cond=None, return_bottleneck=False):
        from models.base import broadcast_sigma, pooled_feature
        sigma = broadcast_sigma(sigma, x)
        denoised = self.model(x, sigma, **self._args(x.shape[0]))
        if self.callback is not None and x.shape[0] == self.batch:
            self._report(x, sigma, denoised)
        if return_bottleneck:
            return denoised, pooled_feature(denoised)
        return denoised

    def _report(self, x, sigma, denoised):
        """k-diffusion's callback, once per step i (0 <= i < len(sigmas) - 1), at the first evaluation on grid
        point i: x is the state evaluated there (for heun and unipc, the predicted state) and denoised its D."""
        s = float(sigma[0])
        for i in range(self.reported + 1, len(self.grid) - 1):
            if self.grid[i] == s:
                self.reported = i
                self.callback({'x': x, 'i': i, 'sigma': sigma[0], 'sigma_hat': sigma[0], 'denoised': denoised})
                return


def _check_predictor(predictor, steps):
    need = predictor.settings['num_steps']
    if steps != need:
        raise ValueError(f"the {predictor.kind} predictor was trained for {need} time points ({need - 1} steps), "
                         f"but the grid has {steps} positive sigmas; give a grid of {need} sigmas (plus an optional "
                         "final 0), e.g. its own schedule")


def k_sampler(name_or_predictor, **options):
    """A sampler function in the k-diffusion convention for a registered solver name (with its options: afs,
    max_order, predict_x0, lower_order_final, variant, r) or a trained learned-solver predictor (EPD, AMED:
    training/predictors.py), whose stored settings apply; its tables are per step, so the grid must have its
    number of time points (plus an optional final 0) and should be the schedule it was trained on."""
    predictor = None
    if isinstance(name_or_predictor, str):
        name = name_or_predictor
        if name not in solvers.SOLVERS:
            raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(sorted(solvers.SOLVERS))} or a trained "
                             "predictor")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for k_sampler({name!r}); allowed: "
                             f"{', '.join(OPTIONS)}")
        solvers.check_options(name, 2, **{k: v for k, v in options.items() if k in ('max_order', 'variant')})
    elif callable(getattr(name_or_predictor, 'solve', None)) and hasattr(name_or_predictor, 'settings'):
        predictor = name_or_predictor
        if options:
            raise ValueError(f"a predictor samples with its stored settings; drop the option(s) "
                             f"{', '.join(sorted(options))}")
    else:
        raise ValueError(f"k_sampler takes a solver name or a trained predictor, not {type(name_or_predictor).__name__}")

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        grid, ends_at_zero = solvers.check_grid(torch.as_tensor(sigmas))
        grid = grid.to(device=x.device, dtype=x.dtype)
        # The callback counts steps over the whole grid, the final 0 included (k-diffusion's i < len(sigmas) - 1).
        full = torch.cat([grid, grid.new_zeros(1)]) if ends_at_zero else grid
        net = KDiffusionDenoiser(model, extra_args, x.shape[0], full, callback)
        if predictor is not None:
            _check_predictor(predictor, len(grid))
            out = predictor.solve(net, x, grid)
            # The predictor's own runs end at sigma_min; a final 0 adds the Euler step to 0 = a denoise.
            return net(out, grid[-1]) if ends_at_zero else out
        solvers.check_options(name, len(grid), **{k: v for k, v in options.items() if k in ('max_order',
                                                                                              'variant')})
        info = solvers.SOLVERS[name]
        if info.stochastic and options.get('noise') is None:
            raise ValueError(f"k_sampler({name!r}) is stochastic: give it noise=solvers.noise.ImageNoise(seeds), "
                             "one seed per image of the batch")
        opts = dict(max_order=info.default_order, predict_x0=True, lower_order_final=True, afs=False)
        opts.update(options)
        if opts['max_order'] is None:
            opts['max_order'] = info.default_order
        return info.fn(net, x, grid, None, denoise_to_zero=ends_at_zero, **opts)

    sample.__name__ = f"sample_{name_or_predictor if predictor is None else predictor.kind}"
    return sample
