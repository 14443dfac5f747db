"""bench/bench_stochastic.py: its Frechet distance against a dense computation, and its quick mode end to end."""
import numpy as np
import pytest
import scipy.linalg
import torch

from bench.bench_stochastic import MixtureStats, frechet
from models.analytic import image_mixture
from tests.conftest import run_cli


def test_frechet_distance_matches_the_dense_formula():
    model = image_mixture(num_components=3, rank=4, size=4)
    stats = MixtureStats(model)
    S, mu = model.data_covariance(), model.data_mean()
    assert stats.trace == pytest.approx(float(torch.trace(S)), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, 4, 4, generator=g, dtype=torch.float64) * 0.7 + 0.1
    X = x.reshape(30, -1)
    C = torch.cov(X.T).numpy()
    root = scipy.linalg.sqrtm(C)
    dense = float(((X.mean(0) - mu) ** 2).sum()) + np.trace(C) + float(torch.trace(S)) \
        - 2 * np.trace(scipy.linalg.sqrtm(root @ S.numpy() @ root)).real
    assert frechet(x, stats) == pytest.approx(dense, rel=1e-6)
    # exact samples come close to the exact statistics, far closer than a shifted copy
    data = model.sample_data(400, generator=g)
    assert frechet(data, stats) < 0.1 * frechet(data + 0.5, stats)


@pytest.mark.slow
def test_quick_mode_writes_the_page(tmp_path):
    out = tmp_path / 'stochastic.md'
    out.write_text('# Stochastic samplers\n\nhand-written\n\n<!-- bench_stochastic: begin -->\nold\n'
                   '<!-- bench_stochastic: end -->\n\nverdict kept\n')
    run_cli(['bench/bench_stochastic.py', '--quick=True', '--n=16', '--models=gmm_image', f'--out={out}'],
            timeout=900)
    text = out.read_text()
    assert 'hand-written' in text and 'verdict kept' in text and '\nold\n' not in text
    assert '| ipndm (ODE) | 11 | 10 |' in text and 'exact data samples' in text
    assert (tmp_path / 'figures' / 'stochastic_gmm_image_fd.png').is_file()
