"""The decoupled evaluation grid (LD3): every solver queries the network at eval_sigmas[i] where it would query
sigmas[i], the coefficients keep using sigmas; eval grid == grid gives the identical output."""
import pytest
import torch

import solvers
from solvers.noise import ImageNoise
from models.base import Denoiser
from solvers.learned import amed, epd


class Recorder(Denoiser):
    """Wraps a denoiser and records the noise level of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sample_shape = inner, inner.sample_shape
        self.seen = []

    def denoise(self, x, sigma, cond=None):
        self.seen.append(sigma.detach().clone())
        return self.inner.denoise(x, sigma, cond)


def decoupled(sigmas, rate=0.3):
    """Interior points moved alternately up and down by `rate` of the smallest log gap (the ends stay)."""
    logs = sigmas.log()
    gap = (logs[:-1] - logs[1:]).min()
    sign = torch.tensor([(-1) ** i for i in range(len(sigmas))], dtype=sigmas.dtype)
    sign[0] = sign[-1] = 0
    return (logs + rate * gap * sign).exp()


@pytest.mark.parametrize('name', sorted(solvers.SOLVERS))
@pytest.mark.parametrize('afs,denoise_to_zero', [(False, False), (True, True)])
def test_eval_grid_equal_to_grid_is_identical(gmm_image, name, afs, denoise_to_zero):
    z = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = solvers.get_schedule(6, 0.002, 80.0, 'polynomial', 7.0)
    extra = dict(noise=ImageNoise(range(2))) if solvers.SOLVERS[name].stochastic else {}
    if extra:   # a decoupled grid is an ODE-solver mechanism: refused for the SDE samplers, not ignored
        with pytest.raises(ValueError, match='eval_sigmas apply to the ODE solvers only'):
            solvers.sample(gmm_image, z, name, sigmas=sigmas, eval_sigmas=sigmas.clone(), **extra)
        return
    ref = solvers.sample(gmm_image, z, name, sigmas=sigmas, afs=afs, denoise_to_zero=denoise_to_zero, **extra)
    out = solvers.sample(gmm_image, z, name, sigmas=sigmas, eval_sigmas=sigmas.clone(), afs=afs,
                         denoise_to_zero=denoise_to_zero, **extra)
    assert torch.equal(out, ref)
    moved = solvers.sample(gmm_image, z, name, sigmas=sigmas, eval_sigmas=decoupled(sigmas), afs=afs,
                           denoise_to_zero=denoise_to_zero, **extra)
    assert not torch.allclose(moved, ref, atol=1e-6)


@pytest.mark.parametrize('name', ['euler', 'ipndm', 'dpmpp', 'unipc', 'deis', 'heun'])
def test_network_sees_only_the_eval_grid(gmm_image, name):
    sigmas = solvers.get_schedule(6, 0.002, 80.0, 'logsnr')
    evals = decoupled(sigmas)
    net = Recorder(gmm_image)
    solvers.sample(net, torch.randn(2, 3, 32, 32, dtype=torch.float64), name, sigmas=sigmas, eval_sigmas=evals)
    seen = torch.stack([s[0] for s in net.seen])
    # Every query is one of the eval grid's points (the grid's own interior points are never queried).
    assert all(bool((s == evals).any()) for s in seen)
    assert not any(bool((s == sigmas[1:-1]).any()) for s in seen)


def test_euler_with_eval_grid_is_the_closed_form(gmm_image):
    # x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - D(x_i; e_i)) / s_i, written out independently.
    z = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    sigmas = solvers.get_schedule(5, 0.002, 80.0, 'polynomial', 7.0)
    evals = decoupled(sigmas)
    x = z * 80.0
    for i in range(4):
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - gmm_image(x, evals[i])) / sigmas[i]
    out = solvers.sample(gmm_image, z, 'euler', sigmas=sigmas, eval_sigmas=evals)
    assert torch.allclose(out, x, rtol=0, atol=1e-12)


def test_learned_solvers_take_the_eval_grid(gmm_image):
    z = torch.randn(2, 3, 32, 32, dtype=torch.float64) * 80
    sigmas = solvers.get_schedule(4, 0.002, 80.0)
    table = lambda n: tuple(torch.tensor(v, dtype=torch.float64) for v in ([0.4, 0.6], [1, 1], [1, 1], [.5, .5]))
    params = lambda f, t_cur, t_next: tuple(torch.full((f.shape[0],), v, dtype=torch.float64) for v in (.5, 1, 1))
    for run in (lambda **kw: epd(gmm_image, z, sigmas, table=table, **kw),
                lambda **kw: amed(gmm_image, z, sigmas, params=params, base='dpmpp', **kw)):
        ref = run()
        assert torch.equal(run(eval_sigmas=sigmas.clone()), ref)
        assert not torch.allclose(run(eval_sigmas=decoupled(sigmas)), ref, atol=1e-6)


def test_eval_grid_bad_input(gmm_image):
    z = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    sigmas = solvers.get_schedule(5, 0.002, 80.0)
    with pytest.raises(ValueError, match="eval_sigmas must have the grid's shape"):
        solvers.sample(gmm_image, z, 'euler', sigmas=sigmas, eval_sigmas=sigmas[:-1])
    with pytest.raises(ValueError, match='finite and positive'):
        solvers.sample(gmm_image, z, 'euler', sigmas=sigmas, eval_sigmas=-sigmas)
    with pytest.raises(ValueError, match='needs the grid'):
        solvers.sample(gmm_image, z, 'euler', num_steps=5, eval_sigmas=sigmas)
    # A grid ending at 0: the eval grid's matching entry goes unused (the final step is the last denoise call).
    with_zero = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)])
    ref = solvers.sample(gmm_image, z, 'dpmpp', sigmas=with_zero)
    assert torch.equal(solvers.sample(gmm_image, z, 'dpmpp', sigmas=with_zero, eval_sigmas=with_zero.clone()), ref)
