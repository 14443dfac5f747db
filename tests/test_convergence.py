"""Every solver's error against the exact ODE solution of the image-shaped mixture falls at its theoretical order.

Multistep methods start with lower-order steps; one first-order step of size h leaves an O(h^2) error, which
would cap any method at global order 2 on a uniform grid. As in standard convergence studies of multistep
methods, the test grid makes the warm-up steps O(h^2) long, so that the measured slope is the method's own.
The final steps' order lowering (lower_order_final) is turned off here. Orders are measured between 80 and 160 steps in float64 on sigma in [0.1, 20] (log-uniform grid).
"""
import math

import pytest
import torch

from solvers import SOLVERS, solve_exact

SIGMA_MIN, SIGMA_MAX = 0.1, 20.0
STEPS = (80, 160)

# (solver, options, expected order, number of warm-up steps)
CASES = [
    ('euler', {}, 1, 0), ('heun', {}, 2, 0), ('dpm', {}, 2, 0), ('dpm', dict(r=0.3), 2, 0),
    ('dpmpp', dict(max_order=1), 1, 0), ('dpmpp', dict(max_order=2), 2, 1),
    # 3M: the 2 phi_3 weight is third order; the peers' phi_3 (the default) adds half the curvature term: order 2.
    ('dpmpp', dict(max_order=3, variant='2phi3'), 3, 2), ('dpmpp', dict(max_order=3, predict_x0=False, variant='2phi3'), 3, 2),
    ('dpmpp', dict(max_order=3, variant='phi3'), 2, 2), ('dpmpp', dict(max_order=3, predict_x0=False, variant='phi3'), 2, 2),
    ('deis', dict(max_order=2), 2, 1), ('deis', dict(max_order=3), 3, 2), ('deis', dict(max_order=4), 4, 3),
    ('ipndm_v', dict(max_order=2), 2, 1), ('ipndm_v', dict(max_order=3), 3, 2), ('ipndm_v', dict(max_order=4), 4, 3),
    # UniPC-p with its corrector UniC is of order p + 1.
    ('unipc', dict(max_order=1), 2, 0), ('unipc', dict(max_order=2), 3, 1), ('unipc', dict(max_order=3), 4, 2),
    ('unipc', dict(max_order=2, variant='bh1'), 3, 1), ('unipc', dict(max_order=2, predict_x0=False), 3, 1),
    # iPNDM's fixed (equal-step) weights after a lower-order warm start make it second order on any grid; its
    # higher-order weights are the Adams-Bashforth ones (test_ipndm_weights_are_adams_bashforth).
    ('ipndm', dict(max_order=3), 2, 0), ('ipndm', dict(max_order=4), 2, 0),
]


def graded_grid(n, warm):
    """n equal steps in log sigma after `warm` warm-up steps of length h^2."""
    span = math.log(SIGMA_MAX / SIGMA_MIN)
    h = span / n
    lam = [j * h ** 2 for j in range(warm + 1)]
    lam += torch.linspace(lam[-1], span, n + 1, dtype=torch.float64)[1:].tolist()
    return SIGMA_MAX * torch.exp(-torch.tensor(lam, dtype=torch.float64))


@pytest.fixture(scope='module')
def problem(gmm_image):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) * SIGMA_MAX
    exact = solve_exact(gmm_image, x, SIGMA_MAX, SIGMA_MIN, rtol=1e-13, atol=1e-13)
    return x, exact


@pytest.mark.slow
@pytest.mark.parametrize('name,options,order,warm', CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}" for c in CASES])
def test_convergence_order(gmm_image, problem, name, options, order, warm):
    x, exact = problem
    errors = []
    for n in (STEPS if name != 'ipndm' else (160, 320)):    # iPNDM's asymptotic range starts later
        sigmas = graded_grid(n, warm)
        out = SOLVERS[name].fn(gmm_image, x, sigmas, **dict(dict(lower_order_final=False), **options))
        errors.append((out - exact).norm().item() / math.sqrt(out.numel()))
    slope = math.log2(errors[0] / errors[1])
    assert order - 0.3 < slope < order + 1.0, f'{name} {options}: errors {errors}, measured order {slope:.2f}'


@pytest.mark.parametrize('order', [1, 2, 3, 4])
def test_ipndm_weights_are_adams_bashforth(order):
    # On equal steps the variable-step weights reduce to iPNDM's fixed Adams-Bashforth weights.
    from solvers.classical import IPNDM_COEFFS, ipndm_v_weights
    nodes = [torch.tensor(10.0 - j, dtype=torch.float64) for j in range(order)]
    weights = ipndm_v_weights(nodes, torch.tensor(11.0, dtype=torch.float64))
    assert torch.allclose(torch.stack(weights), torch.tensor(IPNDM_COEFFS[order], dtype=torch.float64))
