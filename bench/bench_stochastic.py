"""Stochastic samplers against the exact data distribution of the analytic models, as a function of the NFE.

gmm_image (3x32x32 mixture): pixel Frechet distance of the samples to the exact data mean and covariance.
gmm_digits (class-conditional, balanced labels): the same distance, and the accuracy of the exact (Bayes)
classifier p(class | x) on the samples. Samplers: edm_sde (EDM Algorithm 2 with EDM's ImageNet-64 churn),
euler_maruyama (beta 1), sed2 (the clean 2nd-SED scheme, with its default lagged drift and with a fresh
drift call per step), sed_ref (2nd-SED as its reference code, at
the seed's rho 3 and ddb, so its 84-step point is the seed's recommended setting), and ipndm (the best ODE solver
of docs/solvers.md on the polynomial grid). Every run uses the same latents (the same seeds) and counts its
denoiser calls; the floor rows are independent sets of exact data samples of the same size, i.e. the distance a
perfect sampler would show at this sample count. Writes the generated part of docs/stochastic.md (between its
markers; the text around it is kept) and docs/figures/stochastic_*.png.

    python bench/bench_stochastic.py --out=docs/stochastic.md            # 6-10 min on 2 (shared) CPU cores
    python bench/bench_stochastic.py --quick=True --out=/tmp/s.md         # about 1 min: 64 samples, 2 NFEs
    python bench/bench_stochastic.py --figures_only=True                  # page and figures from saved results
"""
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers                                     # noqa: E402
from models.analytic import digit_mixture, image_mixture   # noqa: E402
from solvers.noise import ImageNoise               # noqa: E402
from torch_utils.misc import randn_per_seed, seed_generators   # noqa: E402

BEGIN, END = '<!-- bench_stochastic: begin -->', '<!-- bench_stochastic: end -->'
EDM_CHURN = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)   # EDM's ImageNet-64 setting
NFES = (10, 20, 40, 100)
SEED_STEPS = 84


def runs():
    """(label, solver, schedule_rho, options, steps_for(nfe)) of every sampler compared."""
    return [
        ('edm_sde (churn 40)', 'edm_sde', 7.0, dict(EDM_CHURN, denoise_to_zero=True), lambda n: (n + 1) // 2),
        ('euler_maruyama (beta 1)', 'euler_maruyama', 7.0, dict(beta=1.0), lambda n: n + 1),
        ('sed2 (lagged, ddb, beta 1)', 'sed2', 7.0, dict(beta=1.0), lambda n: n),
        ('sed2 (fresh, ddb, beta 1)', 'sed2', 7.0, dict(beta=1.0, drift='fresh'), lambda n: n // 2 + 1),
        ('sed_ref (rho 3, ddb)', 'sed_ref', 3.0, dict(randn_like='ddb'), lambda n: n),
        ('ipndm (ODE)', 'ipndm', 7.0, dict(), lambda n: n + 1),
    ]


# -- the exact statistics ------------------------------------------------------------------------------------

class MixtureStats:
    """Mean, trace and products with the covariance of a GaussianMixture's data distribution, from its factors
    (Sigma = sum_k w_k (U_k diag(lam_k) U_k^T + s2_k I) + sum_k w_k dm_k dm_k^T), never forming the d x d matrix."""

    def __init__(self, model):
        self.w = model.log_weights.exp()
        self.mean = self.w @ model.means
        self.dm = model.means - self.mean                          # [K, d]
        self.model = model
        self.trace = float((self.w * (model.eigvals.sum(1) + model.means.shape[1] * model.iso_vars)).sum()
                           + (self.w * (self.dm ** 2).sum(1)).sum())

    def sandwich(self, X):
        """X Sigma X^T for X [n, d]."""
        m = self.model
        P = torch.einsum('nd,kdr->knr', X, m.bases)               # [K, n, r]
        out = torch.einsum('k,knr,kr,kmr->nm', self.w, P, m.eigvals, P)
        out += float((self.w * m.iso_vars).sum()) * X @ X.T
        Y = X @ self.dm.T                                          # [n, K]
        return out + (Y * self.w) @ Y.T


def frechet(samples, stats):
    """Frechet distance between N(sample mean, sample covariance) and N(mu, Sigma) in pixel space:
    |m - mu|^2 + tr C + tr Sigma - 2 tr (C^1/2 Sigma C^1/2)^1/2, with C = X^T X / (n - 1) (X centred) so that the
    last trace is that of (X Sigma X^T / (n - 1))^1/2, an n x n problem."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    n = x.shape[0]
    m = x.mean(0)
    X = x - m
    eig = torch.linalg.eigvalsh(stats.sandwich(X) / (n - 1)).clamp(min=0)
    return float(((m - stats.mean) ** 2).sum() + (X ** 2).sum() / (n - 1) + stats.trace - 2 * eig.sqrt().sum())


# -- sampling ------------------------------------------------------------------------------------------------

def latents_for(net, seeds):
    return randn_per_seed(seed_generators(seeds, torch.device('cpu')), net.sample_shape, torch.float32,
                          torch.device('cpu'))


def sample_run(net, solver, rho, options, num_steps, seeds, cond, batch):
    """Samples of the seeds (float64), the NFE and JVP passes per image, seconds per image."""
    out, rows, jvp_rows = [], 0, 0
    start = time.time()
    for lo in range(0, len(seeds), batch):
        part = seeds[lo:lo + batch]
        c = None if cond is None else cond[lo:lo + batch]
        extra = dict(noise=ImageNoise(part)) if solvers.SOLVERS[solver].stochastic else {}
        with torch.no_grad(), solvers.count_calls(net) as counter:
            out.append(solvers.sample(net, latents_for(net, part), solver, num_steps, 'polynomial', rho,
                                      cond=c, **options, **extra).to(torch.float64))
        rows += counter.rows
        jvp_rows += counter.jvp_rows
    n = len(seeds)
    return torch.cat(out), rows / n, jvp_rows / n, (time.time() - start) / n


def exact_floor(net, stats, n, sets, labels=None):
    """Frechet distances (and classifier accuracies) of `sets` independent sets of n exact data samples."""
    fds, accs = [], []
    for k in range(sets):
        g = torch.Generator().manual_seed(1000 + k)
        if labels is None:
            x = net.sample_data(n, generator=g)
        else:
            x = torch.cat([net.sample_data(int((labels == c).sum()), generator=g, label=c)
                           for c in range(net.label_dim)])
            accs.append(accuracy(net, x, torch.sort(labels).values))
        fds.append(frechet(x, stats))
    return fds, accs


def accuracy(net, x, labels):
    with torch.no_grad():
        pred = net.class_log_posterior(x.to(torch.float64), 0.0).argmax(1)
    return float((pred == labels).double().mean())


def measure(model_name, n, nfes, batch, log):
    net = image_mixture() if model_name == 'gmm_image' else digit_mixture()
    stats = MixtureStats(net)
    seeds = list(range(n))
    labels = cond = None
    if net.label_dim:
        labels = torch.arange(n) % net.label_dim
        cond = torch.nn.functional.one_hot(labels, net.label_dim).float()
    floor = exact_floor(net, stats, n, 5, labels)
    results = []
    for label, solver, rho, options, steps_for in runs():
        points = [(nfe, steps_for(nfe)) for nfe in nfes]
        if solver == 'sed_ref':
            points.append((SEED_STEPS, SEED_STEPS))
        for target, num_steps in points:
            x, nfe, jvp, sec = sample_run(net, solver, rho, options, num_steps, seeds, cond, batch)
            row = dict(model=model_name, label=label, solver=solver, num_steps=num_steps, nfe=nfe, jvp=jvp,
                       sec=sec, fd=frechet(x, stats), acc=accuracy(net, x, labels) if labels is not None else None)
            results.append(row)
            log(f"{model_name} {label:28s} steps {num_steps:3d} NFE {nfe:5.1f} (JVP {jvp:4.1f}) "
                f"FD {row['fd']:.4f}" + (f" acc {row['acc']:.3f}" if row['acc'] is not None else '')
                + f" {sec * 1e3:.1f} ms/img")
    return results, floor


# -- the page ------------------------------------------------------------------------------------------------

def table(results, floor, model_name, key, fmt):
    rows = [r for r in results if r['model'] == model_name]
    labels = list(dict.fromkeys(r['label'] for r in rows))
    lines = ['| sampler | steps | NFE | of which JVP passes | ' + key + ' | ms / image |', '| --- | ---: | ---: | ---: | ---: | ---: |']
    for label in labels:
        for r in sorted((r for r in rows if r['label'] == label), key=lambda r: r['nfe']):
            lines.append(f"| {label} | {r['num_steps']} | {r['nfe']:g} | {r['jvp']:g} | {fmt(r[key])} | "
                         f"{r['sec'] * 1e3:.1f} |")
    values = floor[0] if key == 'fd' else floor[1]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    lines.append(f"| exact data samples ({len(values)} sets) | | | | {fmt(mean)} +- {fmt(std)} | |")
    return lines


def figure(results, floor, model_name, key, ylabel, path):
    from torch_utils.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [r for r in results if r['model'] == model_name]
    for i, label in enumerate(dict.fromkeys(r['label'] for r in rows)):
        pts = sorted(((r['nfe'], r[key]) for r in rows if r['label'] == label and
                      not (r['solver'] == 'sed_ref' and r['num_steps'] == SEED_STEPS)))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', ms=4, lw=1.4, color=f'C{i}', label=label)
        seed = [r for r in rows if r['label'] == label and r['solver'] == 'sed_ref' and r['num_steps'] == SEED_STEPS]
        if seed:
            ax.plot([seed[0]['nfe']], [seed[0][key]], marker='*', ms=13, color=f'C{i}', ls='',
                    label="seed's setting (sed_ref, 84 steps, rho 3, ddb)")
    values = floor[0] if key == 'fd' else floor[1]
    ax.axhspan(min(values), max(values), color='0.85', label='exact data samples (same count)')
    ax.set_xscale('log')
    if key == 'fd':
        ax.set_yscale('log')
        top = 100 * max(values)             # diverged runs are drawn at the top edge, as triangles
        ax.set_ylim(min(values) / 2, top)
        off = [r for r in rows if r[key] > top]
        if off:
            ax.plot([r['nfe'] for r in off], [top / 1.3] * len(off), marker='^', ms=9, ls='', color='black',
                    label='off the scale (diverged)')
        for line in ax.get_lines():
            xs, ys = line.get_data()
            line.set_data(xs, [min(y, top / 1.3) for y in ys])
    ax.set_xlabel('NFE per image (a JVP pass counted as one)')
    ax.set_ylabel(ylabel)
    ax.set_title(model_name)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    save_figure(fig, path)


def results_path(out):
    return os.path.join(os.path.dirname(os.path.abspath(out)), 'figures', 'stochastic_results.json')


def write(out, results, floors, n, nfes, command, seconds):
    figs = os.path.join(os.path.dirname(os.path.abspath(out)), 'figures')
    os.makedirs(figs, exist_ok=True)
    tmp = results_path(out) + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(dict(results=results, floors=floors, n=n, nfes=list(nfes), command=command, seconds=seconds), f,
                  indent=1)
    os.replace(tmp, results_path(out))
    block = [BEGIN, '', f'Generated by `{command}` ({seconds / 60:.1f} min; {n} samples per point, the same seeds '
             f'for every sampler; float32 sampling, statistics in float64).', '']
    for model_name, key, title, ylabel, fmt in [
            ('gmm_image', 'fd', 'gmm_image: Frechet distance to the exact data statistics', 'pixel Frechet distance',
             lambda v: f'{v:.4f}'),
            ('gmm_digits', 'fd', 'gmm_digits: Frechet distance to the exact data statistics',
             'pixel Frechet distance', lambda v: f'{v:.4f}'),
            ('gmm_digits', 'acc', 'gmm_digits: exact-classifier accuracy', 'exact-classifier accuracy',
             lambda v: f'{v:.3f}')]:
        if not any(r['model'] == model_name for r in results):
            continue
        name = f'stochastic_{model_name}_{key}.png'
        figure(results, floors[model_name], model_name, key, ylabel, os.path.join(figs, name))
        block += [f'### {title}', '', f'![{title}](figures/{name})', '']
        block += table(results, floors[model_name], model_name, key, fmt) + ['']
    block.append(END)
    text = open(out).read() if os.path.isfile(out) else '# Stochastic samplers\n\n' + BEGIN + '\n' + END + '\n'
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + '\n'.join(block) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip('\n') + '\n\n' + '\n'.join(block) + '\n'
    tmp = out + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, out)


@click.command()
@click.option('--out', default='docs/stochastic.md', show_default=True, help='Markdown page (generated part replaced)')
@click.option('--n', 'n', type=click.IntRange(min=16), default=None, help='Samples per point [default: 200; quick: 64]')
@click.option('--quick', type=bool, default=False, help='64 samples, NFE 10 and 40, and the seed\'s point (about 1 min)')
@click.option('--models', default='gmm_image,gmm_digits', show_default=True, help='Comma list of gmm_image, gmm_digits')
@click.option('--batch', type=click.IntRange(min=1), default=200, show_default=True, help='Images per call')
@click.option('--figures_only', type=bool, default=False, help='Rebuild the page and figures from the saved results')
def main(out, n, quick, models, batch, figures_only):
    if figures_only:
        path = results_path(out)
        if not os.path.isfile(path):
            raise click.UsageError(f"--figures_only: no saved results at {path}; run the bench first")
        with open(path) as f:
            saved = json.load(f)
        write(out, saved['results'], saved['floors'], saved['n'], saved['nfes'], saved['command'], saved['seconds'])
        print(f'wrote {out} from {path}')
        return
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n = n or (64 if quick else 200)
    nfes = (10, 40) if quick else NFES
    names = [m.strip() for m in models.split(',') if m.strip()]
    bad = [m for m in names if m not in ('gmm_image', 'gmm_digits')]
    if bad:
        raise click.UsageError(f"unknown model {bad[0]!r}; allowed: gmm_image, gmm_digits")
    start = time.time()
    results, floors = [], {}
    for name in names:
        r, floors[name] = measure(name, n, nfes, batch, lambda s: print(s, flush=True))
        results += r
    command = 'python bench/bench_stochastic.py' + (' --quick=True' if quick else '') + \
        (f' --n={n}' if n != (64 if quick else 200) else '') + f' --out={out}'
    write(out, results, floors, n, nfes, command, time.time() - start)
    print(f'wrote {out} ({(time.time() - start) / 60:.1f} min)')


if __name__ == '__main__':
    main()
