"""A weighted mixture of scorers: R = sum_m w_m norm_m(s_m) / sum_m max(w_m, 0) over the heads with w_m > 0
(the reference's normalisation). Each head's raw scores are kept for logging (`last_heads`)."""
import torch

from scorers import ScorerError


class Multi(torch.nn.Module):
    def __init__(self, weights=None, option_prefix='reward', net=None, batch_size=16, **head_options):
        super().__init__()
        from scorers import load_scorer
        weights = {k: float(v) for k, v in (weights or {}).items() if float(v) > 0}
        if not weights:
            raise ScorerError(f"{option_prefix}.multi.weights gives no head a positive weight")
        self.weights = weights
        self.heads = torch.nn.ModuleDict()
        for name in weights:
            if name == 'multi':
                raise ScorerError("a multi reward cannot contain itself")
            if name == 'mps':
                raise ScorerError("mps is an evaluation score, not a training reward; give it no multi weight")
            opts = dict(head_options.get(name) or {})
            opts.setdefault('batch_size', batch_size)
            self.heads[name] = load_scorer(name, option_prefix=f'{option_prefix}.multi.{name}', net=net, **opts)
        self.last_heads = {}
        self.needs_start = any(getattr(h, 'needs_start', False) for h in self.heads.values())

    def forward(self, images, targets=None, start=None):
        total = sum(self.weights.values())
        raw = {name: (head(images, targets, start=start) if getattr(head, 'needs_start', False)
                      else head(images, targets)) for name, head in self.heads.items()}
        self.last_heads = {k: v.detach() for k, v in raw.items()}
        return sum(self.weights[k] * self.heads[k].normalise(v) for k, v in raw.items()) / total

    def normalise(self, scores):
        return scores
