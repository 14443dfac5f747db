"""Scorers: functions of images that are not denoisers (reward models, CLIP score, the analytic models' exact
class posterior and log-density). One calling convention and one loading rule:

    scorer = load_scorer(name, **options)
    scorer(images, targets) -> [B] float64

images: [B, C, H, W] in [-1, 1] (what `net.decode` returns); targets: a list of B prompts (text scorers) or
B class labels (ints or one-hot rows, class scorers). A scorer with `needs_start = True` (neg_error: the error to
the exact ODE solution of the same noise) also takes start=dict(noise, sigmas, cond), which only a sampler has.
Weights come from local files only (safetensors, or torch pickles read with weights_only=True); nothing in a
file is executed. A missing file is one ScorerError line naming the file, where it comes from and the option
that sets it.

Each scorer also has `normalise(scores)`, the map into roughly [0, 1] that `multi` uses to weight heads
(the reference's: HPS clamp(s, 0, 1), PickScore clamp(s / 26, 0, 1), CLIP clamp(s, 0, 1), aesthetic
clamp(s / 10, 0, 1), ImageReward clamp(s / 10, 0, 1) of its +3 std shifted score). MPS is an evaluation score
only: it has no normalisation and neither `multi` nor the RL config accepts it.
"""
import os


class ScorerError(ValueError):
    """A scorer cannot be built or used; the message names the problem and the fix."""


def require_file(path, what, source, option):
    """The path if it is a file, else ScorerError naming the file, where it comes from and the option to set."""
    if path and os.path.exists(path):
        return path
    raise ScorerError(f"{what} weights {path or '(no path given)'} not found: download it from {source} and "
                      f"set {option} to its local path")


def load_scorer(name, option_prefix='reward', **options):
    """Build the scorer `name` (see SCORERS) from its options; option_prefix names where options are set, for
    error messages (e.g. 'reward' -> 'reward.weights_path')."""
    from scorers import analytic, clip, imagereward, mps, multi, pickscore
    table = dict(class_posterior=analytic.ClassPosterior, log_density=analytic.LogDensity,
                 neg_error=analytic.NegError,
                 hps=clip.HPSv2, clip=clip.CLIPScore, aesthetic=clip.Aesthetic, pickscore=pickscore.PickScore,
                 imagereward=imagereward.ImageReward, mps=mps.MPS, multi=multi.Multi)
    if name not in table:
        raise ScorerError(f"unknown scorer {name!r}; known: {', '.join(sorted(table))}")
    return table[name](option_prefix=option_prefix, **options)


SCORERS = ('class_posterior', 'log_density', 'neg_error', 'hps', 'clip', 'aesthetic', 'pickscore', 'imagereward',
           'multi', 'mps')     # mps: evaluation only; neg_error: inside a sampler only
