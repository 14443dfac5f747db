"""Figures of the benchmark pages (PNG, matplotlib Agg) and the markdown that shows them.

Each bench script computes its numbers, then calls these functions; with --figures_only it reads the numbers back
from the tables of its own page instead of measuring them again.
"""
import math
import os
import re

import torch

from torch_utils.plots import pyplot, save_figure

FIGURES_DIR = 'figures'          # next to the markdown pages
FIGURES_HEADING = '## Figures'
COLOURS = {'euler': '#1f77b4', 'heun': '#ff7f0e', 'dpm': '#2ca02c', 'dpmpp': '#d62728', 'unipc': '#9467bd',
           'deis': '#8c564b', 'ipndm': '#e377c2', 'ipndm_v': '#7f7f7f'}


def figure_path(page, name):
    """docs/figures/<name> for the page docs/<page>.md."""
    return os.path.join(os.path.dirname(os.path.abspath(page)), FIGURES_DIR, name)


# -- reading a page's tables back ----------------------------------------------------------------------------

def _number(cell):
    cell = cell.strip().strip('*')
    try:
        return float(cell)
    except ValueError:
        return float('nan')


def read_tables(page):
    """{section heading: (column headers, {row label: [values]})} for every markdown table on the page."""
    tables, heading, header = {}, None, None
    with open(page) as f:
        for line in f:
            line = line.rstrip('\n')
            if line.startswith('## ') or line.startswith('# '):
                heading, header = line.lstrip('#').strip(), None
            elif line.startswith('|') and heading is not None:
                cells = [c.strip() for c in line.strip().strip('|').split('|')]
                if header is None:
                    header = cells
                    tables.setdefault(heading, (cells[1:], {}))
                elif not set(''.join(cells)) <= set('-: '):
                    tables[heading][1][cells[0]] = [_number(c) for c in cells[1:]]
            else:
                header = None if not line.startswith('|') else header
    return tables


def nfe_columns(headers):
    return [int(re.sub(r'\D', '', h)) for h in headers]


def replace_figures_section(text, section, before_heading=None):
    """The page with its figures section replaced by `section` (lines), or inserted before the heading
    `before_heading` (or at the end, before any hand-written notes) when it has none."""
    lines = text.split('\n')
    block = list(section)
    if FIGURES_HEADING in lines:
        start = lines.index(FIGURES_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ') or
                    lines[i].startswith('<!--')), len(lines))
        return '\n'.join(lines[:start] + block + lines[end:])
    at = next((i for i, line in enumerate(lines) if before_heading and line.startswith(before_heading)), None)
    if at is None:
        at = next((i for i, line in enumerate(lines) if line.startswith('<!--')), len(lines))
    return '\n'.join(lines[:at] + block + lines[at:])


def write_page(path, text):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


# -- error against NFE ---------------------------------------------------------------------------------------

def _error_axes(ax, nfes, title):
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel('NFE')
    ax.set_title(title, fontsize=9)
    ax.grid(True, which='major', alpha=0.3)


def error_vs_nfe(panels, nfes, path):
    """One log-log panel per schedule: every solver's RMSE to the exact solution against NFE.
    panels: {title: {solver: [rmse per NFE]}}."""
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.4), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items()):
        for name, values in rows.items():
            ax.plot(nfes, values, marker='o', ms=3, lw=1.2, color=COLOURS.get(name), label=name)
        _error_axes(ax, nfes, title)
    axes[0][0].set_ylabel('RMSE per pixel vs exact solution')
    axes[0][-1].legend(fontsize=7, loc='upper right')
    save_figure(fig, path)


def learned_vs_classical(rows, nfes, learned, path):
    """Learned solvers (thick) against each classical solver at its best schedule per NFE (thin), log-log.
    rows: {label: [rmse per NFE]} with classical labels 'name (schedule)'."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    classical = {}
    for label, values in rows.items():
        if label in learned:
            continue
        name = label.split(' ')[0]
        best = classical.setdefault(name, [math.inf] * len(nfes))
        classical[name] = [min(a, b) for a, b in zip(best, values)]
    for name, values in classical.items():
        ax.plot(nfes, values, lw=0.9, ls='--', color=COLOURS.get(name), alpha=0.8, label=f'{name} (best schedule)')
    envelope = [min(v[i] for v in classical.values()) for i in range(len(nfes))]
    ax.plot(nfes, envelope, lw=0, marker='_', ms=14, mew=2, color='black', label='best classical')
    for i, label in enumerate(learned):
        if label in rows:
            ax.plot(nfes, rows[label], lw=2.2, marker='o', ms=4, color=f'C{i}', label=label)
    _error_axes(ax, nfes, 'learned vs classical solvers (gmm_image, 1024 held-out samples)')
    ax.set_ylabel('mean RMSE per pixel vs exact solution')
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# -- 2-D trajectories ----------------------------------------------------------------------------------------

def trajectories_2d(path, names, settings_for_nfe, nfe=6, num_paths=10, seed=0):
    """Every solver's states at NFE `nfe` (polynomial rho = 7) on gmm_2d from the same latents, over the exact ODE
    path (DOP853, dense) and the data density. Returns {solver: RMSE of the end points to the exact ones}."""
    import solvers
    from models.analytic import planar_mixture
    net = planar_mixture()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_paths, *net.sample_shape, generator=g, dtype=torch.float64)
    dense = torch.exp(torch.linspace(math.log(net.sigma_max), math.log(net.sigma_min), 400, dtype=torch.float64))
    exact = solvers.solve_exact(net, z * net.sigma_max, net.sigma_max, net.sigma_min, at_sigmas=dense)
    exact = exact.reshape(len(dense), num_paths, 2)
    lim = 3.6
    grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing='xy')
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).reshape(-1, 2, 1, 1)
    density = net.log_density(points, 0.0).reshape(200, 200).exp()
    plt = pyplot()
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(3.0 * cols, 3.0 * math.ceil(
        len(names) / cols)), squeeze=False)
    errors = {}
    for ax, name in zip(axes.flat, names):
        opts = settings_for_nfe(name, nfe)
        with torch.no_grad():
            out, states = solvers.sample(net, z, name, return_trajectory=True, **opts)
        states = states.reshape(len(states), num_paths, 2)
        errors[name] = float((out.reshape(num_paths, 2) - exact[-1]).pow(2).mean().sqrt())
        ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=12, cmap='Greys', alpha=0.5)
        for j in range(num_paths):
            ax.plot(exact[:, j, 0], exact[:, j, 1], color='black', lw=0.9)
            ax.plot(states[:, j, 0], states[:, j, 1], color=COLOURS.get(name, 'C0'), lw=1.0, marker='o', ms=2.5)
            ax.plot(exact[-1, j, 0], exact[-1, j, 1], marker='x', color='black', ms=5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect('equal')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f'{name}: end RMSE {errors[name]:.3f}', fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis('off')
    fig.suptitle(f'gmm_2d, NFE {nfe}, polynomial rho = 7: solver states (colour) over the exact ODE paths (black, '
                 'x = exact end)', fontsize=9)
    save_figure(fig, path)
    return errors


# -- learned EPD tables --------------------------------------------------------------------------------------

def epd_tables(predictors, path):
    """Per step of each EPD predictor: the K points' positions r (fraction of the step in log sigma, marker area
    proportional to the weight), weights w, direction scales c and time scales a. predictors: {nfe: predictor}."""
    plt = pyplot()
    cols = len(predictors)
    fig, axes = plt.subplots(3, cols, figsize=(3.2 * cols, 7.2), squeeze=False, sharey='row')
    for col, (nfe, pred) in enumerate(sorted(predictors.items())):
        steps = pred.settings['num_steps'] - 1
        with torch.no_grad():
            tables = [tuple(v.double() for v in pred.table(n)) for n in range(steps)]
        K = len(tables[0][0])
        for k in range(K):
            xs = [n + 1 + (k - (K - 1) / 2) * 0.12 for n in range(steps)]
            r = [float(t[0][k]) for t in tables]
            w = [float(t[3][k]) for t in tables]
            c = [float(t[1][k]) for t in tables]
            a = [float(t[2][k]) for t in tables]
            axes[0][col].scatter(xs, r, s=[20 + 300 * v for v in w], color=f'C{k}', alpha=0.8, label=f'point {k + 1}')
            axes[1][col].bar(xs, w, width=0.12, color=f'C{k}')
            axes[2][col].plot(xs, c, marker='o', ls='', color=f'C{k}', ms=5)
            axes[2][col].plot(xs, a, marker='^', ls='', color=f'C{k}', ms=5, mfc='none')
        axes[0][col].set_title(f'EPD, NFE {nfe} ({steps} steps, K = {K})', fontsize=9)
        for row in range(3):
            axes[row][col].set_xticks(range(1, steps + 1))
            axes[row][col].grid(True, alpha=0.3)
        axes[2][col].set_xlabel('step')
        axes[2][col].axhline(1.0, color='black', lw=0.6)
    axes[0][0].set_ylabel('position r in the step\n(0: start, 1: end; area = weight)')
    axes[1][0].set_ylabel('weight w')
    axes[2][0].set_ylabel('scales: c (filled), a (open)')
    axes[0][0].set_ylim(0, 1)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)
