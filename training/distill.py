"""Distillation of a learned solver's predictor from a teacher's trajectories of a frozen denoiser.

Objective 'l2' (full trajectory): the student runs its whole trajectory from the teacher's start, and the loss
is the sum over its time points of the squared error to the teacher's states (in the variance-preserving scale
x / sqrt(1 + sigma^2)), backpropagated through the whole trajectory; one optimizer step per iteration.
Objective 'inception' (the reference scheme): the same, except that the final point's L2 term is replaced by
alpha times the mean squared difference of Inception-v3 pool features of the decoded images.
Objective 'rmse': the mean over samples of the final state's RMSE to the teacher's (the error the benchmarks report).

Every sample's noise (and label or prompt) comes from a generator seeded by (seed, iteration, sample index), so
any number of workers and any per-worker batch give the same global batch, and a resumed run continues exactly.
"""
import math

import torch

import solvers
from solvers.exact import solve_exact

TEACHERS = ('heun', 'dpm', 'dpmpp', 'euler', 'ipndm', 'unipc', 'exact')


def teacher_grid(sigmas, fine):
    """The teacher's grid: its own fine grid with the student's points merged in, and the indices of the student's
    points in it. A fine point nearer a student point than a quarter of its gap on that side (in log sigma) gives way
    to it, so that no teacher step is tiny (none below a quarter of the fine gaps, none above 1.25 times them); a student grid that is every (M+1)-th fine point leaves the fine grid as it is."""
    log_fine, log_student = torch.log(fine), torch.log(sigmas)
    offset = log_fine[:, None] - log_student[None, :]                    # [F, N]
    dist, nearest = offset.abs().min(1)
    gaps = log_fine[:-1] - log_fine[1:]
    above = torch.cat([gaps[:1], gaps])        # the gap to the next larger fine sigma (the first point: its only gap)
    below = torch.cat([gaps, gaps[-1:]])
    gap = torch.where(offset.gather(1, nearest[:, None])[:, 0] < 0, above, below)
    kept = fine[~(dist < gap / 4)]
    merged, order = torch.sort(torch.cat([kept, sigmas]), descending=True, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    return merged, position[len(kept):]


def teacher_states(net, x, sigmas, cond, sampler_tea, M, schedule_type, schedule_rho, max_order=None):
    """The teacher's states at the student's time points [N, B, ...]: the teacher runs on (M + 1)(N - 1) + 1 points of
    the hand-made schedule between the student's ends (its every (M+1)-th point is a student point), or exactly.
    A learned student grid moves its points off that grid: they are merged into it (teacher_grid), so the teacher's
    accuracy does not depend on the grid being learned (on the student's grid subdivided, a student could lower its
    loss by making the teacher as inaccurate as itself)."""
    sigmas = sigmas.detach()
    with torch.no_grad():
        if sampler_tea == 'exact':
            return solve_exact(net, x, sigmas[0], sigmas[-1], cond, at_sigmas=sigmas, rtol=1e-7, atol=1e-7)
        num = (M + 1) * (len(sigmas) - 1) + 1
        fine = solvers.get_schedule(num, float(sigmas[-1]), float(sigmas[0]), schedule_type, schedule_rho, net=net)
        grid, at_student = teacher_grid(sigmas, fine.to(sigmas))
        info = solvers.SOLVERS[sampler_tea]
        order = info.default_order if max_order is None or max_order not in info.orders else max_order
        _, traj = info.fn(net, x, grid.to(x), cond, return_trajectory=True, max_order=order)
        return traj[at_student]


def draw_batch(net, seed, iteration, indices, dtype, device, prompts=None):
    """Latents (unit noise) and conditions of the given global sample indices of one iteration."""
    gens = [torch.Generator(device).manual_seed((seed * 1_000_003 + iteration * 65_537 + int(j)) % (1 << 63))
            for j in indices]
    latents = torch.stack([torch.randn(net.sample_shape, generator=g, device=device, dtype=torch.float64)
                           for g in gens]).to(dtype)
    cond = None
    if net.label_dim:
        cond = torch.stack([net.sample_labels(g, device) for g in gens]).to(dtype)
    if prompts is not None:
        cond = net.encode_prompts(prompts.prompts_for_seeds([int(j) for j in indices]))
    return latents, cond


def distill_loss(predictor, net, latents, cond, settings, feature_net=None, global_batch=None):
    """The objective on one (part of a) batch, normalised by the global batch; returns (loss, per-step L2)."""
    sigmas = predictor.schedule(net).to(device=latents.device, dtype=latents.dtype)
    x0 = latents * sigmas[0]
    target = teacher_states(net, x0.detach(), sigmas, cond, settings['sampler_tea'], settings['M'],
                            settings['schedule_type'], settings['schedule_rho'], settings.get('max_order'))
    _, traj = predictor.solve(net, x0, sigmas, cond, return_trajectory=True)
    # Squared errors of the states in the variance-preserving scale x / sqrt(1 + sigma^2), so that the early,
    # large-sigma states (whose raw errors are ~sigma times larger) do not drown the final one.
    weights = (1 + sigmas[1:] ** 2).reciprocal().reshape(-1, 1)
    per_step = ((traj[1:] - target[1:]) ** 2).flatten(2).sum(2) * weights   # [N - 1, B]
    norm = global_batch or latents.shape[0]
    if settings['loss'] == 'inception':
        to_pixels = lambda x: (net.decode(x) * 127.5 + 128).clamp(0, 255)
        feats = feature_net(torch.cat([to_pixels(traj[-1]), to_pixels(target[-1])]))
        student_f, teacher_f = feats.chunk(2)
        final = settings['alpha'] * ((student_f - teacher_f) ** 2).mean(1)
        loss = (per_step[:-1].sum() + final.sum()) / norm
    elif settings['loss'] == 'rmse':
        # The evaluation metric itself. Its gradient has the same size for every sample, so the rare samples whose
        # trajectory ends in another mode than the teacher's (errors ~20x the typical) do not dominate the fit.
        final = (traj[-1] - target[-1]).flatten(1).norm(dim=1) / math.sqrt(traj[-1][0].numel())
        loss = final.sum() / norm
    else:
        loss = per_step.sum() / norm
    return loss, per_step.detach().sum(1) / norm
