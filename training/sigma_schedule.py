"""2nd-SED's sigma learning: a length-L noise-level schedule learned for a frozen denoiser by its weighted denoising
loss, then sampled with any ODE solver of solvers.SOLVERS (a predictor folder, `sample.py --predictor_path=N`).

    python -m training.sigma_schedule --dataset_name=gmm_image --dm_length=10 --solver=heun

Parametrisation (sigmoid): L - 1 logits, ratios lambda_k = sigmoid(logit_k) in (0, 1), sigma_0 = sigma_max and
sigma_k = sigma_max prod_{j<k} lambda_j (strictly decreasing; the last level is free, not pinned to sigma_min). The
logits start at the ratios of the EDM rho = 3 grid of L points. Loss per clean sample y (precond 'Dns'): a level
k in 0..L-2 drawn uniformly, w_k |D(y + sigma_k n; sigma_k) - y|^2 with w_k = 1 - lambda_k (precond 'Eps': 1 /
lambda_k - 1) and D taken without gradient (the term only moves the weight: it raises lambda_k where the
denoising error is large), plus the regulariser |D(y + s n; s) - y|^2 / s at the last level s = sigma_{L-1}, whose
gradient flows through s into the network's input and the 1 / s. Squared errors are means over the sample's
entries. Adam on the logits, an EMA of them is the result (as the reference; its softmax parametrisation does not
run there and is not offered here).

Clean samples: the analytic models' exact data samples (fresh ones every iteration); for other models, num_data
samples of a teacher ODE solve (UniPC, teacher_steps, polynomial rho 7) made once per run.
"""
import json
import os
import time

import torch

import solvers
from torch_utils.image_io import atomic_write
from torch_utils.misc import run_command_line
from training.predictors import LearnedPredictor

PRECONDS = ('Dns', 'Eps')
DEFAULTS = dict(dm_length=10, sigma_arch='sigmoid', sigma_precond='Dns', lr=0.1, batch=1000, duration=0.5, ema=0.01,
                solver='heun', num_data=1000, teacher_steps=20, seed=0)


def sigmas_from_logits(logits, sigma_max):
    """[L] decreasing sigmas: sigma_max, then sigma_max times the running product of sigmoid(logits)."""
    ratios = torch.sigmoid(logits)
    return torch.cat([logits.new_tensor([sigma_max]), sigma_max * torch.cumprod(ratios, 0)])


def initial_logits(length, sigma_min, sigma_max, rho=3.0):
    """Logits of the consecutive ratios of the EDM rho grid of `length` points."""
    grid = solvers.get_schedule(length, sigma_min, sigma_max, 'polynomial', rho)
    ratios = grid[1:] / grid[:-1]
    return torch.log(ratios / (1 - ratios))


def denoising_loss(net, logits, y, sigma_max, precond='Dns', cond=None, generator=None):
    """The weighted denoising loss of one batch of clean samples y (mean over the batch): (total, data term,
    regulariser). Differentiable in logits only through the weights and the last level."""
    if precond not in PRECONDS:
        raise ValueError(f"unknown sigma_precond {precond!r}; allowed: {', '.join(PRECONDS)}")
    B = y.shape[0]
    sigmas = sigmas_from_logits(logits, sigma_max)
    ratios = torch.sigmoid(logits)
    k = torch.randint(0, len(logits), (B,), generator=generator, device='cpu').to(y.device)
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device='cpu').to(y.device)
    level = sigmas[k].to(y.dtype)
    shape = (-1, *[1] * (y.dim() - 1))
    with torch.no_grad():
        err = (net(y + level.detach().reshape(shape) * n, level.detach(), cond) - y).pow(2).flatten(1).mean(1)
    weight = 1 - ratios[k] if precond == 'Dns' else 1 / ratios[k] - 1
    data = (weight.to(err.dtype) * err).mean()
    n_last = torch.randn(y.shape, generator=generator, dtype=y.dtype, device='cpu').to(y.device)
    last = sigmas[-1].to(y.dtype)
    reg = ((net(y + last * n_last, last.expand(B), cond) - y).pow(2).flatten(1).mean(1) / last).mean()
    return data + reg, data.detach(), reg.detach()


class SEDSigmaPredictor(LearnedPredictor):
    """A learned sigma schedule (2nd-SED's sigma learning) sampled with the ODE solver settings['solver']."""
    kind = 'sed_sigmas'

    def __init__(self, settings, generator=None):
        super().__init__(settings)
        self.logits = torch.nn.Parameter(initial_logits(settings['num_steps'], settings['sigma_min'],
                                                        settings['sigma_max']))

    def schedule(self, net=None):
        return sigmas_from_logits(self.logits.detach(), self.settings['sigma_max'])

    def nfe(self):
        return solvers.nfe_formula(self.settings['solver'], self.settings['num_steps'])

    evaluations = nfe

    def summary(self):
        s = self.settings
        sigmas = self.schedule()
        return dict(solver=s['solver'], predictor=self.kind, num_steps=s['num_steps'], schedule_type='sed_sigmas',
                    afs=False, sigma_min=float(sigmas[-1]), sigma_max=s['sigma_max'])

    def sampling_options(self):
        fixed = {k: v for k, v in self.summary().items() if k != 'predictor'}
        fixed.update({k: self.settings[k] for k in ('max_order', 'variant') if self.settings.get(k) is not None})
        return fixed

    def check_model(self, net):
        super().check_model(net)
        if self.settings['sigma_max'] > net.sigma_max * (1 + 1e-9):
            raise ValueError(f"the learned schedule starts at sigma {self.settings['sigma_max']:g}, above this "
                             f"model's sigma_max {net.sigma_max:g}; learn a schedule for this model")

    def sample(self, net, latents, cond=None, return_trajectory=False):
        s = self.settings
        opts = {k: s[k] for k in ('max_order', 'variant') if s.get(k) is not None}
        return solvers.sample(net, latents, s['solver'], sigmas=self.schedule().to(latents), cond=cond,
                              return_trajectory=return_trajectory, **opts)


class DataSource:
    """Clean samples (and their conditions) for the denoising loss."""

    def __init__(self, net, opts, dtype, device, prompts=None, log=print):
        from training.distill import draw_batch
        self.net, self.dtype, self.device = net, dtype, device
        self.exact = hasattr(net, 'sample_data') and not net.label_dim and prompts is None
        self.generator = torch.Generator().manual_seed(opts['seed'])
        if self.exact:
            return
        start = time.time()
        ys, conds = [], []
        with torch.no_grad():
            for lo in range(0, opts['num_data'], 100):
                ids = list(range(lo, min(lo + 100, opts['num_data'])))
                z, cond = draw_batch(net, opts['seed'], 0, ids, dtype, device, prompts)
                ys.append(solvers.sample(net, z, 'unipc', opts['teacher_steps'] + 1, 'polynomial', 7.0, cond=cond))
                conds.append(cond)
        self.y = torch.cat(ys)
        self.cond = None if conds[0] is None else (torch.cat(conds) if isinstance(conds[0], torch.Tensor) else None)
        if conds[0] is not None and self.cond is None:
            raise ValueError("sigma learning on a text-to-image model needs tensor conditions; not supported")
        log(f"Clean samples: {opts['num_data']} teacher solves (unipc, {opts['teacher_steps']} steps) in "
            f"{time.time() - start:.1f} s")

    def batch(self, size):
        if self.exact:
            return self.net.sample_data(size, generator=self.generator).to(self.device, self.dtype), None
        idx = torch.randint(0, len(self.y), (size,), generator=self.generator)
        return self.y[idx], None if self.cond is None else self.cond[idx]


def resolve(given):
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in given.items() if v is not None and k in DEFAULTS})
    if opts['sigma_arch'] != 'sigmoid':
        raise ValueError(f"--sigma_arch={opts['sigma_arch']}: only sigmoid is offered (the reference's softmax "
                         "path does not run); use --sigma_arch=sigmoid")
    if opts['sigma_precond'] not in PRECONDS:
        raise ValueError(f"unknown --sigma_precond={opts['sigma_precond']}; allowed: {', '.join(PRECONDS)}")
    if opts['solver'] not in solvers.ode_solvers():
        raise ValueError(f"--solver={opts['solver']} is not an ODE solver; use one of "
                         f"{', '.join(solvers.ode_solvers())}")
    if opts['dm_length'] < 2 or opts['batch'] < 1 or not opts['duration'] > 0 or not opts['lr'] > 0:
        raise ValueError(f"--dm_length={opts['dm_length']} must be >= 2, --batch >= 1, --duration and --lr > 0")
    return opts


def train(net, opts, data, sigma_min=None, sigma_max=None, log=print, iterations=None):
    """Learn the schedule; returns (predictor with the EMA logits, history). iterations: duration * 1e6 / batch
    unless given."""
    sigma_min, sigma_max = sigma_min or net.sigma_min, sigma_max or net.sigma_max
    settings = dict(num_steps=opts['dm_length'], sigma_min=sigma_min, sigma_max=sigma_max, solver=opts['solver'],
                    sample_shape=list(net.sample_shape))
    predictor = SEDSigmaPredictor(settings)
    logits = predictor.logits
    ema = logits.detach().clone()
    beta = 0.5 ** (opts['batch'] / max(opts['ema'] * 1e6, 1e-12))     # EDM's EMA half-life, in Mimg
    optimizer = torch.optim.Adam([logits], lr=opts['lr'], betas=(0.9, 0.999))
    total = iterations or max(1, round(opts['duration'] * 1e6 / opts['batch']))
    gen = torch.Generator().manual_seed(opts['seed'] + 1)
    history = []
    for it in range(total):
        y, cond = data.batch(opts['batch'])
        loss, term, reg = denoising_loss(net, logits, y, sigma_max, opts['sigma_precond'], cond, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logits.grad = torch.nan_to_num(logits.grad, nan=0.0, posinf=0.0, neginf=0.0)
        optimizer.step()
        with torch.no_grad():
            ema.mul_(beta).add_(logits.detach(), alpha=1 - beta)
        if it % max(1, total // 20) == 0 or it == total - 1:
            record = dict(iteration=it + 1, loss=float(loss), data=float(term), regu=float(reg),
                          sigmas=sigmas_from_logits(ema, sigma_max).tolist())
            history.append(record)
            log(f"iteration {it + 1}/{total} loss {record['loss']:.6g} regu {record['regu']:.6g} sigmas "
                + ', '.join(f'{v:.4g}' for v in record['sigmas']))
    with torch.no_grad():
        logits.copy_(ema)
    return predictor, history


def main(argv=None):
    import click
    import configs
    import training
    import train as train_cli
    from models.loading import load_model
    from training.ld3 import format_grid

    @click.command(context_settings=dict(show_default=True))
    @click.option('--dataset_name', metavar='NAME|YAML', default=configs.DEFAULT_DATASET, help='Dataset config')
    @click.option('--model_path', '--pretrain', 'model_path', metavar='PATH', default=None,
                  help='Override the config\'s model source (the reference\'s --pretrain)')
    @click.option('--dm_length', '--dm-length', 'dm_length', metavar='INT', type=int, default=DEFAULTS['dm_length'],
                  help='Length L of the schedule (time points)')
    @click.option('--sigma_arch', '--sigma-arch', 'sigma_arch', metavar='NAME', default=DEFAULTS['sigma_arch'],
                  help='Parametrisation (sigmoid)')
    @click.option('--sigma_precond', '--sigma-precond', 'sigma_precond', metavar='Dns|Eps',
                  default=DEFAULTS['sigma_precond'], help='Loss weights: 1 - lambda (Dns) or 1 / lambda - 1 (Eps)')
    @click.option('--lr', metavar='FLOAT', type=float, default=DEFAULTS['lr'], help='Adam learning rate')
    @click.option('--batch', metavar='INT', type=int, default=DEFAULTS['batch'], help='Clean samples per iteration')
    @click.option('--duration', metavar='MIMG', type=float, default=DEFAULTS['duration'],
                  help='Training length, millions of samples')
    @click.option('--ema', metavar='MIMG', type=float, default=DEFAULTS['ema'], help='EMA half-life of the logits')
    @click.option('--solver', metavar='NAME', default=DEFAULTS['solver'], help='ODE solver that samples with it')
    @click.option('--num_data', metavar='INT', type=int, default=DEFAULTS['num_data'],
                  help='Teacher samples (models without exact samples)')
    @click.option('--teacher_steps', metavar='INT', type=int, default=DEFAULTS['teacher_steps'],
                  help='Steps of the teacher solve that makes them')
    @click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance')
    @click.option('--guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
    @click.option('--seed', metavar='INT', type=int, default=DEFAULTS['seed'], help='Random seed')
    @click.option('--outdir', metavar='DIR', default=training.EXPS_DIR, help='Where the run folder is made')
    @click.option('--device', metavar='DEV', default='cpu', help='Device')
    def cli(dataset_name, model_path, guidance_type, guidance_rate, outdir, device, **given):
        opts = resolve(given)
        cfg = configs.load_config(dataset_name)
        device = torch.device(device)
        net = load_model(cfg, model_path, device, guidance_type, guidance_rate)
        dtype = torch.float64 if cfg.get('sample', {}).get('dtype') == 'float64' else torch.float32
        name = f"{cfg['dataset_name']}-{opts['dm_length']}-sed_sigmas-{opts['sigma_precond']}-{opts['solver']}"
        run_dir = train_cli.next_run_dir(outdir, name)
        log = train_cli.Logger(os.path.join(run_dir, 'log.txt'))
        atomic_write(os.path.join(run_dir, train_cli.OPTIONS_FILE), json.dumps(dict(
            opts, dataset_name=cfg['dataset_name'], model_path=model_path, guidance_type=guidance_type,
            guidance_rate=guidance_rate), indent=2).encode())
        start = time.time()
        data = DataSource(net, opts, dtype, device, log=log)
        predictor, history = train(net, opts, data, log=log)
        predictor.settings.update(dataset_name=cfg['dataset_name'], guidance_type=guidance_type,
                                  guidance_rate=guidance_rate, sampler_stu='sed_sigmas', dtype=str(dtype)[6:],
                                  **{f'sed_{k}': v for k, v in opts.items() if k not in ('solver',)})
        training.save_predictor(predictor, run_dir)
        atomic_write(os.path.join(run_dir, train_cli.STATS_FILE),
                     ''.join(json.dumps(r) + '\n' for r in history).encode())
        log(f'Done in {time.time() - start:.1f} s: grid {format_grid(predictor.schedule())}; predictor in {run_dir}')

    run_command_line(cli, argv, 'training.sigma_schedule')


if __name__ == '__main__':
    main()
