"""Exact rewards of the analytic class-conditional mixture (models/analytic.py): they let the RL stage be checked
against ground truth.

ClassPosterior: p(y | x) of the requested class y, exactly (at sigma = 0 by default; a positive `sigma` gives the
posterior of the sigma-noised mixture, a smoother reward). LogDensity: log p(x | y) (or log p(x) without labels),
per dimension by default (a 3x32x32 image's log-density is ~1e4 nats).
"""
import torch

from scorers import ScorerError


def label_indices(labels, batch, num_classes):
    """Class labels as ints [B] from ints, a tensor of ints, or one-hot/weight rows [B, L]."""
    if labels is None:
        raise ScorerError("this scorer needs the class label of each image")
    labels = torch.as_tensor(labels)
    if labels.ndim == 2:
        labels = labels.argmax(1)
    labels = labels.reshape(-1).long()
    if labels.shape[0] != batch:
        raise ScorerError(f"{batch} images but {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ScorerError(f"class labels must lie in 0..{num_classes - 1}")
    return labels


class AnalyticScorer(torch.nn.Module):
    def __init__(self, net=None, option_prefix='reward', **_):
        super().__init__()
        if net is None or not hasattr(net, 'class_log_posterior'):
            raise ScorerError(f"the {self.name} reward needs a class-conditional analytic model (gmm_digits); "
                              "use another reward for this model")
        self.net = net

    def normalise(self, scores):
        return scores


class ClassPosterior(AnalyticScorer):
    name = 'class_posterior'

    def __init__(self, net=None, sigma=0.0, **kw):
        super().__init__(net, **kw)
        self.sigma = float(sigma)

    @torch.no_grad()
    def forward(self, images, targets=None):
        labels = label_indices(targets, images.shape[0], self.net.label_dim).to(images.device)
        logp = self.net.class_log_posterior(images.to(torch.float64), self.sigma)      # [B, L]
        return logp.gather(1, labels[:, None])[:, 0].exp()


class LogDensity(AnalyticScorer):
    name = 'log_density'

    def __init__(self, net=None, per_dim=True, **kw):
        super().__init__(net, **kw)
        self.per_dim = bool(per_dim)

    @torch.no_grad()
    def forward(self, images, targets=None):
        cond = None
        if targets is not None:
            labels = label_indices(targets, images.shape[0], self.net.label_dim).to(images.device)
            cond = torch.nn.functional.one_hot(labels, self.net.label_dim).to(torch.float64)
        logp = self.net.log_density(images.to(torch.float64), 0.0, cond)
        return logp / images[0].numel() if self.per_dim else logp


class NegError(torch.nn.Module):
    """-RMSE per pixel between each image and the exact ODE solution (solvers/exact.py) from the same noise and
    condition over the same sigma range: distillation's own target as a reward, the check that RL against it
    does not end worse than distillation. It needs the start of each image, so only a sampler can call it:
    start = dict(noise=x at sigmas[0], sigmas=the sampler's grid, cond=the denoiser's condition)."""
    name = 'neg_error'
    needs_start = True

    def __init__(self, net=None, rtol=1e-5, atol=1e-5, option_prefix='reward', **_):
        super().__init__()
        if net is None:
            raise ScorerError("the neg_error reward needs the model whose exact ODE solution it compares with")
        self.net, self.rtol, self.atol = net, float(rtol), float(atol)

    def normalise(self, scores):
        return scores

    @torch.no_grad()
    def forward(self, images, targets=None, start=None):
        from solvers.exact import solve_exact
        if start is None:
            raise ScorerError("neg_error needs the noise each image started from: it is a reward inside a sampler "
                              "(training.rl), not a score of finished images")
        sigmas, cond = start['sigmas'], start.get('cond')
        cond = None if cond is None else cond.to(torch.float64)
        exact = solve_exact(self.net, start['noise'].to(torch.float64), float(sigmas[0]), float(sigmas[-1]), cond,
                            rtol=self.rtol, atol=self.atol)
        diff = images.to(torch.float64) - self.net.decode(exact).to(torch.float64)
        return -(diff.flatten(1).pow(2).mean(1).sqrt())
