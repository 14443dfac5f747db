"""2nd-SED's sigma learning (training/sigma_schedule.py): the parametrisation, the weighted denoising loss and its
gradient against their closed forms on a Gaussian (where the denoising error is known exactly), training, and the
predictor folder that sample.py runs."""
import json
import math
import os

import pytest
import torch

import solvers
import training
from models.analytic import GaussianMixture
from training import sigma_schedule as sed
from tests.conftest import run_cli


def gaussian(d_shape=(2, 2, 2), rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(d_shape)
    basis, _ = torch.linalg.qr(torch.randn(d, rank, dtype=torch.float64, generator=g))
    eig = torch.tensor([0.6, 0.2, 0.05], dtype=torch.float64)[:rank]
    mean = 0.3 * torch.randn(d, dtype=torch.float64, generator=g)
    return GaussianMixture(mean[None], basis[None], eig[None], torch.tensor([0.01], dtype=torch.float64),
                           torch.ones(1, dtype=torch.float64), d_shape, sigma_min=0.002, sigma_max=80.0)


def mmse(net, sigma):
    """Exact per-entry denoising error E |D(y + sigma n; sigma) - y|^2 / d of a Gaussian: mean of v s^2/(v + s^2)
    over the covariance's eigenvalues v."""
    d = net.means.shape[1]
    iso = net.iso_vars[0]
    v = torch.cat([net.eigvals[0] + iso, iso.expand(d - net.eigvals.shape[1])])
    return (v * sigma ** 2 / (v + sigma ** 2)).mean()


def expected_loss(net, logits, sigma_max, precond='Dns'):
    """The loss's expectation, with the data term's denoising errors held constant (as the loss does: D under
    no_grad) and the regulariser differentiated through the last level."""
    sigmas = sed.sigmas_from_logits(logits, sigma_max)
    ratios = torch.sigmoid(logits)
    w = 1 - ratios if precond == 'Dns' else 1 / ratios - 1
    data = (w * torch.stack([mmse(net, s.detach()) for s in sigmas[:-1]])).mean()
    return data + mmse(net, sigmas[-1]) / sigmas[-1]


def test_initial_schedule_is_the_rho_3_grid_and_decreasing():
    logits = sed.initial_logits(10, 0.002, 80.0)
    sigmas = sed.sigmas_from_logits(logits, 80.0)
    assert torch.allclose(sigmas, solvers.get_schedule(10, 0.002, 80.0, 'polynomial', 3.0), rtol=1e-12, atol=0)
    free = sed.sigmas_from_logits(torch.randn(9, dtype=torch.float64) * 3, 80.0)
    assert free[0] == 80.0 and bool((free[1:] < free[:-1]).all()) and free[-1] > 0


@pytest.mark.parametrize('precond', ['Dns', 'Eps'])
def test_loss_and_gradient_match_the_closed_form_on_a_gaussian(precond):
    net = gaussian()
    logits = sed.initial_logits(6, 0.002, 80.0).requires_grad_(True)
    exact = expected_loss(net, logits, 80.0, precond)
    exact_grad, = torch.autograd.grad(exact, logits)
    gen = torch.Generator().manual_seed(1)
    y = net.sample_data(200_000, generator=gen)
    loss, data, reg = sed.denoising_loss(net, logits, y, 80.0, precond, generator=gen)
    grad, = torch.autograd.grad(loss, logits)
    assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=0.02)
    assert float(reg) == pytest.approx(float(mmse(net, sed.sigmas_from_logits(logits, 80.0)[-1])
                                             / sed.sigmas_from_logits(logits, 80.0)[-1]), rel=0.02)
    assert torch.allclose(grad, exact_grad, rtol=0.05, atol=0.02 * float(exact_grad.abs().max()))


def test_training_moves_the_schedule_against_the_expected_gradient():
    """A short run moves the logits in the direction of the closed-form expected gradient (descent), and the
    result is the EMA of the iterates."""
    net = gaussian()
    opts = sed.resolve(dict(dm_length=6, batch=2000, lr=0.01, ema=1e-9))
    start = sed.initial_logits(6, 0.002, 80.0)
    probe = start.clone().requires_grad_(True)
    expected_grad, = torch.autograd.grad(expected_loss(net, probe, 80.0), probe)
    predictor, history = sed.train(net, opts, sed.DataSource(net, opts, torch.float64, 'cpu', log=lambda *_: None),
                                   log=lambda *_: None, iterations=5)
    moved = predictor.logits.detach() - start
    # Adam's first steps are lr * sign(grad) per entry
    assert torch.equal(torch.sign(moved), -torch.sign(expected_grad))
    assert len(history) >= 2 and history[-1]['iteration'] == 5


def test_cli_writes_a_predictor_that_sample_py_runs(tmp_path):
    proc = run_cli(['-m', 'training.sigma_schedule', '--dataset_name=gmm_image', '--dm_length=5', '--batch=50',
                    '--duration=0.0002', '--solver=euler', f'--outdir={tmp_path}/exps'], cwd=str(tmp_path))
    assert 'Done in' in proc.stdout
    folder = os.path.join(tmp_path, 'exps', os.listdir(os.path.join(tmp_path, 'exps'))[0])
    predictor = training.load_predictor(folder)
    sigmas = predictor.schedule()
    assert predictor.kind == 'sed_sigmas' and len(sigmas) == 5 and sigmas[0] == 80.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    out = tmp_path / 'imgs'
    proc = run_cli(['sample.py', f'--predictor_path={folder}', '--seeds=0-1', f'--outdir={out}'], cwd=str(tmp_path))
    assert 'NFE per image: 4' in proc.stdout
    with open(out / 'sample_options.json') as f:
        assert json.load(f)['settings']['schedule_type'] == 'sed_sigmas'
    bad = run_cli(['-m', 'training.sigma_schedule', '--sigma_arch=softmax', f'--outdir={tmp_path}/exps'],
                  cwd=str(tmp_path), check=False)
    assert bad.returncode != 0 and 'sigmoid' in bad.stdout + bad.stderr
