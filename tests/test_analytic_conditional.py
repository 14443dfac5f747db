"""The class-conditional mixture (gmm_digits): conditional and unconditional denoisers, the class posterior,
classifier-free and classifier guidance, against brute-force formulas with full covariance matrices."""
import math

import pytest
import torch

from models import ModelError
from models.analytic import digit_mixture, load


@pytest.fixture(scope='module')
def small():
    return digit_mixture(components_per_class=2, rank=3, size=8)


def full_covariances(net):
    K, d, r = net.bases.shape
    eye = torch.eye(d, dtype=torch.float64)
    return torch.stack([(net.bases[k] * net.eigvals[k]) @ net.bases[k].T + net.iso_vars[k] * eye for k in range(K)])


def brute_force(net, x, sigma, label=None):
    """log p(x_sigma | k) + log prior, and the posterior mean, with dense [d, d] matrices."""
    flat = x.reshape(x.shape[0], -1)
    covs = full_covariances(net)
    d = flat.shape[1]
    weights = net.log_weights.exp()
    if label is not None:
        weights = weights * (net.labels == label)
    logj, means = [], []
    for k in range(len(covs)):
        total = covs[k] + sigma ** 2 * torch.eye(d, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(net.means[k], covariance_matrix=total)
        logj.append(dist.log_prob(flat) + torch.log(weights[k]))
        means.append(net.means[k] + (flat - net.means[k]) @ torch.linalg.solve(total, covs[k]))   # symmetric
    logj = torch.stack(logj, 1)
    resp = torch.softmax(logj, 1)
    return logj, (resp[..., None] * torch.stack(means, 1)).sum(1).reshape(x.shape)


def noisy(net, n, sigma, seed, label=None):
    g = torch.Generator().manual_seed(seed)
    return net.sample_data(n, g, label=label) + sigma * torch.randn(n, *net.sample_shape, generator=g,
                                                                   dtype=torch.float64)


def onehot(net, labels):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), net.label_dim).double()


@pytest.mark.parametrize('sigma', [0.01, 0.3, 2.0, 30.0])
def test_conditional_and_unconditional_denoisers(small, sigma):
    x = noisy(small, 4, sigma, 0, label=3)
    _, d_u = brute_force(small, x, sigma)
    assert torch.allclose(small(x, sigma), d_u, rtol=0, atol=1e-9)
    for label in (3, 7):
        _, d_c = brute_force(small, x, sigma, label)
        assert torch.allclose(small(x, sigma, onehot(small, [label] * 4)), d_c, rtol=0, atol=1e-9)


@pytest.mark.parametrize('sigma', [0.05, 1.0, 10.0])
def test_class_posterior(small, sigma):
    x = noisy(small, 5, sigma, 1, label=5)
    logj, _ = brute_force(small, x, sigma)
    per_class = torch.stack([torch.logsumexp(logj[:, small.labels == y], 1) for y in range(10)], 1)
    expected = per_class - torch.logsumexp(per_class, 1, keepdim=True)
    assert torch.allclose(small.class_log_posterior(x, sigma), expected, atol=1e-9)
    assert torch.allclose(small.class_log_posterior(x, sigma).exp().sum(1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize('sigma', [0.05, 1.0, 10.0])
def test_score_identity_by_finite_differences(small, sigma):
    # D = x + sigma^2 grad log p_sigma(x | y), the gradient's projection on a random direction from central
    # differences of the exact log-density (no autograd).
    x = noisy(small, 3, sigma, 2, label=1)
    cond = onehot(small, [1, 1, 4])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-4 * sigma
    fd = (small.log_density(x + h * v, sigma, cond) - small.log_density(x - h * v, sigma, cond)) / (2 * h)
    projected = ((small(x, sigma, cond) - x) / sigma ** 2 * v).flatten(1).sum(1)
    assert torch.allclose(fd, projected, rtol=1e-5, atol=1e-6 / sigma)


def test_cfg(small):
    sigma = 1.5
    x = noisy(small, 4, sigma, 4)
    cond = onehot(small, [0, 2, 2, 9])
    d_c, d_u = small(x, sigma, cond), small(x, sigma)
    for w in (0.0, 1.0, 2.5):
        guided = digit_mixture(components_per_class=2, rank=3, size=8, guidance_type='cfg', guidance_rate=w)
        assert torch.allclose(guided(x, sigma, cond), d_u + w * (d_c - d_u), atol=1e-12)
    assert torch.equal(digit_mixture(components_per_class=2, rank=3, size=8, guidance_type='cfg',
                                     guidance_rate=1.0)(x, sigma, cond), d_c)
    # One batched evaluation of the mixture per guided call, as for real models.
    calls = []
    original = guided._loglik
    guided._loglik = lambda flat, s: calls.append(flat.shape[0]) or original(flat, s)
    guided(x, sigma, cond)
    assert calls == [8]


def test_classifier_guidance(small):
    sigma, w = 0.8, 3.0
    x = noisy(small, 3, sigma, 5)
    cond = onehot(small, [6, 8, 8])
    guided = digit_mixture(components_per_class=2, rank=3, size=8, guidance_type='cg', guidance_rate=w)
    # grad log p(y | x) by central differences of the exact posterior, coordinate by coordinate on a few pixels,
    # and as a whole through the identity grad log p(y | x) = (D_c - D_u) / sigma^2 of exact denoisers.
    d_c, d_u = small(x, sigma, cond), small(x, sigma)
    expected = d_c + w * (d_c - d_u)
    assert torch.allclose(guided(x, sigma, cond), expected, atol=1e-9)
    grad = guided.class_log_posterior_grad(x, sigma, cond)
    h = 1e-5
    for idx in [(0, 0, 3, 3), (1, 2, 5, 1), (2, 1, 0, 7)]:
        e = torch.zeros_like(x)
        e[idx] = h
        lp = lambda z: (small.class_log_posterior(z, sigma) * cond).sum(1)[idx[0]]
        assert abs((lp(x + e) - lp(x - e)) / (2 * h) - grad[idx]) < 1e-5


def test_statistics_per_class(small):
    prior = small.class_prior()
    assert torch.allclose(prior, torch.full((10,), 0.1, dtype=torch.float64))
    mix_mean = sum(prior[y] * small.data_mean(y) for y in range(10))
    assert torch.allclose(mix_mean, small.data_mean())
    # Law of total covariance over classes.
    within = sum(prior[y] * small.data_covariance(y) for y in range(10))
    between = sum(prior[y] * torch.outer(small.data_mean(y) - mix_mean, small.data_mean(y) - mix_mean)
                  for y in range(10))
    assert torch.allclose(within + between, small.data_covariance(), atol=1e-12)
    n = 20000
    samples = small.sample_data(n, torch.Generator().manual_seed(6), label=4).reshape(n, -1)
    se = (small.data_covariance(4).diagonal() / n).sqrt()
    assert ((samples.mean(0) - small.data_mean(4)).abs() / se).max() < 5.5
    # Every exact sample of class 4 is classified as 4 by the exact posterior at low noise.
    assert (small.class_log_posterior(samples[:200].reshape(200, *small.sample_shape), 0.01).argmax(1) == 4).all()


def test_labels_drawn_per_seed(small):
    draw = lambda seed: small.sample_labels(torch.Generator().manual_seed(seed), 'cpu')
    assert torch.equal(draw(11), draw(11))
    labels = torch.stack([draw(s) for s in range(400)]).argmax(1)
    assert len(set(labels.tolist())) == 10


def test_full_size_digits_are_images():
    net = digit_mixture()
    assert net.sample_shape == (3, 32, 32) and net.label_dim == 10 and len(net.means) == 40
    assert net.means.abs().max() <= 1.0
    # At sigma_max the class is undecided; at the end of an exact trajectory it is decided.
    x = noisy(net, 8, 80.0, 7)
    post = net.class_log_posterior(x, 80.0).exp()
    assert (post.max(1).values < 0.2).all()


def test_loader_options():
    with pytest.raises(ModelError, match='unconditional'):
        load('gmm_image', guidance_type='cfg', guidance_rate=2.0)
    with pytest.raises(ModelError, match='sigma_mni'):
        load('gmm_digits', sigma_mni=0.1)
    with pytest.raises(ModelError, match='not supported'):
        load('gmm_digits', guidance_type='foo')
    assert load('gmm_image', guidance_type=None).label_dim == 0
    assert math.isclose(load('gmm_digits', guidance_type='cfg', guidance_rate=2.0).guidance_rate, 2.0)
