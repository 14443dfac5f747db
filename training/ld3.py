"""LD3: learn the time grid of a classical solver by back-propagating through its whole solve.

A frozen denoiser, a classical solver (any ODE solver of solvers.SOLVERS) with num_steps time points, and a
teacher (a solver with many steps, or the exact ODE solution) that maps noises z to images y*. Trained are the
grid's parameters theta (and, in the v2 rounds, the decoupled evaluation grid's delta; training/predictors.py,
ld3_grid), so that the student's image from z' matches y*. Soft teacher forcing: z' is a per-sample variable kept
in the L2 ball of radius prior_bound around z (in unit-Gaussian units), moved by a gradient step per visit and
kept only where the moved noise lowers that sample's loss.

Schedule (as the LD3 reference): rounds v1 (theta only) then v2 (theta and delta); one round is a pass over the
training pairs (a validation after every iteration, the best parameters and moved noises kept) and then a pass of
the same noise relaxation over the validation pairs. Each round starts from the best state. After `patient`
iterations without a better validation loss the best state is restored: the first time the validation switches
from its first batch to the whole set, later the learning rates decay (by lr_time_decay, to floors); the run
stops early once delta's rate has sat at its floor lr2_patient times. shift_lr halves after a round in which no
validation noise moved.

Differences from the reference, on purpose: the validation pairs keep their own noises by default (relax_valid=
False): with the reference's relaxation of the validation noises the validation loss fell 4x on gmm_image while
the error on held-out noises did not move, so it could not pick the best grid; the starting grid is by default the
hand-made one of lowest validation loss (init_schedule='best'; 'logsnr' is the reference's start); the evaluation grid's window is win_rate times the grid's smallest gap
in log sigma (the reference takes it from the raw logits, which is 0 at the start); the best validation loss is
measured again on the whole set when the validation switches to it; the solvers make exactly their NFE.

Teacher pairs are made once per setting and kept as safetensors in data_dir (reused by later runs). Workers under
torchrun split every batch; the gradients, per-sample losses and moved noises are summed over workers, so every
worker takes the same decisions and 2 workers give the result of 1 (to float rounding). The run's state is saved
after every round; --resume continues from the last one and reaches the same result as an uninterrupted run.
"""
import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

import solvers
import training
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write
from training.distill import draw_batch
from training.predictors import LD3Predictor, ld3_grid, theta_for

LOSSES = ('RMSE', 'L2', 'L1', 'LPIPS')
STATE_FILE = 'ld3-state.pt'
# Reference names of the teacher grid (--skip_type) -> (schedule_type, schedule_rho); our names work as well.
SKIP_TYPES = {'edm': ('polynomial', 7.0), 'logSNR': ('logsnr', 1.0), 'time_uniform': ('time_uniform', 1.0),
              'time_quadratic': ('time_uniform', 2.0)}
DEFAULTS = dict(solver=None, num_train=100, num_valid=200, main_train_batch_size=10, main_valid_batch_size=200,
                training_rounds_v1=2, training_rounds_v2=5, loss_type='RMSE', prior_bound=None, win_rate=0.5,
                lr_time_1=0.05, lr_time_2=0.1, momentum_time_1=0.9, lr_time_decay=0.8, min_lr_time_1=5e-5,
                min_lr_time_2=1e-6, patient=5, lr2_patient=5, shift_lr=None, shift_lr_decay=0.5, decoupled=True,
                no_v1=False, relax_valid=False, init_schedule='best', teacher_steps=20, skip_type='edm', variant=None, lpips_path=None,
                data_dir=os.path.join('exps', 'ld3_data'))
TEACHER_DEFAULT = 'unipc'
# Hand-made grids LD3 can start from (--init_schedule): 'best' takes the one of lowest validation loss.
INIT_SCHEDULES = {'logsnr': ('logsnr', 1.0), 'polynomial': ('polynomial', 7.0), 'time_uniform': ('time_uniform', 1.0),
                  'time_quadratic': ('time_uniform', 2.0)}


class LD3Error(ValueError):
    pass


def resolve(given):
    """LD3's settings: DEFAULTS overridden by the given (non-None) values; checks them."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in given.items() if v is not None and k in DEFAULTS})
    if opts['solver'] is None:
        raise LD3Error(f"--sampler_stu=ld3 needs --solver, the classical solver whose grid is learned; one of "
                       f"{', '.join(solvers.ode_solvers())}")
    if opts['solver'] not in solvers.ode_solvers():
        raise LD3Error(f"--solver={opts['solver']} is not a deterministic ODE solver; LD3 learns the grid of one of "
                       f"{', '.join(solvers.ode_solvers())}")
    if opts['loss_type'] not in LOSSES:
        raise LD3Error(f"unknown --loss_type={opts['loss_type']}; allowed: {', '.join(LOSSES)}")
    if opts['skip_type'] not in SKIP_TYPES and opts['skip_type'] not in solvers.SCHEDULES:
        raise LD3Error(f"unknown --skip_type={opts['skip_type']}; allowed: {', '.join(SKIP_TYPES)} or a schedule "
                       f"({', '.join(s for s in solvers.SCHEDULES if s != 'discrete')})")
    for name in ('num_train', 'num_valid', 'main_train_batch_size', 'main_valid_batch_size', 'teacher_steps'):
        if not opts[name] >= 1:
            raise LD3Error(f"--{name}={opts[name]} must be >= 1")
    if opts['init_schedule'] not in INIT_SCHEDULES and opts['init_schedule'] != 'best':
        raise LD3Error(f"unknown --init_schedule={opts['init_schedule']}; allowed: best, {', '.join(INIT_SCHEDULES)}")
    if not 0 <= opts['win_rate'] <= 0.5:
        raise LD3Error(f"--win_rate={opts['win_rate']} must be in [0, 0.5] (larger windows can reorder the "
                       "evaluation grid)")
    if opts['prior_bound'] is not None and opts['prior_bound'] < 0:
        raise LD3Error(f"--prior_bound={opts['prior_bound']} must be >= 0 (0 turns the soft teacher forcing off)")
    return opts


# -- losses ---------------------------------------------------------------------------------------------------

def make_loss(loss_type, lpips_path=None, device='cpu'):
    """Per-sample loss of decoded images [B, C, H, W] in [-1, 1] against the teacher's: a function -> [B]."""
    if loss_type == 'RMSE':
        # The root of L2 per sample: a sample whose path ends in another mode than the teacher's (errors ~20x the
        # typical on a mixture) weighs 20x, not 400x, and does not decide the grid alone.
        return lambda a, b: (a - b).pow(2).flatten(1).mean(1).sqrt()
    if loss_type == 'L2':
        return lambda a, b: (a - b).pow(2).flatten(1).mean(1)
    if loss_type == 'L1':
        return lambda a, b: (a - b).abs().flatten(1).mean(1)
    if not lpips_path or not os.path.isfile(lpips_path):
        raise LD3Error("--loss_type=LPIPS needs the LPIPS network's weights as a local file (--lpips_path=FILE, a "
                       "safetensors state dict of lpips.LPIPS(net='vgg')), and none is available offline; give "
                       "one, or use --loss_type=L2 or L1")
    try:
        import lpips
    except ImportError:
        raise LD3Error("--loss_type=LPIPS needs the lpips package (pip install lpips); or use --loss_type=L2 or L1")
    net = lpips.LPIPS(net='vgg', pretrained=False, pnet_rand=True, verbose=False)
    try:
        net.load_state_dict(load_file(lpips_path))
    except Exception as e:  # noqa: BLE001 - a foreign or truncated file
        raise LD3Error(f"--lpips_path={lpips_path} is not an LPIPS(vgg) safetensors state dict ({type(e).__name__})")
    net = net.to(device).eval().requires_grad_(False)
    return lambda a, b: net(a.float(), b.float()).reshape(-1).to(a.dtype)


# -- teacher data -----------------------------------------------------------------------------------------------

def teacher_grid(opts):
    return SKIP_TYPES.get(opts['skip_type'], (opts['skip_type'], 7.0))


def data_settings(cfg, model_path, guidance_type, guidance_rate, net, sampler_tea, opts, seed, dtype):
    schedule, rho = teacher_grid(opts)
    return dict(dataset_name=cfg['dataset_name'], model=str(model_path or cfg['model']),
                guidance_type=guidance_type, guidance_rate=guidance_rate, sample_shape=list(net.sample_shape),
                sigma_min=net.sigma_min, sigma_max=net.sigma_max, teacher=sampler_tea,
                teacher_steps=opts['teacher_steps'], schedule_type=schedule, schedule_rho=rho, seed=seed, dtype=dtype)


def data_path(data_dir, meta):
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return os.path.join(data_dir, f"{meta['dataset_name']}-{meta['teacher']}-{meta['teacher_steps']}-"
                                  f"{meta['schedule_type']}-seed{meta['seed']}-{digest}.safetensors")


@torch.no_grad()
def teacher_outputs(net, latents, cond, meta):
    """Decoded teacher images from unit latents."""
    if meta['teacher'] == 'exact':
        x = solvers.solve_exact(net, latents * net.sigma_max, net.sigma_max, net.sigma_min, cond)
    else:
        x = solvers.sample(net, latents, meta['teacher'], meta['teacher_steps'] + 1, meta['schedule_type'],
                           meta['schedule_rho'], cond=cond)
    return net.decode(x)


def teacher_data(net, meta, count, data_dir, dtype, device, prompts=None, log=print):
    """(latents, teacher images) of samples 0..count-1 of this setting: read from data_dir if a file of at least
    that many is there, else made (split over the workers) and saved. Sample j's noise is drawn from its own
    generator, so a larger file's first samples are those of a smaller one."""
    path = data_path(data_dir, meta)
    if os.path.isfile(path):
        data = load_file(path)
        if data['latents'].shape[0] >= count:
            log(f'Teacher data: {path} ({data["latents"].shape[0]} pairs, reused)')
            return data['latents'][:count].to(device, dtype), data['images'][:count].to(device, dtype)
    start = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = [count * r // world for r in range(world + 1)]
    mine = list(range(bounds[rank], bounds[rank + 1]))
    latents = torch.zeros(count, *net.sample_shape, dtype=dtype, device=device)
    images = None
    for lo in range(0, len(mine), 64):
        idx = mine[lo:lo + 64]
        z, cond = draw_batch(net, meta['seed'], 0, idx, dtype, device, prompts)
        y = teacher_outputs(net, z, cond, meta)
        if images is None:
            images = torch.zeros(count, *y.shape[1:], dtype=dtype, device=device)
        latents[idx], images[idx] = z, y.to(dtype)
    if images is None:        # this worker had no samples: learn the image shape from one call
        z, cond = draw_batch(net, meta['seed'], 0, [0], dtype, device, prompts)
        images = torch.zeros(count, *net.decode(z).shape[1:], dtype=dtype, device=device)
    latents, images = dist.all_reduce_sum(latents), dist.all_reduce_sum(images)
    if rank == 0:
        os.makedirs(data_dir, exist_ok=True)
        tmp = os.path.join(data_dir, '.' + os.path.basename(path) + '.tmp')
        save_file({'latents': latents.cpu().contiguous(), 'images': images.cpu().contiguous()}, tmp,
                  metadata={'settings': json.dumps(meta, default=str)})
        os.replace(tmp, path)
    dist.barrier()
    log(f'Teacher data: {count} pairs made in {time.time() - start:.1f} s, saved as {path}')
    return latents, images


# -- training ---------------------------------------------------------------------------------------------------

def project(z, z0, radius):
    """z moved radially onto the L2 ball of `radius` around z0 (per sample) where it lies outside."""
    d = z - z0
    norm = d.flatten(1).norm(dim=1).reshape(-1, *[1] * (z.dim() - 1))
    scale = torch.where(norm > radius, radius / norm.clamp_min(1e-300), torch.ones_like(norm))
    return z0 + d * scale


def my_part(indices):
    """This worker's contiguous share of a batch's global indices."""
    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = [len(indices) * r // world for r in range(world + 1)]
    return indices[bounds[rank]:bounds[rank + 1]]


class Trainer:
    def __init__(self, predictor, net, data, opts, loss_fn, cond_for, log):
        self.p, self.net, self.opts, self.loss_fn, self.cond_for, self.log = predictor, net, opts, loss_fn, \
            cond_for, log
        (self.z0_train, self.y_train), (self.z0_valid, self.y_valid) = data
        self.z_train, self.z_valid = self.z0_train.clone(), self.z0_valid.clone()
        n = predictor.settings['num_steps'] - 1
        sample_size = self.z0_train[0].numel()
        self.radius = opts['prior_bound'] if opts['prior_bound'] is not None else 0.001 * sample_size / n ** 2
        self.shift_lr = opts['shift_lr'] if opts['shift_lr'] is not None else 12 / n
        # Adam, not the reference's RMSprop: RMSprop's first steps are ~10 lr per parameter (its square average starts
        # at 0.01 g^2), which threw the grid far from its start and into patience decays before any improvement.
        self.opt1 = torch.optim.Adam([predictor.theta], lr=opts['lr_time_1'], betas=(opts['momentum_time_1'], 0.999))
        self.opt2 = torch.optim.SGD([predictor.delta], lr=opts['lr_time_2'] / n)
        self.round, self.count_worse, self.patience_hits, self.lr2_floor_hits = 0, 0, 0, 0
        self.full_valid, self.stopped, self.iterations = False, False, 0
        self.best = None
        self.history = []

    # state ---------------------------------------------------------------------------------------------------
    def snapshot(self):
        return dict(theta=self.p.theta.detach().clone(), delta=self.p.delta.detach().clone(),
                    z_train=self.z_train.clone(), z_valid=self.z_valid.clone())

    def restore(self, snap):
        with torch.no_grad():
            self.p.theta.copy_(snap['theta'])
            self.p.delta.copy_(snap['delta'])
        self.z_train, self.z_valid = snap['z_train'].clone(), snap['z_valid'].clone()

    def state(self):
        return dict(current=self.snapshot(), best=self.best, best_loss=self.best_loss, opt1=self.opt1.state_dict(),
                    opt2=self.opt2.state_dict(), round=self.round, count_worse=self.count_worse,
                    patience_hits=self.patience_hits, lr2_floor_hits=self.lr2_floor_hits,
                    full_valid=self.full_valid, stopped=self.stopped, iterations=self.iterations,
                    shift_lr=self.shift_lr, history=json.dumps(self.history))

    def load_state(self, state):
        self.restore(state['current'])
        self.best, self.best_loss = state['best'], float(state['best_loss'])
        self.opt1.load_state_dict(state['opt1'])
        self.opt2.load_state_dict(state['opt2'])
        for key in ('round', 'count_worse', 'patience_hits', 'lr2_floor_hits', 'iterations'):
            setattr(self, key, int(state[key]))
        self.full_valid, self.stopped = bool(state['full_valid']), bool(state['stopped'])
        self.shift_lr = float(state['shift_lr'])
        self.history = json.loads(state['history'])

    # pieces --------------------------------------------------------------------------------------------------
    def grids(self, v2):
        sigmas, evals = ld3_grid(self.p.theta, self.p.delta, self.p.settings['sigma_min'],
                                 self.p.settings['sigma_max'], self.p.settings['win_rate'])
        return sigmas, (evals if v2 and self.p.settings['decoupled'] else None)

    def losses(self, z, y, idx, sigmas, evals):
        """Per-sample losses [len(idx)] of the student from noises z against the teacher images y."""
        x = self.p.run(self.net, z, sigmas, evals, self.cond_for(idx))
        return self.loss_fn(self.net.decode(x), y)

    def valid_loss(self, v2, full=None):
        """Mean validation loss with the current grids (first batch only until the first patience trigger)."""
        full = self.full_valid if full is None else full
        count = len(self.z_valid) if full else min(len(self.z_valid), self.opts['main_valid_batch_size'])
        sigmas, evals = self.grids(v2)
        total = torch.zeros((), dtype=torch.float64, device=self.z_valid.device)
        with torch.no_grad():
            for lo in range(0, count, self.opts['main_valid_batch_size']):
                idx = my_part(list(range(lo, min(lo + self.opts['main_valid_batch_size'], count))))
                if idx:
                    ell = self.losses(self.z_valid[idx], self.y_valid[idx], self.valid_ids(idx), sigmas, evals)
                    total = total + ell.sum().to(torch.float64)
        return float(dist.all_reduce_sum(total)) / count

    def train_ids(self, idx):
        return list(idx)

    def valid_ids(self, idx):
        return [len(self.z_train) + i for i in idx]

    def relax(self, zs, z0s, ys, batch, ids, v2, theta_step=None):
        """One visit of these samples: the loss, its gradient, the moved noise kept where it lowers the loss. With
        theta_step (training) the grids' parameters are also updated, between the gradient and the check (as the
        reference). Returns (the batch's mean loss, whether any noise moved). Updates zs in place."""
        global_n = len(batch)
        idx = my_part(batch)
        sigmas, evals = self.grids(v2)
        z = zs[idx].clone().requires_grad_(bool(idx))
        if idx:
            ell = self.losses(z, ys[idx], ids(idx), sigmas, evals)
            (ell.sum() / global_n).backward()
            ell = ell.detach()
        else:
            ell = torch.zeros(0, dtype=zs.dtype, device=zs.device)
        for param in (self.p.theta, self.p.delta):
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = torch.nan_to_num(dist.all_reduce_sum(param.grad), nan=0.0)
        if theta_step is not None:
            theta_step()
        self.p.theta.grad = self.p.delta.grad = None
        moved = torch.zeros(global_n, dtype=torch.float64, device=zs.device)
        new_z = torch.zeros(global_n, *zs.shape[1:], dtype=zs.dtype, device=zs.device)
        losses = torch.zeros(global_n, dtype=torch.float64, device=zs.device)
        if idx:
            local = [batch.index(i) for i in idx]
            candidate = z.detach()
            if self.radius > 0 and z.grad is not None:
                candidate = project(candidate - self.shift_lr * z.grad, z0s[idx], self.radius)
                with torch.no_grad():
                    sigmas, evals = self.grids(v2)
                    ell_new = self.losses(candidate, ys[idx], ids(idx), sigmas, evals)
                better = ell_new < ell
                candidate = torch.where(better.reshape(-1, *[1] * (z.dim() - 1)), candidate, z.detach())
                moved[local] = better.to(torch.float64)
            new_z[local] = candidate
            losses[local] = ell.to(torch.float64)
        new_z, moved, losses = dist.all_reduce_sum(new_z), dist.all_reduce_sum(moved), dist.all_reduce_sum(losses)
        zs[batch] = new_z
        return float(losses.mean()), bool(moved.sum() > 0)

    def examine(self, v2):
        """After a training step: keep an improvement, else count towards the patience (restore and decay)."""
        loss = self.valid_loss(v2)
        if loss < self.best_loss:
            self.best_loss, self.best, self.count_worse = loss, self.snapshot(), 0
            return loss
        self.count_worse += 1
        if self.count_worse < self.opts['patient']:
            return loss
        self.count_worse = 0
        self.restore(self.best)
        self.patience_hits += 1
        if self.patience_hits == 1 and not self.full_valid:
            self.full_valid = True
            self.best_loss = self.valid_loss(v2)           # the best again, measured on the whole set
            return loss
        o = self.opts
        for group in self.opt1.param_groups:
            group['lr'] = max(group['lr'] * o['lr_time_decay'], o['min_lr_time_1'])
        if v2:
            for group in self.opt2.param_groups:
                floor = o['min_lr_time_2']
                if group['lr'] <= floor:
                    self.lr2_floor_hits += 1
                group['lr'] = max(group['lr'] * o['lr_time_decay'], floor)
            if self.lr2_floor_hits >= o['lr2_patient']:
                self.stopped = True
        return loss

    def train_round(self):
        o = self.opts
        r = self.round
        v2 = o['no_v1'] or r >= o['training_rounds_v1']
        if r > 0 and self.best is not None:
            self.restore(self.best)
        train_theta = not o['no_v1']
        train_delta = v2 and self.p.settings['decoupled']

        def step():
            torch.nn.utils.clip_grad_norm_([self.p.theta], 1.0)
            torch.nn.utils.clip_grad_norm_([self.p.delta], 1.0)
            if train_theta:
                self.opt1.step()
            if train_delta:
                self.opt2.step()
            self.opt1.zero_grad(set_to_none=True)
            self.opt2.zero_grad(set_to_none=True)

        order = torch.randperm(len(self.z_train), generator=torch.Generator().manual_seed(
            o['seed'] * 7919 + r)).tolist()
        bs = o['main_train_batch_size']
        train_losses, self.train_moved = [], []
        for lo in range(0, len(order), bs):
            if self.stopped:
                break
            batch = order[lo:lo + bs]
            loss, moved = self.relax(self.z_train, self.z0_train, self.y_train, batch, self.train_ids, v2, step)
            train_losses.append(loss)
            self.train_moved.append(moved)
            self.iterations += 1
            self.examine(v2)
        any_moved = any(self.train_moved) if not o['relax_valid'] else False
        for lo in range(0, len(self.z_valid) if o['relax_valid'] else 0, o['main_valid_batch_size']):
            batch = list(range(lo, min(lo + o['main_valid_batch_size'], len(self.z_valid))))
            _, moved = self.relax(self.z_valid, self.z0_valid, self.y_valid, batch, self.valid_ids, v2)
            any_moved = any_moved or moved
        if self.radius > 0 and not any_moved:
            self.shift_lr *= o['shift_lr_decay']
        # The validation noises moved: the best state's loss is measured again with them (a fair comparison).
        current = self.snapshot()
        if self.best is not None and o['relax_valid']:
            self.best['z_valid'] = self.z_valid.clone()
            self.restore(self.best)
            self.best_loss = self.valid_loss(v2)
            self.restore(current)
        self.round += 1
        record = dict(round=self.round, v2=v2, iterations=self.iterations,
                      train_loss=sum(train_losses) / max(len(train_losses), 1), best_valid=self.best_loss,
                      lr_time_1=self.opt1.param_groups[0]['lr'], lr_time_2=self.opt2.param_groups[0]['lr'],
                      shift_lr=self.shift_lr, stopped=self.stopped)
        self.history.append(record)
        return record


def train(net, settings, opts, data, seed=0, run_dir=None, cond_for=None, log=print, resume=False,
          stop_after_round=None):
    """Train an LD3 predictor. settings: the predictor's (solver, num_steps, sigma range, win_rate, decoupled,
    ...); opts: resolve()'s; data: ((z_train, y_train), (z_valid, y_valid)). Returns the predictor with the best
    parameters. With run_dir the state is saved after every round (and loaded with resume=True);
    stop_after_round stops there (as a killed run would), for tests."""
    opts = dict(opts, seed=seed)
    predictor = LD3Predictor(settings).to(data[0][0].device)
    loss_fn = make_loss(opts['loss_type'], opts['lpips_path'], data[0][0].device)
    trainer = Trainer(predictor, net, data, opts, loss_fn, cond_for or (lambda idx: None), log)
    state_path = os.path.join(run_dir, STATE_FILE) if run_dir else None
    if resume and state_path and os.path.isfile(state_path):
        trainer.load_state(torch.load(state_path, map_location=data[0][0].device, weights_only=True))
        log(f'Resuming after round {trainer.round} (iteration {trainer.iterations})')
    else:
        choices = list(INIT_SCHEDULES) if opts['init_schedule'] == 'best' else [opts['init_schedule']]
        losses = {}
        for name in choices:
            schedule, rho = INIT_SCHEDULES[name]
            grid = solvers.get_schedule(settings['num_steps'], settings['sigma_min'], settings['sigma_max'],
                                        schedule, rho, net=net)
            with torch.no_grad():
                predictor.theta.copy_(theta_for(grid) if name != 'logsnr' else torch.ones_like(predictor.theta))
            losses[name] = (trainer.valid_loss(False, full=True), predictor.theta.detach().clone())
        start = min(losses, key=lambda k: losses[k][0])
        with torch.no_grad():
            predictor.theta.copy_(losses[start][1])
        trainer.best_loss = trainer.valid_loss(False)
        trainer.best = trainer.snapshot()
        log('Initial validation losses: ' + ', '.join(f'{k} {v[0]:.6g}' for k, v in losses.items())
            + f'; starting from {start}')
    total_rounds = opts['training_rounds_v1'] + opts['training_rounds_v2']
    while trainer.round < total_rounds and not trainer.stopped:
        rec = trainer.train_round()
        log(f"round {rec['round']}/{total_rounds} ({'v2' if rec['v2'] else 'v1'}) iterations {rec['iterations']} "
            f"train {rec['train_loss']:.6g} best valid {rec['best_valid']:.6g} lr1 {rec['lr_time_1']:.3g} "
            f"lr2 {rec['lr_time_2']:.3g} shift_lr {rec['shift_lr']:.3g}")
        if state_path and dist.get_rank() == 0:
            state = trainer.state()
            atomic_write(state_path, lambda f: torch.save(state, f))
            training.save_predictor(with_best(predictor, trainer), run_dir,
                                    progress=(trainer.round, total_rounds))
        dist.barrier()
        if stop_after_round is not None and trainer.round >= stop_after_round:
            return with_best(predictor, trainer), trainer
    return with_best(predictor, trainer), trainer


def with_best(predictor, trainer):
    best = LD3Predictor(predictor.settings)
    with torch.no_grad():
        best.theta.copy_(trainer.best['theta'])
        best.delta.copy_(trainer.best['delta'])
    return best


def format_grid(sigmas):
    """'[80,10.98,...,0.002]' with every value written to round-trip exactly."""
    def fmt(v):
        text = repr(float(v.detach() if hasattr(v, "detach") else v))
        return text[:-2] if text.endswith('.0') else text
    return '[' + ','.join(fmt(v) for v in sigmas) + ']'


# -- command line (train.py --sampler_stu=ld3) ------------------------------------------------------------------

def cli_options(fn):
    """LD3's options on train.py (the reference's names; our defaults where they differ, see DEFAULTS)."""
    import click
    specs = [
        ('--solver', str, 'LD3: the classical ODE solver whose grid is learned'),
        ('--num_train', int, 'LD3: training pairs [default: 100]'),
        ('--num_valid', int, 'LD3: validation pairs [default: 200]'),
        ('--main_train_batch_size', int, 'LD3: training batch [default: 10]'),
        ('--main_valid_batch_size', int, 'LD3: validation batch [default: 200]'),
        ('--training_rounds_v1', int, 'LD3: rounds training the grid only [default: 2]'),
        ('--training_rounds_v2', int, 'LD3: rounds training the grid and the decoupled grid [default: 5]'),
        ('--loss_type', str, 'LD3: RMSE, L2, L1 or LPIPS (needs --lpips_path) [default: RMSE]'),
        ('--lpips_path', str, 'LD3: local safetensors weights of LPIPS(vgg)'),
        ('--prior_bound', float, 'LD3: radius of the noise ball (0: off) [default: 0.001 C H W / N^2]'),
        ('--win_rate', float, 'LD3: decoupled grid window, times the smallest log gap [default: 0.5]'),
        ('--decoupled', bool, 'LD3: learn the decoupled evaluation grid [default: True]'),
        ('--no_v1', bool, 'LD3: train the decoupled grid only [default: False]'),
        ('--relax_valid', bool, 'LD3: also move the validation noises, as the reference [default: False]'),
        ('--init_schedule', str, 'LD3: starting grid: best, logsnr, polynomial, time_uniform, time_quadratic '
                                 '[default: best]'),
        ('--lr_time_1', float, 'LD3: Adam rate of the grid [default: 0.05]'),
        ('--lr_time_2', float, 'LD3: SGD rate of the decoupled grid, divided by N [default: 0.1]'),
        ('--lr_time_decay', float, 'LD3: rate decay on patience [default: 0.8]'),
        ('--shift_lr', float, 'LD3: step of the noise relaxation [default: 12 / N]'),
        ('--patient', int, 'LD3: validations without improvement before restore/decay [default: 5]'),
        ('--teacher_steps', int, 'LD3: teacher steps (with --sampler_tea; reference: --steps) [default: 20]'),
        ('--skip_type', str, 'LD3: teacher grid: edm, logSNR, time_uniform, time_quadratic or a schedule '
                             '[default: edm]'),
        ('--variant', str, 'LD3: the solver\'s variant (unipc bh2|bh1, dpmpp phi3|2phi3)'),
        ('--data_dir', str, 'LD3: where teacher pairs are kept [default: exps/ld3_data]'),
    ]
    for flag, kind, text in reversed(specs):
        names = [flag] + (['--steps'] if flag == '--teacher_steps' else [])
        fn = click.option(*names, flag[2:], metavar=kind.__name__.upper(), type=kind, default=None, help=text)(fn)
    return fn


def run_cli(common, given, log_prefix='train.py'):
    """train.py --sampler_stu=ld3: teacher pairs (cached), training, the predictor folder in outdir."""
    import configs
    from models.loading import load_model
    import train as train_cli
    dist.init()
    device = torch.device(common['device']) if common['device'] else dist.get_device()
    resume = common['resume']
    if resume is not None:
        folder = train_cli.resume_folder(resume, common['outdir'])
        with open(os.path.join(folder, train_cli.OPTIONS_FILE)) as f:
            recorded = json.load(f)
        common = dict(common, **recorded['common'], resume=folder, device=common['device'])
        given = recorded['ld3']
    opts = resolve(given)
    cfg = configs.load_config(common['dataset_name'])
    num_steps = common['num_steps'] or 6
    sampler_tea = common['sampler_tea'] or TEACHER_DEFAULT
    if sampler_tea != 'exact':
        solvers.check_options(sampler_tea, opts['teacher_steps'] + 1)
    dtype_name = common['dtype'] or cfg['sample'].get('dtype', 'float32')
    dtype = torch.float64 if dtype_name == 'float64' else torch.float32
    solvers.check_options(opts['solver'], num_steps, max_order=common['max_order'], variant=opts['variant'],
                          sigma_min=common['sigma_min'], sigma_max=common['sigma_max'])
    net = load_model(cfg, common['model_path'], device, common['guidance_type'], common['guidance_rate'])
    sigma_min = common['sigma_min'] or net.sigma_min
    sigma_max = common['sigma_max'] or net.sigma_max
    if sigma_max > net.sigma_max * (1 + 1e-9) or sigma_min < net.sigma_min * (1 - 1e-9):
        raise LD3Error(f"--sigma_min/--sigma_max ({sigma_min:g}, {sigma_max:g}) lie outside the model's range "
                       f"({net.sigma_min:g}, {net.sigma_max:g})")
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt_file=common['prompt_path'], dataset_name=cfg['dataset_name'])
    make_loss(opts['loss_type'], opts['lpips_path'], device)        # refuse a loss we cannot build, before work
    settings = dict(dataset_name=cfg['dataset_name'], sampler_stu='ld3', solver=opts['solver'], num_steps=num_steps,
                    sigma_min=sigma_min, sigma_max=sigma_max, win_rate=opts['win_rate'],
                    decoupled=opts['decoupled'], max_order=common['max_order'], variant=opts['variant'],
                    predict_x0=common['predict_x0'], lower_order_final=common['lower_order_final'],
                    guidance_type=common['guidance_type'], guidance_rate=common['guidance_rate'],
                    sample_shape=list(net.sample_shape), dtype=dtype_name, sampler_tea=sampler_tea,
                    training=None)
    settings.pop('training')
    settings.update({f'ld3_{k}': v for k, v in opts.items() if k not in settings and k != 'data_dir'})
    nfe = solvers.nfe_formula(opts['solver'], num_steps)
    name = f"{cfg['dataset_name']}-{num_steps}-{nfe}-ld3-{opts['solver']}-{sampler_tea}-{opts['teacher_steps']}" \
        + ('' if opts['decoupled'] else '-nodec') + (f"-{common['desc']}" if common['desc'] else '')
    if common['dry_run']:
        dist.print0(json.dumps(dict(settings=settings, run_dir=os.path.join(common['outdir'], 'NNNNN-' + name)),
                               indent=2))
        return None
    if resume is None:
        run_dir = dist.broadcast_object(train_cli.next_run_dir(common['outdir'], name) if dist.get_rank() == 0
                                        else None)
        record = dict(settings=settings, common={k: common[k] for k in (
            'dataset_name', 'model_path', 'sampler_tea', 'num_steps', 'max_order', 'predict_x0', 'lower_order_final',
            'sigma_min', 'sigma_max', 'guidance_type', 'guidance_rate', 'prompt_path', 'dtype', 'seed', 'outdir',
            'desc')}, ld3={k: v for k, v in given.items() if v is not None}, world_size=dist.get_world_size())
        if dist.get_rank() == 0:
            atomic_write(os.path.join(run_dir, train_cli.OPTIONS_FILE), json.dumps(record, indent=2).encode())
    else:
        run_dir = resume
    dist.barrier()
    log = train_cli.Logger(os.path.join(run_dir, 'log.txt'))
    start = time.time()
    schedule, rho = teacher_grid(opts)
    meta = data_settings(cfg, common['model_path'], common['guidance_type'], common['guidance_rate'], net,
                         sampler_tea, opts, common['seed'], dtype_name)
    z, y = teacher_data(net, meta, opts['num_train'] + opts['num_valid'], opts['data_dir'], dtype, device, prompts,
                        log)
    n = opts['num_train']
    cond_for = None
    if net.label_dim or prompts is not None:
        cond_for = lambda ids: draw_batch(net, common['seed'], 0, ids, dtype, device, prompts)[1]
    log(f"Training LD3 for {opts['solver']} ({num_steps} time points, NFE {nfe}; teacher {sampler_tea} "
        f"{opts['teacher_steps']} steps, {schedule}) into {run_dir}")
    predictor, trainer = train(net, settings, opts, ((z[:n], y[:n]), (z[n:], y[n:])), seed=common['seed'],
                               run_dir=run_dir, cond_for=cond_for, log=log, resume=resume is not None)
    if dist.get_rank() == 0:
        total = opts['training_rounds_v1'] + opts['training_rounds_v2']
        training.save_predictor(predictor, run_dir, progress=(total, total))
        with open(os.path.join(run_dir, 'stats.jsonl'), 'w') as f:
            f.write(''.join(json.dumps(r) + '\n' for r in trainer.history))
    sigmas, evals = predictor.grids()
    log(f'Done in {time.time() - start:.1f} s: grid {format_grid(sigmas)}'
        + (f', evaluation grid {format_grid(evals)}' if evals is not None else '') + f'; predictor in {run_dir}')
    return run_dir
