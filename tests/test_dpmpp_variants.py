"""DPM-Solver++(3M): the default variant 'phi3' is the peers' update (diffusers' DPMSolverMultistepScheduler at
order 3, k-diffusion's sample_dpmpp_3m_sde at eta = 0, diff-sampler's dpm_pp_sampler); '2phi3' is a different,
third-order update (its order is measured in tests/test_convergence.py)."""
import pytest
import torch

import solvers
from solvers.classical import dpmpp_increment


def _start(net, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, *net.sample_shape, generator=g, dtype=torch.float64) * scale


def kdiffusion_3m_eta0(net, x, sigmas):
    """k-diffusion's sample_dpmpp_3m_sde with eta = 0, rewritten from its published update (no noise term).
    Returns every state and the (denoised, h) history each step saw, so single steps can be compared."""
    states, seen = [x], []
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = net(x, sigmas[i])
        seen.append((denoised, denoised_1, denoised_2))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = torch.log(sigmas[i] / sigmas[i + 1])
            x = torch.exp(-h) * x - torch.expm1(-h) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = torch.expm1(-h) / h + 1
                phi_3 = phi_2 / h - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                # k-diffusion's second-order warm-up step is the 'heun' form phi_2 * d (diffusers' solver_type
                # 'heun'); diff-sampler and diffusers' default 'midpoint' use -phi_1 / 2 * d, as solvers.dpmpp does.
                x = x + (torch.expm1(-h) / h + 1) * (denoised - denoised_1) / (h_1 / h)
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
        states.append(x)
    return states, seen


def test_phi3_step_is_kdiffusion_3m_step(gmm_image):
    # Every third-order step of k-diffusion's run, recomputed by solvers.dpmpp's update from the same state and
    # history on the same grid, agrees to float64 rounding; the 2phi3 step does not.
    sigmas = solvers.get_schedule(12, 0.002, 80.0, 'polynomial', 7.0).to(torch.float64)
    with torch.no_grad():
        states, seen = kdiffusion_3m_eta0(gmm_image, _start(gmm_image, 0, 80.0), sigmas)
        for i in range(2, len(sigmas) - 1):
            times = [sigmas[i], sigmas[i - 1], sigmas[i - 2]]
            base, inc = dpmpp_increment(states[i], sigmas[i + 1], list(seen[i]), times, 3)
            scale = states[i + 1].abs().max()
            assert ((base + inc) - states[i + 1]).abs().max() <= 1e-12 * scale, f'step {i}'
            base2, inc2 = dpmpp_increment(states[i], sigmas[i + 1], list(seen[i]), times, 3, variant='2phi3')
            assert ((base2 + inc2) - states[i + 1]).abs().max() > 1e-6 * scale, f'step {i}: 2phi3 is the same'


def _diffusers_run(net, scheduler, z):
    """diffusers' own scheduler loop in its variance-preserving variables, the model predicting x0 (as
    prediction_type='sample'), x_vp = x_ve / sqrt(1 + sigma^2)."""
    sample = z.to(torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].to(torch.float64)
        x_ve = sample.to(torch.float64) * torch.sqrt(1 + sigma ** 2)
        x0 = net(x_ve, sigma).to(torch.float32)
        sample = scheduler.step(x0, t, sample).prev_sample
    return sample.to(torch.float64)


@pytest.mark.parametrize('num_steps,lower_order_final,final', [(10, True, 'sigma_min'), (20, False, 'sigma_min'),
                                                               (10, False, 'zero')])
def test_phi3_run_is_diffusers_multistep_order3(gmm_image, num_steps, lower_order_final, final):
    # diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 3, midpoint) against solvers.dpmpp on the
    # scheduler's own sigmas, to float32 rounding (diffusers computes its updates in float32). diffusers lowers the
    # final orders only below 15 steps (then as solvers.dpmpp with lower_order_final); a final sigma of 0 is its
    # first-order step to D, i.e. our denoise_to_zero at the last positive sigma.
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(solver_order=3, algorithm_type='dpmsolver++', solver_type='midpoint',
                                            prediction_type='sample', lower_order_final=lower_order_final,
                                            final_sigmas_type=final, thresholding=False)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.to(torch.float64)
    assert len(sigmas) == num_steps + 1
    z = _start(gmm_image, 1, 1.0)
    with torch.no_grad():
        theirs = _diffusers_run(gmm_image, scheduler, z)
        x0 = z * torch.sqrt(1 + sigmas[0] ** 2)
        alpha_end = 1 / torch.sqrt(1 + sigmas[-1] ** 2)
        outs = {}
        for variant in ('phi3', '2phi3'):
            # sigmas ending at 0 go through solvers.sample, which takes the final 0 as denoise_to_zero.
            x = solvers.sample(gmm_image, x0 / sigmas[0], 'dpmpp', sigmas=sigmas, max_order=3,
                               lower_order_final=lower_order_final, variant=variant)
            outs[variant] = x * alpha_end
    scale = theirs.abs().max()
    assert (outs['phi3'] - theirs).abs().max() <= 2e-5 * scale
    assert (outs['2phi3'] - theirs).abs().max() > 1e-3 * scale


def test_default_variant_is_phi3(gmm_image):
    latents = _start(gmm_image, 2, 1.0)
    with torch.no_grad():
        default = solvers.sample(gmm_image, latents, 'dpmpp', 8)
        phi3 = solvers.sample(gmm_image, latents, 'dpmpp', 8, variant='phi3')
        other = solvers.sample(gmm_image, latents, 'dpmpp', 8, variant='2phi3')
    assert torch.equal(default, phi3)
    assert not torch.allclose(default, other, atol=1e-4)


@pytest.mark.parametrize('kwargs,match', [
    (dict(solver='dpmpp', variant='bh1'), "not a variant of solver 'dpmpp'; allowed: 2phi3, phi3"),
    (dict(solver='unipc', variant='phi3'), "not a variant of solver 'unipc'; allowed: bh1, bh2"),
    (dict(solver='euler', variant='phi3'), "solver 'euler' has no variants"),
])
def test_bad_variant(gmm_image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solvers.sample(gmm_image, torch.randn(1, 3, 32, 32), num_steps=5, **kwargs)
