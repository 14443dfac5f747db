import pytest
import torch

from solvers.schedules import discrete_index, discrete_sigma, get_schedule

# Values computed independently in the reference notes (N = 6, sigma in [0.002, 80]).
REFERENCE = {
    ('polynomial', 7): [80, 24.408, 5.8389, 0.9654, 0.0851, 0.002],
    ('logsnr', 7): [80, 9.609, 1.1542, 0.1386, 0.0167, 0.002],
    ('time_uniform', 2): [80, 6.2923, 1.560, 0.556, 0.1503, 0.002],
}


@pytest.mark.parametrize('kind,rho', list(REFERENCE))
def test_reference_values(kind, rho):
    sigmas = get_schedule(6, 0.002, 80.0, kind, rho)
    assert sigmas.dtype == torch.float64
    expected = torch.tensor(REFERENCE[(kind, rho)], dtype=torch.float64)
    assert torch.allclose(sigmas, expected, rtol=4e-3)


class TableModel:
    # LDM's linear-beta table: beta_n = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2.
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        self.sigma_table = ((1 - abar) / abar).sqrt()


def test_discrete_rho1_is_uniform_in_index():
    net = TableModel()
    table = net.sigma_table
    sigmas = get_schedule(11, float(table[0]), float(table[-1]), 'discrete', 1.0, net=net)
    # Uniform in the index: 999, 899.1, ..., 0 -> at integer-aligned points these are table entries.
    idx = discrete_index(table, sigmas)
    assert torch.allclose(idx, torch.linspace(999, 0, 11, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(sigmas[[0, -1]], table[[-1, 0]])


def test_discrete_interpolation_roundtrip():
    table = TableModel().sigma_table
    idx = torch.tensor([0.0, 3.25, 500.5, 998.9], dtype=torch.float64)
    assert torch.allclose(discrete_index(table, discrete_sigma(table, idx)), idx, atol=1e-9)


def test_discrete_needs_table():
    with pytest.raises(ValueError, match='discrete'):
        get_schedule(5, 0.002, 80.0, 'discrete', 1.0, net=object())


def test_flowmatch_shift():
    class Flow:
        flow_shift = 3.0
    sig = get_schedule(8, 0.01, 100.0, 'flowmatch', net=Flow())
    t = sig / (1 + sig)
    unshifted = t / (3.0 - 2.0 * t)
    steps = unshifted[1:] - unshifted[:-1]
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)
    assert (sig[1:] < sig[:-1]).all()


@pytest.mark.parametrize('kind', ['polynomial', 'logsnr', 'time_uniform'])
def test_decreasing_endpoints(kind):
    s = get_schedule(20, 0.002, 80.0, kind, 7)
    assert (s[1:] < s[:-1]).all() and s[0] == 80.0 and s[-1] == 0.002


def test_unknown_schedule():
    with pytest.raises(ValueError, match='allowed'):
        get_schedule(5, 0.002, 80.0, 'cosine')
