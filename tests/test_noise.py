"""Per-image noise: a row depends only on its image's seed and the key."""
import torch

from solvers.noise import ImageNoise


def test_rows_depend_only_on_seed_and_key():
    like = torch.zeros(3, 2, 4, 4)
    a = ImageNoise([5, 7, 9])(3, like)
    b = ImageNoise([9, 5])(3, like[:2])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], ImageNoise([5])(4, like[:1])[0])          # another key, another draw
    assert not torch.equal(a[0], ImageNoise([5])((3, 1), like[:1])[0])     # another stream, another draw
    assert torch.allclose(a[0].double(), ImageNoise([5])(3, like[:1].double())[0])   # dtype only casts
    assert abs(ImageNoise(range(64))(0, torch.zeros(64, 256)).std().item() - 1) < 0.02


def test_repeat_and_subset():
    noise = ImageNoise([1, 2])
    like = torch.zeros(4, 3)
    rep = noise.repeat(2)(0, like)
    assert torch.equal(rep[0], rep[1]) and torch.equal(rep[1], noise(0, like[:2])[0])
    assert torch.equal(noise.subset([1])(0, like[:1])[0], noise(0, like[:2])[1])
