"""Grids ending at sigma = 0 and the bridges to other calling conventions, checked against exact answers."""
import pytest
import torch

import solvers


def latents(net, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *net.sample_shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize('name', sorted(n for n in solvers.SOLVERS if n in (
    'euler', 'heun', 'dpm', 'dpmpp', 'unipc', 'deis', 'ipndm', 'ipndm_v')))
def test_grid_ending_at_zero(gmm_2d, name):
    z = latents(gmm_2d)
    sigmas = solvers.get_schedule(33, 0.002, 80.0).double()
    zero_ended = torch.cat([sigmas, sigmas.new_zeros(1)])
    out = solvers.sample(gmm_2d, z, name, sigmas=zero_ended, lower_order_final=False)
    assert torch.isfinite(out).all()
    # A final Euler step from s to 0 is x + (0 - s) (x - D) / s = D(x; s): the state at sigmas[-1], denoised.
    before = solvers.sample(gmm_2d, z, name, sigmas=sigmas, lower_order_final=False)
    torch.testing.assert_close(out, gmm_2d(before, sigmas[-1]), rtol=0, atol=1e-12)
    # ... and it lands near the exact ODE solution at sigma = 0 (the exact flow of x at sigma_min, denoised).
    x_end = solvers.solve_exact(gmm_2d, z * sigmas[0], sigmas[0], sigmas[-1])
    assert (out - gmm_2d(x_end, sigmas[-1])).abs().max() < (0.2 if name == 'euler' else 0.03)


@pytest.mark.parametrize('grid', [[80.0, 10.0, 10.0, 0.002], [80.0, 1.0, 5.0, 0.002], [80.0, 1.0, -0.1],
                                  [80.0, 0.0, 0.0], [80.0, 0.0], [80.0, float('nan'), 0.1]])
def test_bad_grid_refused(gmm_2d, grid):
    with pytest.raises(ValueError, match='sigma'):
        solvers.sample(gmm_2d, latents(gmm_2d, 2), 'heun', sigmas=torch.tensor(grid, dtype=torch.float64))
