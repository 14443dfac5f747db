"""PNG figures with matplotlib's Agg backend (no display needed), each written atomically."""
import io
import json

from torch_utils.image_io import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (set before pyplot is first imported, harmless after)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    """Write `fig` as a PNG to `path` (temp name, then rename) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=dpi, bbox_inches='tight', metadata={'Software': None})
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


def read_stats(stats_path):
    """The records of a training run's stats.jsonl, one per iteration: a record written again for the same
    iteration (a resumed run repeats the iterations after its last snapshot) replaces the earlier one."""
    records = {}
    with open(stats_path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                records[int(record['iteration'])] = record
    return [records[k] for k in sorted(records)]


def loss_curve(stats_path, png_path, title=None):
    """The training loss against kimg (log scale), with its per-step parts when it has them, from stats.jsonl."""
    records = read_stats(stats_path)
    if not records:
        raise ValueError(f"{stats_path} holds no training records; nothing to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    kimg = [r['kimg'] for r in records]
    steps = len(records[0].get('step_losses') or [])
    for n in range(steps):
        values = [r['step_losses'][n] for r in records]
        if max(values) > 0 and steps > 1:       # a loss on the final state only has no per-step parts
            ax.plot(kimg, [v if v > 0 else float('nan') for v in values], lw=0.8, alpha=0.6, label=f'step {n + 1}')
    ax.plot(kimg, [r['loss'] for r in records], color='black', lw=1.6, label='total')
    ax.set_yscale('log')
    ax.set_xlabel('kimg (thousands of training samples)')
    ax.set_ylabel('loss')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, png_path)
