"""RDPO: reinforcement fine-tuning of a distilled EPD predictor's table against a reward (PPO with RLOO).

Cold start: each step's points of the distilled table are sorted and kept strictly inside (0, 1); the positions
become the K + 1 segments of the unit interval and the weights a point of the simplex, the means of Dirichlets of
concentration `dirichlet_concentration`. The policy (per step index: an embedding, residual MLP blocks, a
zero-initialised output) shifts their log-concentrations, so its initial mean is exactly the distilled table.
An action is a whole table, one per image: log-probability and entropy are summed over steps.

Rollouts run the EPD sampler with a table per image (one batched call for the K points), under no_grad, from
each image's own seed; each class (or prompt) is repeated rloo_k times. PPO: RLOO advantages within each group of
the same class or prompt (the reference's column-wise mixed-prompt baseline only as baseline='column'),
standardised over the global batch; clipped ratio; closed-form Dirichlet KL to the cold start (kl_coef on by
default); entropy bonus; AdamW with grad-norm clipping. Workers split the rollout and sum their gradients, so any
worker count gives the same run; every random draw comes from (seed, iteration, image), so a resumed run
continues exactly.

    python -m training.rl --config configs/rl/gmm_digits.yaml --override ppo.kl_coef=0.01 --max-steps 20
"""
import copy
import json
import math
import os
import sys
import time

import click
import torch
from omegaconf import OmegaConf

from solvers.learned import epd
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write

EPS = 1e-6
STATE_FILE = 'training-state.pt'
CONFIG_FILE = 'resolved_config.yaml'
METRICS_FILE = 'metrics.jsonl'


class UsageError(Exception):
    """Bad input: printed as one line, non-zero exit."""


# ---- cold start --------------------------------------------------------------------------------------------------

def predictor_tables(predictor):
    """The distilled predictor's per-step tables r, c, a, w [S, K] float64 and its raw scale parameters."""
    if predictor.kind != 'epd' or predictor.settings.get('sampler_stu') != 'epd':
        raise UsageError(f"RL fine-tunes EPD-Solver tables; this predictor is {predictor.kind} with solver "
                         f"{predictor.settings.get('sampler_stu')}; give an EPD predictor (sampler_stu=epd)")
    steps = predictor.settings['num_steps'] - 1
    with torch.no_grad():
        rows = [predictor.table(n, torch.float64) for n in range(steps)]
    r, c, a, w = (torch.stack([row[i] for row in rows]).detach().cpu() for i in range(4))
    raw = dict(scale_dir_params=predictor.scale_dir_params.detach().cpu().to(torch.float64),
               scale_time_params=predictor.scale_time_params.detach().cpu().to(torch.float64))
    return dict(r=r, c=c, a=a, w=w), raw


def sanitise(r, w, *others):
    """Sort each step's points by position (permuting the weights and other tables alike) and clip positions into
    [r_{j-1} + EPS, 1 - EPS (K - j + 1)] (1-based j, r_0 = 0): strictly increasing inside (0, 1). Weights are
    floored at EPS and renormalised. Returns (r, w, others..., order)."""
    order = torch.argsort(r, dim=1, stable=True)
    r, w = r.gather(1, order), w.gather(1, order)
    others = [o.gather(1, order) for o in others]
    K = r.shape[1]
    cols, prev = [], torch.zeros_like(r[:, 0])
    for j in range(K):
        prev = torch.minimum(torch.maximum(r[:, j], prev + EPS), torch.full_like(prev, 1 - EPS * (K - j)))
        cols.append(prev)
    r = torch.stack(cols, 1)
    w = w.clamp_min(EPS)
    return (r, w / w.sum(1, keepdim=True), *others, order)


def segments(r):
    """Positions [S, K] -> the K + 1 segments of [0, 1] they cut, [S, K + 1]."""
    zero, one = torch.zeros_like(r[:, :1]), torch.ones_like(r[:, :1])
    return torch.diff(torch.cat([zero, r, one], 1), dim=1)


def cold_start(predictor):
    """Base tables of the policy from a distilled EPD predictor (all [S, K] or [S, K + 1], float64)."""
    tables, raw = predictor_tables(predictor)
    r, w, c, a, cp, ap, order = sanitise(tables['r'], tables['w'], tables['c'], tables['a'],
                                         raw['scale_dir_params'], raw['scale_time_params'])
    return dict(r=r, w=w, c=c, a=a, seg=segments(r), scale_dir_params=cp, scale_time_params=ap, order=order)


# ---- Dirichlet closed forms --------------------------------------------------------------------------------------

def dirichlet_kl(p, q):
    """KL(Dir(p) || Dir(q)) over the last axis: lnG(sum p) - lnG(sum q) - sum[lnG(p) - lnG(q)]
    + sum (p - q)(psi(p) - psi(sum p))."""
    p0, q0 = p.sum(-1), q.sum(-1)
    return (torch.lgamma(p0) - torch.lgamma(q0) - (torch.lgamma(p) - torch.lgamma(q)).sum(-1)
            + ((p - q) * (torch.digamma(p) - torch.digamma(p0)[..., None])).sum(-1))


def normal_kl(mu_p, std_p, mu_q, std_q):
    return torch.log(std_q / std_p) + (std_p ** 2 + (mu_p - mu_q) ** 2) / (2 * std_q ** 2) - 0.5


# ---- policy ------------------------------------------------------------------------------------------------------

class RDPOPolicy(torch.nn.Module):
    """Per-step Dirichlets over the segments (positions) and the weights, optionally LogNormal direction/time
    scales, as residual shifts of the cold start's log-concentrations (locations) by a small network of the step
    index whose output layer starts at zero."""

    def __init__(self, base, concentration, hidden_dim=128, num_layers=2, train_scale_dir=False,
                 train_scale_time=False, scale_std=0.05):
        super().__init__()
        S, K = base['r'].shape
        self.S, self.K = S, K
        self.train_scale_dir, self.train_scale_time = bool(train_scale_dir), bool(train_scale_time)
        f64 = torch.float64
        self.register_buffer('log_alpha_pos', torch.log(concentration * base['seg'].to(f64)))
        self.register_buffer('log_alpha_w', torch.log(concentration * base['w'].to(f64)))
        self.register_buffer('base_c', base['c'].to(f64))
        self.register_buffer('base_a', base['a'].to(f64))
        self.log_std0 = math.log(scale_std)
        self.embedding = torch.nn.Embedding(S, hidden_dim, dtype=f64)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden_dim, dtype=f64) for _ in range(num_layers))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(hidden_dim, hidden_dim, dtype=f64)
                                           for _ in range(num_layers))
        out = (K + 1) + K + 2 * K * (self.train_scale_dir + self.train_scale_time)
        self.output = torch.nn.Linear(hidden_dim, out, dtype=f64)
        torch.nn.init.zeros_(self.output.weight)
        torch.nn.init.zeros_(self.output.bias)

    def params(self):
        """Distribution parameters of every step: alpha_pos [S, K+1], alpha_w [S, K], and per trained scale
        (loc, std) of log c / log a [S, K]."""
        h = self.embedding(torch.arange(self.S, device=self.output.weight.device))
        for norm, lin in zip(self.norms, self.linears):
            h = h + lin(torch.nn.functional.silu(norm(h)))
        out = self.output(h)
        K = self.K
        d_pos, d_w, rest = out[:, :K + 1], out[:, K + 1:2 * K + 1], out[:, 2 * K + 1:]
        p = dict(alpha_pos=torch.exp(self.log_alpha_pos + d_pos).clamp_min(1e-5),
                 alpha_w=torch.exp(self.log_alpha_w + d_w).clamp_min(1e-5))
        for name, trained, base in (('c', self.train_scale_dir, self.base_c), ('a', self.train_scale_time,
                                                                                self.base_a)):
            if trained:
                d_loc, d_logstd, rest = rest[:, :K], rest[:, K:2 * K], rest[:, 2 * K:]
                std = torch.exp((self.log_std0 + d_logstd).clamp(-7, 2))
                # loc - std0^2 / 2: the LogNormal's mean exp(loc + std^2 / 2) starts at the distilled scale.
                p[name] = (torch.log(base) - math.exp(2 * self.log_std0) / 2 + d_loc, std)
        return p

    def base_params(self):
        p = dict(alpha_pos=torch.exp(self.log_alpha_pos).clamp_min(1e-5),
                 alpha_w=torch.exp(self.log_alpha_w).clamp_min(1e-5))
        std0 = math.exp(self.log_std0)
        for name, trained, base in (('c', self.train_scale_dir, self.base_c), ('a', self.train_scale_time,
                                                                                self.base_a)):
            if trained:
                p[name] = (torch.log(base) - std0 ** 2 / 2, torch.full_like(base, std0))
        return p

    def log_prob(self, action, p=None):
        """log pi(action) summed over steps (and points), [B]. action: seg [B, S, K+1], w [B, S, K] (and
        c, a [B, S, K] for trained scales)."""
        p = p or self.params()
        D = torch.distributions
        lp = D.Dirichlet(p['alpha_pos']).log_prob(action['seg']).sum(-1)
        lp = lp + D.Dirichlet(p['alpha_w']).log_prob(action['w']).sum(-1)
        for name in ('c', 'a'):
            if name in p:
                lp = lp + D.LogNormal(*p[name]).log_prob(action[name]).sum((-1, -2))
        return lp

    def entropy(self, p=None):
        p = p or self.params()
        D = torch.distributions
        h = D.Dirichlet(p['alpha_pos']).entropy().sum() + D.Dirichlet(p['alpha_w']).entropy().sum()
        for name in ('c', 'a'):
            if name in p:
                h = h + D.LogNormal(*p[name]).entropy().sum()
        return h

    def kl_to_base(self, p=None):
        """KL(pi || cold start), closed form, summed over steps."""
        p, q = p or self.params(), self.base_params()
        kl = dirichlet_kl(p['alpha_pos'], q['alpha_pos']).sum() + dirichlet_kl(p['alpha_w'], q['alpha_w']).sum()
        for name in ('c', 'a'):
            if name in p:
                kl = kl + normal_kl(*p[name], *q[name]).sum()
        return kl

    @torch.no_grad()
    def sample(self, seeds):
        """One action per seed, each drawn from the global RNG reseeded by that seed (torch's Dirichlet sampler
        takes no generator), so a draw does not depend on the batch; the caller's RNG state is kept."""
        p = self.params()
        D = torch.distributions
        draws = {k: [] for k in ('seg', 'w', 'c', 'a') if k in ('seg', 'w') or k in p}
        with torch.random.fork_rng(devices=[]):
            for s in seeds:
                torch.manual_seed(int(s) % (1 << 63))
                draws['seg'].append(D.Dirichlet(p['alpha_pos'].cpu()).sample())
                draws['w'].append(D.Dirichlet(p['alpha_w'].cpu()).sample())
                for name in ('c', 'a'):
                    if name in p:
                        draws[name].append(D.LogNormal(p[name][0].cpu(), p[name][1].cpu()).sample())
        device = self.output.weight.device
        # A segment that underflows to 0 has log-density -inf; keep every draw strictly inside the simplex.
        out = {k: torch.stack(v).to(device) for k, v in draws.items()}
        for k in ('seg', 'w'):
            out[k] = out[k].clamp_min(1e-12)
            out[k] = out[k] / out[k].sum(-1, keepdim=True)
        return out

    @torch.no_grad()
    def mean_table(self):
        """The policy mean as tables r, w, c, a [S, K] (c, a: the LogNormal means, or the distilled scales)."""
        p = self.params()
        pos = p['alpha_pos'] / p['alpha_pos'].sum(-1, keepdim=True)
        table = dict(r=torch.cumsum(pos, -1)[:, :self.K], w=p['alpha_w'] / p['alpha_w'].sum(-1, keepdim=True),
                     c=self.base_c.clone(), a=self.base_a.clone())
        for name in ('c', 'a'):
            if name in p:
                loc, std = p[name]
                table[name] = torch.exp(loc + std ** 2 / 2)
        return table

    def action_tables(self, action):
        """Per-image tables [B, S, K] of an action: r = cumsum(seg)[:K], w, c, a."""
        B = action['seg'].shape[0]
        r = torch.cumsum(action['seg'], -1)[..., :self.K]
        c = action['c'] if 'c' in action else self.base_c.expand(B, -1, -1)
        a = action['a'] if 'a' in action else self.base_a.expand(B, -1, -1)
        return dict(r=r, w=action['w'], c=c, a=a)


# ---- rollouts ----------------------------------------------------------------------------------------------------

def mix_seed(*parts):
    """A 63-bit seed from integers (a polynomial hash: distinct tuples give distinct streams in practice)."""
    h = 0x2545F4914F6CDD1D
    for v in parts:
        h = (h * 1_000_003 + int(v) + 0x9E3779B9) % (1 << 63)
    return h


STREAM_LATENT, STREAM_ACTION, STREAM_LABEL, STREAM_EVAL, STREAM_SHUFFLE = 1, 2, 3, 4, 5


def sample_tables(net, latents, sigmas, cond, tables, settings):
    """The EPD sampler with one table per image (tables: r, c, a, w [B, S, K]), from unit latents."""
    dtype = latents.dtype
    table = lambda n: tuple(tables[k][:, n].to(dtype) for k in ('r', 'c', 'a', 'w'))
    return epd(net, latents * sigmas[0], sigmas, cond, table=table, afs=settings['afs'], fcn=settings['fcn'])


def draw_conditions(net, labels_or_prompts, device, dtype):
    """The denoiser's condition of each image: one-hot class rows, or encoded prompts."""
    if isinstance(labels_or_prompts, torch.Tensor):
        return torch.nn.functional.one_hot(labels_or_prompts.to(device), net.label_dim).to(dtype)
    if labels_or_prompts is not None:
        return net.encode_prompts(list(labels_or_prompts))
    return None


def group_targets(net, prompts, seed, stream, iteration, groups):
    """Class labels (or prompts) of the given global group indices: for a conditional model each group's class is
    drawn from the class prior by its own generator; prompts walk the prompt list in order."""
    if prompts is not None:
        return [prompts.prompts[int(g) % len(prompts)] for g in groups]
    if getattr(net, 'label_dim', 0):
        labels = [int(net.sample_labels(torch.Generator().manual_seed(mix_seed(seed, stream, iteration, g)),
                                        'cpu').argmax()) for g in groups]
        return torch.tensor(labels)
    return None


def repeat_targets(targets, k):
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets.repeat_interleave(k)
    return [t for t in targets for _ in range(k)]


def unit_latents(net, seeds, dtype, device):
    return torch.stack([torch.randn(net.sample_shape, generator=torch.Generator().manual_seed(s),
                                    dtype=torch.float64) for s in seeds]).to(device=device, dtype=dtype)


# ---- PPO ---------------------------------------------------------------------------------------------------------

def rloo_advantages(rewards, k, baseline='per_prompt'):
    """RLOO advantages of a global batch laid out group-major (each group: k images of one class or prompt),
    standardised (mean 0, population std 1). baseline='per_prompt': each image's baseline is the mean of the
    other k - 1 images of its group. baseline='column': the reference's view(k, R / k) columns, which mix
    groups (kept for comparison only)."""
    R = rewards.shape[0]
    if R % k:
        raise UsageError(f"the rollout ({R}) is not divisible by rloo_k={k}")
    if baseline == 'per_prompt':
        grid = rewards.reshape(R // k, k)
    elif baseline == 'column':
        grid = rewards.reshape(k, R // k).T
    else:
        raise UsageError(f"ppo.baseline={baseline!r}; allowed: per_prompt, column")
    adv = grid - (grid.sum(1, keepdim=True) - grid) / (k - 1)
    adv = adv.reshape(-1) if baseline == 'per_prompt' else adv.T.reshape(-1)
    return (adv - adv.mean()) / adv.std(unbiased=False).clamp_min(1e-8)


def ppo_update(policy, optimizer, action, old_logp, adv, own, ppo, seed, iteration):
    """PPO epochs over the global batch. action/old_logp/adv hold this worker's images, whose global indices are
    `own`; each minibatch's loss is normalised by its global size and the workers' gradients are summed, so the
    update is the one a single process makes. Returns averaged metrics."""
    R, mb = ppo['rollout_batch_size'], ppo['minibatch_size']
    world = dist.get_world_size()
    local = {int(g): i for i, g in enumerate(own)}
    stats = dict(loss=0.0, policy_loss=0.0, kl=0.0, entropy=0.0, ratio=0.0, clip_frac=0.0, grad_norm=0.0)
    updates = 0
    for epoch in range(ppo['ppo_epochs']):
        perm = torch.randperm(R, generator=torch.Generator().manual_seed(mix_seed(seed, STREAM_SHUFFLE, iteration,
                                                                                  epoch)))
        for lo in range(0, R, mb):
            members = perm[lo:lo + mb].tolist()
            mine = torch.tensor([local[g] for g in members if g in local], dtype=torch.long)
            p = policy.params()
            kl, ent = policy.kl_to_base(p), policy.entropy(p)
            pg_sum = torch.zeros((), dtype=torch.float64)
            ratio_sum = clip_sum = torch.zeros((), dtype=torch.float64)
            if len(mine):
                sub = {k: v[mine] for k, v in action.items()}
                ratio = torch.exp(policy.log_prob(sub, p) - old_logp[mine])
                a = adv[mine]
                clipped = ratio.clamp(1 - ppo['clip_range'], 1 + ppo['clip_range'])
                pg_sum = torch.maximum(-a * ratio, -a * clipped).sum()
                ratio_sum = ratio.detach().sum()
                clip_sum = ((ratio.detach() - 1).abs() > ppo['clip_range']).double().sum()
            n = len(members)
            loss = pg_sum / n + (ppo['kl_coef'] * kl - ppo['entropy_coef'] * ent) / world
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for q in policy.parameters():
                q.grad = dist.all_reduce_sum(q.grad if q.grad is not None else torch.zeros_like(q))
            max_norm = ppo['max_grad_norm'] if ppo['max_grad_norm'] else float('inf')
            grad_norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), max_norm)
            optimizer.step()
            sums = dist.all_reduce_sum(torch.stack([pg_sum.detach(), ratio_sum, clip_sum]))
            stats['policy_loss'] += sums[0].item() / n
            stats['loss'] += sums[0].item() / n + ppo['kl_coef'] * kl.item() - ppo['entropy_coef'] * ent.item()
            stats['ratio'] += sums[1].item() / n
            stats['clip_frac'] += sums[2].item() / n
            stats['kl'] += kl.item()
            stats['entropy'] += ent.item()
            stats['grad_norm'] += float(grad_norm)
            updates += 1
    return {k: v / max(updates, 1) for k, v in stats.items()}


# ---- config ------------------------------------------------------------------------------------------------------

SCORER_NAMES = ('hps', 'pickscore', 'imagereward', 'clip', 'aesthetic', 'class_posterior', 'log_density',
                'neg_error')
DEFAULTS = dict(
    run=dict(output_root='exps', run_name='rl', seed=0),
    data=dict(predictor_snapshot=None, prompt_csv=None),
    model=dict(dataset_name=None, model_path=None, guidance_type=None, guidance_rate=None, schedule_type=None,
               schedule_rho=None, num_steps=None, num_points=None, sigma_min=None, sigma_max=None, backend=None,
               resolution=None, backend_options={}, flowmatch_mu=None, flowmatch_shift=None, device=None),
    reward=dict(type='class_posterior', weights_path=None, arch=None, batch_size=16, enable_amp=False,
                hps_version='v2.1', cache_dir=None, sigma=0.0, per_dim=True,
                multi=dict(weights={name: 0.0 for name in SCORER_NAMES},
                           hps=dict(weights_path=None, arch=None),
                           pickscore=dict(model=None, processor=None),
                           imagereward=dict(checkpoint=None, med_config=None, tokenizer=None, cache_dir=None,
                                            reference_shift=False),
                           clip=dict(weights_path=None, arch=None, cache_dir=None),
                           aesthetic=dict(predictor_path=None, clip_path=None, arch=None),
                           class_posterior=dict(sigma=0.0), log_density=dict(per_dim=True),
                           neg_error=dict(rtol=1e-5, atol=1e-5))),
    ppo=dict(rollout_batch_size=32, rloo_k=4, ppo_epochs=1, minibatch_size=16, learning_rate=5e-5, clip_range=0.2,
             kl_coef=0.01, entropy_coef=0.0, max_grad_norm=1.0, decode_rgb=True, steps=10,
             dirichlet_concentration=20.0, scale_std=0.05, train_scale_dir=None, train_scale_time=None,
             baseline='per_prompt', hidden_dim=128, num_layers=2, weight_decay=0.0),
    logging=dict(log_interval=1, save_interval=5, eval_images=0),
)
FREE_KEYS = {('model', 'backend_options')}
MODEL_KEYS_FROM_PREDICTOR = ('schedule_type', 'schedule_rho', 'num_steps', 'num_points', 'sigma_min', 'sigma_max')


def check_keys(given, schema, where, prefix=()):
    for key, value in given.items():
        path = prefix + (key,)
        if key not in schema:
            raise UsageError(f"unknown key {'.'.join(path)} in {where}; allowed in "
                             f"{'.'.join(prefix) or 'the top level'}: {', '.join(schema)}")
        if isinstance(schema[key], dict) and path not in FREE_KEYS:
            if not isinstance(value, dict):
                raise UsageError(f"{'.'.join(path)} in {where} must be a section (a mapping), not {value!r}")
            check_keys(value, schema[key], where, path)


def load_rl_config(path=None, overrides=(), max_steps=None):
    """The config: DEFAULTS, then the YAML at `path`, then `overrides` (a.b=value); unknown keys are refused."""
    cfg = OmegaConf.create(copy.deepcopy(DEFAULTS))
    parts = []
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"--config={path}: no such file")
        user = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        check_keys(user, DEFAULTS, path)
        parts.append(OmegaConf.create(user))
    if overrides:
        bad = [o for o in overrides if '=' not in o]
        if bad:
            raise UsageError(f"--override {bad[0]!r} must read section.key=value, e.g. ppo.kl_coef=0.01")
        dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
        check_keys(dot, DEFAULTS, '--override')
        parts.append(OmegaConf.create(dot))
    cfg = OmegaConf.to_container(OmegaConf.merge(cfg, *parts), resolve=True)
    if max_steps is not None:
        cfg['ppo']['steps'] = int(max_steps)
    validate(cfg)
    return cfg


def validate(cfg):
    ppo, world = cfg['ppo'], dist.get_world_size()
    R, k = ppo['rollout_batch_size'], ppo['rloo_k']
    if not cfg['data']['predictor_snapshot']:
        raise UsageError("data.predictor_snapshot is required: the distilled EPD predictor (folder, file or "
                         "experiment number)")
    if k < 2 or R % k:
        raise UsageError(f"ppo.rollout_batch_size={R} must be a multiple of ppo.rloo_k={k} (>= 2)")
    if R % (world * k):
        raise UsageError(f"ppo.rollout_batch_size={R} must split into whole groups of rloo_k={k} over {world} "
                         f"workers (a multiple of {world * k})")
    if not 0 < ppo['minibatch_size'] <= R:
        raise UsageError(f"ppo.minibatch_size={ppo['minibatch_size']} must lie in 1..rollout_batch_size={R}")
    if ppo['dirichlet_concentration'] <= 0:
        raise UsageError("ppo.dirichlet_concentration must be positive")
    if ppo['baseline'] not in ('per_prompt', 'column'):
        raise UsageError(f"ppo.baseline={ppo['baseline']!r}; allowed: per_prompt, column")
    if not 0 < cfg['reward']['batch_size']:
        raise UsageError("reward.batch_size must be positive")


def reward_options(cfg, net):
    """(name, options) for scorers.load_scorer from the reward section."""
    rw = cfg['reward']
    name = rw['type']
    if name == 'mps':
        raise UsageError("reward.type=mps: MPS is an evaluation score, not a training reward; use hps, pickscore, "
                         "imagereward, clip, aesthetic or multi")
    common = dict(net=net, batch_size=rw['batch_size'])
    if name == 'multi':
        heads = copy.deepcopy(rw['multi'])
        weights = heads.pop('weights')
        if rw['weights_path'] and not heads['hps'].get('weights_path'):
            heads['hps']['weights_path'] = rw['weights_path']      # the reference's reward.weights_path is HPS's
        return 'multi', dict(common, weights=weights, **heads)
    opts = dict(common)
    if name in ('hps', 'clip'):
        opts.update(weights_path=rw['weights_path'], arch=rw['arch'])
    elif name == 'class_posterior':
        opts.update(sigma=rw['sigma'])
    elif name == 'log_density':
        opts.update(per_dim=rw['per_dim'])
    elif name in ('pickscore', 'aesthetic', 'imagereward', 'neg_error'):
        # Their files are set where the reference sets them, under reward.multi.<name>; errors name those keys.
        opts.update(rw['multi'][name], option_prefix=f'reward.multi.{name}')
        if name == 'aesthetic':
            opts['arch'] = rw['arch'] or opts['arch']
        if name == 'imagereward':
            opts['cache_dir'] = opts['cache_dir'] or rw['cache_dir']
    return name, opts


# ---- the run -----------------------------------------------------------------------------------------------------

def model_config_name(dataset_name, settings):
    """The model config (configs/<name>.yaml) of an RL run: the predictor's own (its `config`, as sample.py reads
    it, else its dataset_name); model.dataset_name, when given, must name that one."""
    import configs
    theirs = settings.get('config') or settings['dataset_name']
    if dataset_name is not None and str(dataset_name).endswith(('.yaml', '.yml')):
        # A model config of the user's own (as train.py --dataset_name=path.yaml took it): it names its dataset.
        try:
            named = configs.load_config(dataset_name)['dataset_name']
        except ValueError as e:
            raise UsageError(f"model.dataset_name: {e}")
        if named not in (theirs, settings['dataset_name']):
            raise UsageError(f"model.dataset_name={dataset_name} is a config of {named!r}, but the predictor was "
                             f"distilled on {theirs!r}; give that model's config")
        return dataset_name
    if dataset_name is not None and dataset_name not in (theirs, settings['dataset_name']):
        raise UsageError(f"the predictor was distilled on {theirs!r}, not {dataset_name!r}; drop "
                         "model.dataset_name or give a predictor of that dataset")
    if not str(theirs).endswith(('.yaml', '.yml')) and theirs not in configs.known_datasets():
        raise UsageError(f"the predictor was distilled on {theirs!r}, which is not a config in configs/; set "
                         "model.dataset_name to the YAML config it was trained with")
    return theirs


def build(cfg, device):
    """(net, distilled predictor, settings, base, scorer, prompts) of a config."""
    import configs
    import training
    from sample import load_model
    from scorers import ScorerError, load_scorer
    try:
        predictor = training.load_predictor(cfg['data']['predictor_snapshot'])
    except ValueError as e:
        raise UsageError(f"data.predictor_snapshot: {e}")
    settings = dict(predictor.settings)
    base = cold_start(predictor)
    m = cfg['model']
    for key in MODEL_KEYS_FROM_PREDICTOR:
        theirs = settings['num_points'] if key == 'num_points' else settings.get(key)
        if m[key] is not None and m[key] != theirs:
            raise UsageError(f"model.{key}={m[key]} differs from the predictor's {theirs}: the table is tied to its "
                             f"grid; drop model.{key} or distil a predictor with it")
    dataset = model_config_name(m['dataset_name'], settings)
    guidance_type = m['guidance_type'] or settings.get('guidance_type')
    guidance_rate = m['guidance_rate'] if m['guidance_rate'] is not None else settings.get('guidance_rate')
    net = load_model(configs.load_config(dataset), m['model_path'], device, guidance_type, guidance_rate)
    predictor.check_model(net)
    base['sigmas'] = predictor.schedule(net).detach().to(torch.float64).cpu()
    try:
        name, opts = reward_options(cfg, net)
        scorer = load_scorer(name, **opts).to(device)
    except ScorerError as e:
        raise UsageError(str(e))
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt_file=cfg['data']['prompt_csv'], dataset_name=dataset)
    ppo = cfg['ppo']
    for flag, key in (('train_scale_dir', 'scale_dir'), ('train_scale_time', 'scale_time')):
        if ppo[flag] and not settings.get(key):
            raise UsageError(f"ppo.{flag} needs a predictor with {key} > 0 (this one has {settings.get(key)}): "
                             "its scale would not survive the export")
    return net, predictor, settings, base, scorer, prompts


def make_policy(cfg, settings, base, device):
    ppo = cfg['ppo']
    torch.manual_seed(mix_seed(cfg['run']['seed'], 0))
    tsd = ppo['train_scale_dir'] if ppo['train_scale_dir'] is not None else False
    tst = ppo['train_scale_time'] if ppo['train_scale_time'] is not None else False
    policy = RDPOPolicy(base, ppo['dirichlet_concentration'], ppo['hidden_dim'], ppo['num_layers'], tsd, tst,
                        ppo['scale_std']).to(device)
    policy.sigmas = base.get('sigmas')      # the predictor's grid (hand-made or learned), which the tables act on
    return policy


def rollout(net, policy, settings, scorer, prompts, cfg, iteration, device):
    """This worker's share of one rollout: actions, old log-probs, rewards (all global-batch ordered) and its
    images' global indices."""
    ppo, seed = cfg['ppo'], cfg['run']['seed']
    R, k = ppo['rollout_batch_size'], ppo['rloo_k']
    rank, world = dist.get_rank(), dist.get_world_size()
    per = R // world
    own = list(range(rank * per, (rank + 1) * per))
    groups = [iteration * (R // k) + i // k for i in own[::k]]
    targets = repeat_targets(group_targets(net, prompts, seed, STREAM_LABEL, iteration, groups), k)
    dtype = torch.float64 if settings.get('dtype') == 'float64' else torch.float32
    image_ids = [iteration * R + i for i in own]
    latents = unit_latents(net, [mix_seed(seed, STREAM_LATENT, j) for j in image_ids], dtype, device)
    action = policy.sample([mix_seed(seed, STREAM_ACTION, j) for j in image_ids])
    with torch.no_grad():
        old_logp = policy.log_prob(action)
        tables = policy.action_tables(action)
        sigmas = policy.sigmas.to(latents)
        cond = draw_conditions(net, targets, device, dtype)
        x = sample_tables(net, latents, sigmas, cond, tables, settings)
        images = net.decode(x)
        rewards = score(scorer, images, targets, latents * sigmas[0], sigmas, cond).to(torch.float64).reshape(-1)
    heads = {name: v.mean().item() for name, v in getattr(scorer, 'last_heads', {}).items()}
    return action, old_logp, rewards, own, heads


def score(scorer, images, targets, noise, sigmas, cond):
    """The scorer's rewards [B]; a scorer that needs each image's start (neg_error) also gets its noise, the grid
    and the condition."""
    if getattr(scorer, 'needs_start', False):
        return scorer(images, targets, start=dict(noise=noise, sigmas=sigmas, cond=cond))
    return scorer(images, targets)


def export_predictor(policy, predictor, base, folder, extra=None):
    """Write the policy mean as an EPD predictor folder (safetensors + JSON of every setting) that sample.py
    --predictor_path runs deterministically; returns the predictor."""
    import training
    from training.predictors import EPDPredictor
    table = policy.mean_table()
    settings = dict(predictor.settings, **(extra or {}))
    out = EPDPredictor(settings)
    r, w = sanitise(table['r'].cpu(), table['w'].cpu())[:2]
    logit = lambda v: torch.log(v) - torch.log1p(-v)
    # The predictor's other parameters (a learned grid's schedule_theta) go over as they are.
    state = dict(predictor.state_dict(), r_params=logit(r), weight_params=torch.log(w))
    for name, key, raw in (('c', 'scale_dir', 'scale_dir_params'), ('a', 'scale_time', 'scale_time_params')):
        trained = policy.train_scale_dir if name == 'c' else policy.train_scale_time
        s = settings.get(key) or 0
        if trained and s:
            u = ((table[name].cpu() - 1 + s) / (2 * s)).clamp(EPS, 1 - EPS)
            state[raw] = 2 * logit(u)
        else:
            state[raw] = base[raw].clone()       # the distilled raw scales, in the sorted point order
    out.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
    training.save_predictor(out, folder)
    return out


def plot_curves(metrics_path, png_path):
    """Mean reward and KL to the cold start against the PPO step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not rows:
        return
    steps = [r['step'] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [r['reward_mean'] for r in rows], label='rollout')
    held = [(r['step'], r['heldout_reward']) for r in rows if r.get('heldout_reward') is not None]
    if held:
        ax[0].plot(*zip(*held), 'o-', label='held-out (policy mean)')
    ax[0].set_xlabel('PPO step'); ax[0].set_ylabel('mean reward'); ax[0].legend()
    ax[1].plot(steps, [r['kl'] for r in rows])
    ax[1].set_xlabel('PPO step'); ax[1].set_ylabel('KL to the cold start')
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def heldout_reward(net, policy, settings, scorer, prompts, cfg, device, count):
    """Mean reward of the policy mean on `count` held-out images: noises and classes from a stream that training
    never draws from (prompts: taken from the end of the list)."""
    seed = cfg['run']['seed']
    ids = list(range(count))
    if prompts is not None:
        targets = [prompts.prompts[(len(prompts) - 1 - i) % len(prompts)] for i in ids]
    else:
        targets = group_targets(net, None, seed, STREAM_EVAL, 0, ids)
    dtype = torch.float64 if settings.get('dtype') == 'float64' else torch.float32
    latents = unit_latents(net, [mix_seed(seed, STREAM_EVAL, j) for j in ids], dtype, device)
    tables = {name: v[None].expand(count, -1, -1) for name, v in policy.mean_table().items()}
    sigmas = policy.sigmas.to(latents)
    cond = draw_conditions(net, targets, device, dtype)
    with torch.no_grad():
        x = sample_tables(net, latents, sigmas, cond, tables, settings)
        rewards = score(scorer, net.decode(x), targets, latents * sigmas[0], sigmas, cond)
        return rewards.to(torch.float64).mean().item()


def train(cfg, run_dir, device, resume=False, log=print, built=None):
    """The PPO loop; writes metrics, checkpoints, curves and the exported predictor into run_dir."""
    from safetensors.torch import save_file
    net, predictor, settings, base, scorer, prompts = built or build(cfg, device)
    policy = make_policy(cfg, settings, base, device)
    ppo = cfg['ppo']
    optimizer = torch.optim.AdamW(policy.parameters(), lr=ppo['learning_rate'], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=ppo['weight_decay'])
    rank = dist.get_rank()
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    state_path = os.path.join(run_dir, STATE_FILE)
    start = 0
    if resume and os.path.isfile(state_path):
        state = torch.load(state_path, map_location=device, weights_only=True)
        policy.load_state_dict(state['policy'])
        optimizer.load_state_dict(state['optimizer'])
        start = int(state['step'])
        log(f'Resuming {run_dir} at PPO step {start} of {ppo["steps"]}')
    if rank == 0:
        # Keep only the metrics of the steps the saved state includes (a killed run may have logged more).
        rows = [line for line in open(metrics_path)] if os.path.isfile(metrics_path) else []
        rows = [line for line in rows if line.strip() and json.loads(line)['step'] <= start]
        atomic_write(metrics_path, ''.join(rows).encode())
    dist.barrier()
    eval_n = cfg['logging']['eval_images']
    t0 = time.time()
    for step in range(start, ppo['steps']):
        t_iter = time.time()
        action, old_logp, rewards, own, heads = rollout(net, policy, settings, scorer, prompts, cfg, step, device)
        R = ppo['rollout_batch_size']
        full = torch.zeros(R, dtype=torch.float64)
        full[own] = rewards.cpu()
        full = dist.all_reduce_sum(full)
        adv_all = rloo_advantages(full, ppo['rloo_k'], ppo['baseline'])
        t_roll = time.time() - t_iter
        stats = ppo_update(policy, optimizer, action, old_logp, adv_all[own].to(device), own, ppo,
                           cfg['run']['seed'], step)
        done = step + 1
        save = done % cfg['logging']['save_interval'] == 0 or done == ppo['steps']
        row = dict(step=done, reward_mean=full.mean().item(), reward_std=full.std(unbiased=False).item(),
                   **{f'{k}_mean': dist.all_reduce_sum(torch.tensor(v)).item() / dist.get_world_size()
                      for k, v in heads.items()},
                   **stats, rollout_sec=round(t_roll, 4), iter_sec=round(time.time() - t_iter, 4),
                   elapsed_sec=round(time.time() - t0, 3), heldout_reward=None)
        if save and eval_n:
            row['heldout_reward'] = heldout_reward(net, policy, settings, scorer, prompts, cfg, device, eval_n)
        if rank == 0:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
            if done % cfg['logging']['log_interval'] == 0 or done == ppo['steps']:
                log(f"step {done}/{ppo['steps']} reward {row['reward_mean']:.5g} kl {row['kl']:.4g} "
                    f"ratio {row['ratio']:.4f} grad {row['grad_norm']:.3g} {row['iter_sec']:.2f}s")
            if save:
                ckpt = os.path.join(run_dir, 'checkpoints', f'policy-step{done:06d}.safetensors')
                os.makedirs(os.path.dirname(ckpt), exist_ok=True)
                tmp = ckpt + '.tmp'
                save_file({k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}, tmp)
                os.replace(tmp, ckpt)
                state = dict(policy=policy.state_dict(), optimizer=optimizer.state_dict(), step=done)
                atomic_write(state_path, lambda f: torch.save(state, f))
                plot_curves(metrics_path, os.path.join(run_dir, 'curves.png'))
        dist.barrier()
    if rank == 0:
        export(run_dir, select='last', log=log, loaded=(net, predictor, settings, base, policy))
    dist.barrier()
    return policy


def export(run_dir, select='last', log=print, loaded=None, device='cpu'):
    """Export a checkpoint's policy mean as the run folder's predictor (predictor.json + .safetensors), so that
    sample.py --predictor_path=<run folder or its number> runs it. select: 'last', 'best' (highest held-out
    reward in metrics.jsonl; needs logging.eval_images) or a step number."""
    from safetensors.torch import load_file
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, CONFIG_FILE)), resolve=True)
    if loaded is None:
        net, predictor, settings, base, _, _ = build(cfg, device)
        policy = make_policy(cfg, settings, base, device)
    else:
        net, predictor, settings, base, policy = loaded
    ckpts = sorted(f for f in os.listdir(os.path.join(run_dir, 'checkpoints')) if f.endswith('.safetensors'))
    if not ckpts:
        raise UsageError(f"{run_dir} has no policy checkpoint yet")
    steps = {int(f[len('policy-step'):-len('.safetensors')]): f for f in ckpts}
    if select == 'last':
        step = max(steps)
    elif select == 'best':
        rows = [json.loads(line) for line in open(os.path.join(run_dir, METRICS_FILE)) if line.strip()]
        scored = [(r['heldout_reward'], r['step']) for r in rows if r.get('heldout_reward') is not None
                  and r['step'] in steps]
        if not scored:
            raise UsageError(f"{run_dir} has no held-out rewards; train with logging.eval_images > 0 or export "
                             "--select=last")
        step = max(scored)[1]
    else:
        step = int(select)
        if step not in steps:
            raise UsageError(f"no checkpoint of step {step} in {run_dir}; there are: {', '.join(map(str, steps))}")
    policy.load_state_dict(load_file(os.path.join(run_dir, 'checkpoints', steps[step])))
    src = cfg['data']['predictor_snapshot']
    out = export_predictor(policy, predictor, base, run_dir,
                           extra=dict(rl_source=str(src), rl_step=step, rl_reward=cfg['reward']['type']))
    log(f'Exported the policy mean of step {step} as an EPD predictor in {run_dir}')
    return out


def start_run(cfg, resume_dir=None):
    """The run folder: a new exps/NNNNN-rl-<dataset>-<run_name> with the resolved config, or the resumed one."""
    from train import next_run_dir
    if resume_dir is not None:
        return resume_dir
    import training
    settings = training.load_predictor(cfg['data']['predictor_snapshot']).settings
    name = f"rl-{settings['dataset_name']}-{cfg['run']['run_name']}"
    run_dir = dist.broadcast_object(next_run_dir(cfg['run']['output_root'], name) if dist.get_rank() == 0
                                    else None)
    if dist.get_rank() == 0:
        atomic_write(os.path.join(run_dir, CONFIG_FILE), OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())
    dist.barrier()
    return run_dir


@click.command(context_settings=dict(show_default=True))
@click.option('--config', 'config_path', metavar='YAML', default=None, help='RL config (run, data, model, reward, ppo, logging)')
@click.option('--override', 'overrides', metavar='KEY=VALUE', multiple=True, help='Override a config value, e.g. ppo.kl_coef=0.01 (repeatable)')
@click.option('--max-steps', 'max_steps', metavar='INT', type=click.IntRange(min=1), default=None, help='PPO steps (overrides ppo.steps)')
@click.option('--resume', metavar='DIR', default=None, help='Continue a run folder from its last saved state')
@click.option('--export', 'export_dir', metavar='DIR', default=None, help='Only export a run folder\'s policy mean as its predictor')
@click.option('--select', metavar='last|best|STEP', default='last', help='Checkpoint to export with --export')
@click.option('--device', metavar='DEV', default=None, help='[default: cuda if available]')
@click.option('-n', '--dry-run', 'dry_run', is_flag=True, help='Print the resolved config and exit')
def main(config_path, overrides, max_steps, resume, export_dir, select, device, dry_run):
    """RDPO: fine-tune a distilled EPD predictor's table against a reward; the run folder holds the resolved
    config, metrics.jsonl, policy checkpoints, curves.png and the exported predictor."""
    from models import ModelError
    from scorers import ScorerError
    try:
        dist.init()
        dev = torch.device(device) if device else dist.get_device()
        if export_dir is not None:
            export(export_dir, select=select, device=dev)
            return
        if resume is not None:
            if not os.path.isfile(os.path.join(resume, CONFIG_FILE)):
                raise UsageError(f"--resume={resume} is not an RL run folder (no {CONFIG_FILE})")
            cfg = load_rl_config(os.path.join(resume, CONFIG_FILE), overrides, max_steps)
        else:
            cfg = load_rl_config(config_path, overrides, max_steps)
        built = build(cfg, dev)       # every file is found and every setting fits, before a folder is made
        if dry_run:
            dist.print0(OmegaConf.to_yaml(OmegaConf.create(cfg)))
            return
        run_dir = start_run(cfg, resume)
        logger = lambda line: dist.print0(line, flush=True)
        logger(f'RL run in {run_dir}')
        train(cfg, run_dir, dev, resume=resume is not None, log=logger, built=built)
    except (UsageError, ValueError, ModelError, ScorerError, OSError) as e:
        dist.report_error('training.rl', e, same_everywhere=not isinstance(e, OSError))
        dist.shutdown()
        sys.exit(1)
    dist.shutdown()


if __name__ == '__main__':
    main()
