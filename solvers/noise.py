"""Noise for stochastic solvers, drawn per image and addressed by key.

A noise source is a callable `noise(key, like) -> tensor shaped and typed like `like``: row b is a standard
Gaussian draw that depends only on image b's seed and the key (a step index, or a tuple such as (step, stream)).
Nothing depends on the batch an image sits in, the worker that samples it, the order of the draws or the resume
point, so the image of seed s is the same in every run; a parallel-in-time solver may draw every step's noise up
front and get the same numbers as the sequential solver drawing them step by step.
"""
import hashlib

import torch


def _key_seed(seed, key):
    """A 63-bit generator seed from an image seed and a key (ints or tuples of ints), stable across runs."""
    key = key if isinstance(key, tuple) else (key,)
    text = ','.join(str(int(k)) for k in (seed,) + key)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), 'little') >> 1


class ImageNoise:
    """Per-image noise for the images of the given seeds (one row each). Drawn in float64 on the CPU and cast,
    so a seed's noise is the same for every dtype and device."""

    def __init__(self, seeds):
        self.seeds = [int(s) for s in seeds]

    def __call__(self, key, like):
        if like.shape[0] != len(self.seeds):
            raise ValueError(f"noise for {len(self.seeds)} images asked for a batch of {like.shape[0]}")
        rows = [torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(_key_seed(s, key)),
                            dtype=torch.float64) for s in self.seeds]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    def repeat(self, times):
        """The source for a batch in which each image appears `times` times in a row (sample-major), each copy
        drawing the same noise."""
        return ImageNoise([s for s in self.seeds for _ in range(times)])

    def subset(self, index):
        """The source for the rows `index` of the batch."""
        return ImageNoise([self.seeds[i] for i in index])

