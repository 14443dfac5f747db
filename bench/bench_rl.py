"""RDPO on the class-conditional analytic digits, NFE 5, from a distilled EPD predictor: the held-out reward
(exact class posterior) before and after RL, with the error to the exact ODE solution and the pixel FD to the exact
data distribution beside it, with the KL penalty on (the default) and off, a run rewarding the exact log-density,
and a run rewarding minus the error to the exact ODE solution of the image's own noise (there RL must not end worse
than distillation).

    python bench/bench_rl.py --out=docs/rl.md          # distils, runs both RL runs, evaluates (a few minutes)
    python bench/bench_rl.py --reuse=DIR                # reuse the distilled predictor and runs in DIR
"""
import glob
import json
import os
import subprocess
import sys
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import training                                  # noqa: E402
from bench_learned import write_report           # noqa: E402
from fid import pixel_fd                         # noqa: E402
from models.analytic import digit_mixture        # noqa: E402
from scorers import load_scorer                  # noqa: E402
from solvers.exact import solve_exact            # noqa: E402

DISTIL = ['--dataset_name=gmm_digits', '--sampler_stu=epd', '--num_steps=4', '--afs=True', '--sampler_tea=dpmpp',
          '--M=9', '--schedule_type=polynomial', '--schedule_rho=20', '--scale_dir=0.5', '--scale_time=0.5',
          '--loss=rmse', '--lr=0.1', '--coslr=True', '--batch=32', '--dtype=float64']
CONFIG = os.path.join(ROOT, 'configs', 'rl', 'gmm_digits.yaml')


def run(args, log):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    start = time.time()
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, start


def wait(jobs):
    seconds = {}
    for name, (proc, start) in jobs.items():
        if proc.wait():
            raise SystemExit(f'{name} failed (exit {proc.returncode}); see its log')
        seconds[name] = time.time() - start
    return seconds


def bootstrap_mean(values, draws=2000, seed=0):
    rng = np.random.default_rng(seed)
    v = np.asarray(values)
    means = v[rng.integers(0, len(v), (draws, len(v)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def bootstrap_diff(a, b, draws=2000, seed=0):
    """95% interval of mean(a) - mean(b) over the same held-out samples (paired)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a) - np.asarray(b)
    means = d[rng.integers(0, len(d), (draws, len(d)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@click.command(context_settings=dict(show_default=True))
@click.option('--kimg', metavar='FLOAT', type=float, default=1.6, help='Distillation length')
@click.option('--steps', metavar='INT', type=int, default=60, help='PPO steps of each RL run')
@click.option('--kl', 'kl_coefs', metavar='LIST', default='0.05,0', help='kl_coef of the class-posterior RL runs')
@click.option('--density_kl', metavar='FLOAT', type=float, default=0.05,
              help='kl_coef of the run with the exact log-density reward')
@click.option('--error_kl', metavar='FLOAT', type=float, default=0.05,
              help='kl_coef of the run rewarding minus the error to the exact solution')
@click.option('--num_eval', metavar='INT', type=int, default=256, help='Held-out samples')
@click.option('--work', metavar='DIR', default=os.path.join(ROOT, 'exps', 'bench_rl'), help='Where runs go')
@click.option('--reuse', is_flag=True, help='Reuse the distilled predictor and RL runs already in --work')
@click.option('--out', metavar='MD', default=os.path.join(ROOT, 'docs', 'rl.md'), help='Report page')
def main(kimg, steps, kl_coefs, density_kl, error_kl, num_eval, work, reuse, out):
    kls = [float(v) for v in kl_coefs.split(',')]
    # run name -> (reward, kl_coef); each run's folder and log are named by it.
    specs = {f'kl{kl:g}': ('class_posterior', kl) for kl in kls}
    specs[f'density-kl{density_kl:g}'] = ('log_density', density_kl)
    specs[f'error-kl{error_kl:g}'] = ('neg_error', error_kl)
    os.makedirs(work, exist_ok=True)
    distilled = next(iter(sorted(glob.glob(os.path.join(work, 'distil', '*', 'predictor.json')))), None)
    seconds = {}
    if not (reuse and distilled):
        seconds.update(wait({'distil': run(['train.py', *DISTIL, f'--total_kimg={kimg}', '--device=cpu',
                                            f'--outdir={os.path.join(work, "distil")}'],
                                           os.path.join(work, 'distil.log'))}))
        distilled = sorted(glob.glob(os.path.join(work, 'distil', '*', 'predictor.json')))[-1]
    distilled = os.path.dirname(distilled)
    runs = {}
    jobs = {}
    for key, (reward_type, kl) in specs.items():
        root = os.path.join(work, key)
        found = sorted(glob.glob(os.path.join(root, '*', 'predictor.json')))
        if reuse and found:
            runs[key] = os.path.dirname(found[-1])
            continue
        jobs[key] = run(['-m', 'training.rl', '--config', CONFIG, '--device=cpu', '--max-steps', str(steps),
                         '--override', f'data.predictor_snapshot={distilled}', '--override', f'run.output_root={root}',
                         '--override', f'reward.type={reward_type}', '--override', f'ppo.kl_coef={kl}',
                         '--override', f'run.run_name={key}'],
                        os.path.join(work, f'rl-{key}.log'))
    for key, secs in wait(jobs).items():
        seconds[f'rl {key}'] = secs
        runs[key] = os.path.dirname(sorted(glob.glob(os.path.join(work, key, '*', 'predictor.json')))[-1])
    reward_label = {'class_posterior': 'RL', 'log_density': 'RL on log p(x given y)',
                    'neg_error': 'RL on minus the error to exact'}
    labels_of = {key: f'{reward_label[reward_type]}, kl_coef={kl:g}' for key, (reward_type, kl) in specs.items()}

    # Held-out evaluation: noises and labels from a generator that neither training nor RL uses.
    net = digit_mixture()
    g = torch.Generator().manual_seed(2**31 - 1)
    z = torch.randn(num_eval, *net.sample_shape, generator=g, dtype=torch.float64)
    labels = torch.multinomial(net.class_prior(), num_eval, replacement=True, generator=g)
    cond = torch.nn.functional.one_hot(labels, net.label_dim).to(torch.float64)
    t = time.time()
    exact = torch.cat([solve_exact(net, zp * net.sigma_max, net.sigma_max, net.sigma_min, cp, rtol=1e-7, atol=1e-7)
                       for zp, cp in zip(z.split(128), cond.split(128))])
    seconds['exact ODE solutions'] = time.time() - t
    cfg_sigma = 8.0
    reward = load_scorer('class_posterior', net=net, sigma=cfg_sigma)
    post0 = load_scorer('class_posterior', net=net)
    dens = load_scorer('log_density', net=net)
    mu = net.data_mean().numpy()
    cov = net.data_covariance().numpy()
    from fid import QUANTIZATION_VARIANCE
    cov_q = cov.copy()
    cov_q[np.diag_indices_from(cov_q)] += QUANTIZATION_VARIANCE
    rows = {}
    samples = {'exact ODE solution': exact}
    preds = {'distilled EPD': distilled, **{labels_of[key]: folder for key, folder in runs.items()}}
    for name, folder in preds.items():
        p = training.load_predictor(folder)
        with torch.no_grad():
            samples[name] = p.sample(net, z, cond)
    for name, x in samples.items():
        err = ((x - exact).flatten(1).norm(dim=1) / x[0].numel() ** 0.5).numpy()
        rows[name] = dict(reward=reward(x, labels).numpy(), post0=post0(x, labels).numpy(),
                          dens=dens(x, labels).numpy(), err=err, fd=pixel_fd(x, mu, cov_q))

    iter_sec = {}
    for key, folder in runs.items():
        m = [json.loads(line) for line in open(os.path.join(folder, 'metrics.jsonl'))]
        iter_sec[labels_of[key]] = float(np.median([r['iter_sec'] for r in m]))
    plot({labels_of[key]: folder for key, folder in runs.items()}, os.path.join(os.path.dirname(out), 'rl_curves.png'))

    # Stage times of the runs themselves survive a --reuse (kept beside them).
    times_path = os.path.join(work, 'stage_seconds.json')
    kept = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    seconds = dict(kept, **seconds)
    with open(times_path, 'w') as f:
        json.dump(seconds, f)
    base = rows['distilled EPD']['reward']
    base_dens = rows['distilled EPD']['dens']
    base_err = rows['distilled EPD']['err']
    lines = ['# RDPO on the analytic digits (NFE 5)', '',
             '`python bench/bench_rl.py` (regenerates this page and `rl_curves.png`). The class-conditional analytic',
             'mixture `gmm_digits`; EPD with K = 2 points, 4 time points and AFS (NFE 5) distilled by `train.py`',
             f'({kimg:g} kimg), then fine-tuned by `python -m training.rl --config configs/rl/gmm_digits.yaml` for '
             f'{steps} PPO steps', f'(rollouts of 64 = 8 classes x rloo_k 8, concentration 50, lr 3e-3) with the '
             f'exact class posterior at sigma = {cfg_sigma:g} as the',
             'reward (at sigma = 0 every distilled sample already scores 1.0: the digits lie far apart). Held-out:',
             f'{num_eval} noises and labels drawn from a generator neither stage uses; the policy mean is exported',
             'as an EPD predictor and sampled deterministically. One more run rewards the exact log-density',
             f'log p(x given y) per dimension instead (`--override reward.type=log_density`, kl_coef {density_kl:g}),',
             'and one rewards minus the RMSE to the exact ODE solution of the same noise and label',
             f'(`--override reward.type=neg_error`, kl_coef {error_kl:g}): a reward that cannot be hacked, so RL',
             'must not end worse than the distilled start on it.',
             '',
             '| sampler | reward p(y given x) at sigma 8 [95% CI] | change vs distilled [95% CI] | p(y given x) at 0 '
             '| log p(x given y) / dim [change vs distilled, 95% CI] | RMSE to exact ODE [change vs distilled, 95% CI] '
             '| pixel FD |',
             '|---|---|---|---|---|---|---|']
    for name, r in rows.items():
        lo, hi = bootstrap_mean(r['reward'])
        dlo, dhi = bootstrap_diff(r['reward'], base)
        delta = '' if name == 'distilled EPD' else \
            f"{r['reward'].mean() - base.mean():+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
        plo, phi = bootstrap_diff(r['dens'], base_dens)
        ddens = '' if name == 'distilled EPD' else \
            f" [{r['dens'].mean() - base_dens.mean():+.4f}: {plo:+.4f}, {phi:+.4f}]"
        elo, ehi = bootstrap_diff(r['err'], base_err)
        derr = '' if name == 'distilled EPD' else \
            f" [{r['err'].mean() - base_err.mean():+.4f}: {elo:+.4f}, {ehi:+.4f}]"
        lines.append(f"| {name} | {r['reward'].mean():.4f} [{lo:.4f}, {hi:.4f}] | {delta} | "
                     f"{r['post0'].mean():.4f} | {r['dens'].mean():.4f}{ddens} | {r['err'].mean():.4f}{derr} | "
                     f"{r['fd']:.4f} |")
    lines += ['', 'RMSE per pixel to the exact solution of the same noise and label; pixel FD against the exact data',
              'distribution (with PNG quantisation), which at this sample size is far from 0 even for the exact',
              'solutions (the first row is that floor).', '',
              '![reward and KL curves](rl_curves.png)', '',
              '| run | median wall time per PPO iteration (rollout of 64 + 2 epochs x 2 minibatches; all runs at once on 2 shared CPU '
              'cores) |', '|---|---|']
    lines += [f'| {name} | {s:.2f} s |' for name, s in iter_sec.items()]
    lines += ['', 'Stage wall times this run: ' + ', '.join(f'{k} {v:.0f} s' for k, v in seconds.items()) + '.', '']
    write_report(out, lines)
    print('\n'.join(lines))


def plot(runs, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from torch_utils.image_io import atomic_write
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for name, folder in runs.items():
        m = [json.loads(line) for line in open(os.path.join(folder, 'metrics.jsonl'))]
        s = [r['step'] for r in m]
        ax[0].plot(s, [r['reward_mean'] for r in m], label=name)
        held = [(r['step'], r['heldout_reward']) for r in m if r.get('heldout_reward') is not None]
        ax[1].plot(*zip(*held), 'o-', label=name)
        ax[2].plot(s, [max(r['kl'], 1e-12) for r in m], label=name)
    for a, t in zip(ax, ('rollout reward (its own)', 'held-out reward (its own, policy mean)',
                         'KL to the cold start')):
        a.set_xlabel('PPO step'); a.set_title(t); a.legend()
    ax[2].set_yscale('log')
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


if __name__ == '__main__':
    main()
