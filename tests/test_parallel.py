"""Parallel-in-time Euler/DDIM: the fixed point is the sequential trajectory."""
import pytest
import torch

import solvers
from models.analytic import image_mixture
from solvers.parallel import parallel_sample


@pytest.fixture(scope='module')
def setup():
    net = image_mixture(size=8, num_components=4, rank=4).double()
    latents = torch.randn(3, *net.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return net, latents


@pytest.mark.parametrize('method', ['picard', 'taa'])
def test_tol_zero_reaches_the_sequential_output_to_float_precision(setup, method):
    net, latents = setup
    ref = solvers.sample(net, latents, solver='euler', num_steps=13)
    x, stats = parallel_sample(net, latents, solver='euler', num_steps=13, method=method, tol=0.0, max_steps=12)
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)
    assert stats['iterations'] <= 12


@pytest.mark.parametrize('method', ['picard', 'taa'])
def test_a_tolerance_stops_early_near_the_sequential_output(setup, method):
    net, latents = setup
    ref = solvers.sample(net, latents, solver='euler', num_steps=26)
    x, stats = parallel_sample(net, latents, solver='euler', num_steps=26, method=method, tol=1e-4)
    assert stats['iterations'] < 25
    assert (x - ref).pow(2).mean().sqrt() < 1e-2


@pytest.mark.parametrize('options, message', [
    (dict(window_size=40), 'window_size=40'), (dict(memory_size=0), 'memory_size=0'),
    (dict(solver='heun'), 'no parallel step form'), (dict(method='nope'), 'unknown parallel method')])
def test_bad_options_are_one_clear_error(setup, options, message):
    net, latents = setup
    with pytest.raises(ValueError, match=message):
        parallel_sample(net, latents, **dict(dict(solver='euler', num_steps=13), **options))
