"""RDPO (training/rl.py): cold start and policy mean, Dirichlet closed forms against scipy, per-image EPD tables,
RLOO baselines, the CLI (config errors, run folder, export that sample.py runs, resume, 2 workers = 1)."""
import json
import os

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from safetensors.torch import load_file

import training
from solvers.learned import epd
from tests.conftest import run_cli
from training import rl
from training.predictors import EPDPredictor


@pytest.fixture(scope='module')
def digits():
    from models.analytic import digit_mixture
    return digit_mixture()


def distilled(tmp_path, num_steps=3, K=2, seed=0, afs=True, scale=0.3, learn_schedule=False):
    """An EPD predictor of gmm_digits with unsorted random tables (as distillation may leave them), and with
    learn_schedule a random learned grid."""
    settings = dict(dataset_name='gmm_digits', sampler_stu='epd', sampler_tea='dpmpp', num_steps=num_steps, M=3,
                    num_points=K, afs=afs, scale_dir=scale, scale_time=scale, fcn=False, loss='rmse', alpha=10,
                    schedule_type='polynomial', schedule_rho=7, sigma_min=0.002, sigma_max=80.0, max_order=3,
                    sample_shape=[3, 32, 32], dtype='float64', guidance_type=None, guidance_rate=None)
    if learn_schedule:
        settings['learn_schedule'] = True
    p = EPDPredictor(settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in p.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64))
    folder = tmp_path / f'00001-gmm_digits-distilled-{seed}'
    training.save_predictor(p, str(folder))
    return training.load_predictor(str(folder)), folder


def test_per_image_tables_equal_the_shared_table_path(digits):
    g = torch.Generator().manual_seed(0)
    B, K = 3, 2
    x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64) * 80
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.002], dtype=torch.float64)
    cond = torch.eye(10, dtype=torch.float64)[[1, 4, 7]]
    rows = [tuple(torch.rand(K, generator=g, dtype=torch.float64) * s + o for s, o in
                  ((0.8, 0.1), (0.2, 0.9), (0.2, 0.9), (1, 0))) for _ in range(3)]
    shared = lambda n: rows[n]
    same = lambda n: tuple(v[None].expand(B, -1) for v in rows[n])
    a = epd(digits, x, sigmas, cond, table=shared, afs=True)
    b = epd(digits, x, sigmas, cond, table=same, afs=True)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # Different rows: image i of the batch is image i sampled alone with its own table.
    tables = [[tuple(torch.rand(K, generator=g, dtype=torch.float64) * 0.8 + 0.1 for _ in range(4))
               for _ in range(3)] for _ in range(B)]
    per = lambda n: tuple(torch.stack([tables[i][n][j] for i in range(B)]) for j in range(4))
    batched = epd(digits, x, sigmas, cond, table=per)
    for i in range(B):
        alone = epd(digits, x[i:i + 1], sigmas, cond[i:i + 1], table=lambda n: tables[i][n])
        assert torch.allclose(batched[i:i + 1], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize('learn_schedule', [False, True])
def test_cold_start_sanitises_and_the_initial_policy_mean_is_the_distilled_table(tmp_path, digits, learn_schedule):
    predictor, _ = distilled(tmp_path, num_steps=4, K=3, learn_schedule=learn_schedule)
    tables, _ = rl.predictor_tables(predictor)
    base = rl.cold_start(predictor)
    r, w = base['r'], base['w']
    assert torch.all(r[:, 1:] > r[:, :-1]) and torch.all(r > 0) and torch.all(r < 1)
    order = torch.argsort(tables['r'], 1)
    assert torch.allclose(r, tables['r'].gather(1, order), atol=1e-12)   # random tables: no clipping needed
    assert torch.allclose(w, tables['w'].gather(1, order), atol=1e-12)
    assert torch.allclose(base['c'], tables['c'].gather(1, order))
    assert torch.allclose(base['seg'].sum(1), torch.ones(3, dtype=torch.float64))
    # Clipping: a row with coinciding points and points at the ends becomes strictly increasing inside (0, 1).
    rr, ww, _ = rl.sanitise(torch.tensor([[1.0, 0.0, 0.5, 0.5]], dtype=torch.float64),
                            torch.tensor([[0.4, 0.3, 0.3, 0.0]], dtype=torch.float64))
    assert torch.all(torch.diff(rr) > 0) and rr.min() > 0 and rr.max() < 1 and ww.min() > 0
    policy = rl.RDPOPolicy(base, 37.0, hidden_dim=16, num_layers=2, train_scale_dir=True, train_scale_time=True)
    base['sigmas'] = predictor.schedule(digits).detach()
    mean = policy.mean_table()
    for key in ('r', 'w', 'c', 'a'):
        assert torch.allclose(mean[key], base[key], rtol=1e-12, atol=1e-12), key
    # Exported at initialisation, the policy mean samples exactly what the distilled predictor samples.
    out = rl.export_predictor(policy, predictor, base, str(tmp_path / 'export'))
    again = training.load_predictor(str(tmp_path / 'export'))
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cond = torch.eye(10, dtype=torch.float64)[[2, 8]]
    assert torch.allclose(again.sample(digits, z, cond), predictor.sample(digits, z, cond), rtol=0, atol=1e-9)
    assert out.settings['afs'] == predictor.settings['afs']
    # A learned grid goes over with the tables (and RL rolls out on it).
    assert torch.equal(again.schedule(digits).detach(), base['sigmas'])
    if learn_schedule:
        hand_made = EPDPredictor(dict(predictor.settings, learn_schedule=False)).schedule(digits)
        assert (base['sigmas'] - hand_made).abs().max() > 1e-3


def test_dirichlet_log_prob_entropy_and_kl_equal_scipy():
    rng = np.random.default_rng(0)
    for _ in range(3):
        p, q = rng.uniform(0.3, 30, 4), rng.uniform(0.3, 30, 4)
        x = rng.dirichlet(p)
        D = torch.distributions.Dirichlet(torch.tensor(p))
        assert np.isclose(D.log_prob(torch.tensor(x)).item(), scipy.stats.dirichlet.logpdf(x, p), rtol=1e-10)
        assert np.isclose(D.entropy().item(), scipy.stats.dirichlet.entropy(p), rtol=1e-10)
        gl, dg = scipy.special.gammaln, scipy.special.digamma
        want = gl(p.sum()) - gl(q.sum()) - (gl(p) - gl(q)).sum() + ((p - q) * (dg(p) - dg(p.sum()))).sum()
        got = rl.dirichlet_kl(torch.tensor(p), torch.tensor(q)).item()
        assert np.isclose(got, want, rtol=1e-10)
        # And the closed form is the expectation E_p[log p - log q] (Monte Carlo with scipy's densities).
        draws = rng.dirichlet(p, 40000)
        mc = np.mean([scipy.stats.dirichlet.logpdf(d, p) - scipy.stats.dirichlet.logpdf(d, q) for d in draws[:4000]])
        assert abs(mc - got) < 0.1 * max(got, 1)


def test_policy_log_prob_and_kl_sum_over_steps(tmp_path):
    predictor, _ = distilled(tmp_path, num_steps=4, K=2)
    base = rl.cold_start(predictor)
    policy = rl.RDPOPolicy(base, 20.0, hidden_dim=8, num_layers=1)
    action = policy.sample([11, 12])
    assert action['seg'].shape == (2, 3, 3) and action['w'].shape == (2, 3, 2)
    assert torch.equal(policy.sample([12])['seg'][0], action['seg'][1])       # a draw depends on its seed only
    lp = policy.log_prob(action)
    want = sum(scipy.stats.dirichlet.logpdf(action['seg'][1, n].numpy(), (20 * base['seg'][n]).numpy()) +
               scipy.stats.dirichlet.logpdf(action['w'][1, n].numpy(), (20 * base['w'][n]).numpy())
               for n in range(3))
    assert np.isclose(lp[1].item(), want, rtol=1e-9)
    assert policy.kl_to_base().abs() < 1e-9            # zero-init output: the cold start itself
    with torch.no_grad():
        policy.output.bias.add_(0.3)
    assert policy.kl_to_base() > 0


def test_rloo_advantages_per_group_and_the_reference_columns():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0], dtype=torch.float64)    # 2 groups of k = 3
    adv = rl.rloo_advantages(rewards, 3)
    raw = torch.tensor([1 - 2.5, 2 - 2, 3 - 1.5, 10 - 25, 20 - 20, 30 - 15], dtype=torch.float64)
    assert torch.allclose(adv, (raw - raw.mean()) / raw.std(unbiased=False))
    col = rl.rloo_advantages(rewards, 3, baseline='column')      # view(k, R / k): groups {0, 2, 4}, {1, 3, 5}
    grid = rewards.reshape(3, 2)
    raw = (grid - (grid.sum(0) - grid) / 2).reshape(-1)
    assert torch.allclose(col, (raw - raw.mean()) / raw.std(unbiased=False))
    with pytest.raises(rl.UsageError):
        rl.rloo_advantages(rewards, 4)


def rl_args(tmp_path, predictor_folder, *extra):
    return ['-m', 'training.rl', '--device=cpu', '--override', f'data.predictor_snapshot={predictor_folder}',
            '--override', f'run.output_root={tmp_path / "exps"}', '--override', 'ppo.rollout_batch_size=8',
            '--override', 'ppo.rloo_k=4', '--override', 'ppo.minibatch_size=4', '--override', 'ppo.hidden_dim=16',
            '--override', 'ppo.learning_rate=0.01', '--override', 'logging.save_interval=1',
            '--override', 'logging.eval_images=4', '--override', 'reward.sigma=8', *extra]


@pytest.mark.slow
def test_config_errors_are_one_line_and_leave_nothing(tmp_path):
    _, folder = distilled(tmp_path)
    bad = tmp_path / 'bad.yaml'
    bad.write_text('ppo:\n  kl_coeff: 0.1\n')
    cases = [(['--config', str(bad)], 'unknown key ppo.kl_coeff'),
             (['--override', 'ppo.rloo_k=3'], 'multiple of ppo.rloo_k=3'),
             (['--override', 'reward.type=hps', '--override', 'reward.weights_path=nowhere.pt'],
              'nowhere.pt not found'),
             (['--override', 'model.num_steps=7'], 'model.num_steps=7 differs')]
    for extra, message in cases:
        proc = run_cli(rl_args(tmp_path, folder, *extra), check=False)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    amed = tmp_path / 'amed'
    from training.predictors import AMEDPredictor
    training.save_predictor(AMEDPredictor(dict(distilled(tmp_path)[0].settings, sampler_stu='amed',
                                               feature_dim=4)), str(amed))
    proc = run_cli(rl_args(tmp_path, amed), check=False)
    assert proc.returncode != 0 and 'give an EPD predictor' in proc.stderr
    assert not (tmp_path / 'exps').exists()
    proc = run_cli(rl_args(tmp_path, folder, '--dry-run'))
    assert 'kl_coef: 0.01' in proc.stdout and not (tmp_path / 'exps').exists()


@pytest.mark.slow
def test_run_export_sample_and_resume(tmp_path):
    _, folder = distilled(tmp_path)
    full = tmp_path / 'full'
    run_cli(rl_args(full, folder, '--max-steps', '4'))
    run_dir = next((full / 'exps').glob('00001-rl-gmm_digits-*'))
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert all(r['heldout_reward'] is not None and 0 <= r['reward_mean'] <= 1 for r in rows)
    assert (run_dir / 'curves.png').stat().st_size > 0 and (run_dir / 'resolved_config.yaml').is_file()
    exported = training.load_predictor(str(run_dir))
    assert exported.settings['rl_step'] == 4
    proc = run_cli(['sample.py', f'--predictor_path={run_dir}', '--seeds=0-3', f'--outdir={tmp_path / "s"}',
                    '--device=cpu'])
    assert 'images: 4 new' in proc.stdout
    # Stopped after 2 steps (with a step-3 line logged before its state was saved, as a kill can leave), then
    # resumed to 4: the same final policy and a clean log.
    part = tmp_path / 'part'
    run_cli(rl_args(part, folder, '--max-steps', '2'))
    part_dir = next((part / 'exps').glob('00001-rl-gmm_digits-*'))
    with open(part_dir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps(dict(step=3, reward_mean=0.0)) + '\n')
    run_cli(['-m', 'training.rl', '--device=cpu', f'--resume={part_dir}', '--max-steps', '4'])
    a = load_file(run_dir / 'checkpoints' / 'policy-step000004.safetensors')
    b = load_file(part_dir / 'checkpoints' / 'policy-step000004.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)['step'] for line in (part_dir / 'metrics.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # --select=best picks the checkpoint of the highest held-out reward.
    run_cli(['-m', 'training.rl', '--device=cpu', f'--export={run_dir}', '--select=best'])
    best = max(rows, key=lambda r: r['heldout_reward'])['step']
    assert training.load_predictor(str(run_dir)).settings['rl_step'] == best


@pytest.mark.slow
def test_two_workers_equal_one(tmp_path):
    _, folder = distilled(tmp_path)
    run_cli(rl_args(tmp_path / 'one', folder, '--max-steps', '2'))
    run_cli(rl_args(tmp_path / 'two', folder, '--max-steps', '2'), nproc=2)
    a, b = (load_file(next((tmp_path / d / 'exps').glob('00001-*')) / 'checkpoints' / 'policy-step000002.safetensors')
            for d in ('one', 'two'))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize('head,key', [('pickscore', 'model'), ('aesthetic', 'clip_path'),
                                      ('imagereward', 'checkpoint')])
def test_a_missing_reward_file_names_the_config_key_that_sets_it(tmp_path, head, key):
    """Alone or inside multi, a head's missing file is reported under the key the config has for it."""
    from scorers import ScorerError, load_scorer
    missing = str(tmp_path / 'absent.bin')
    for reward_type in (head, 'multi'):
        cfg = rl.load_rl_config(overrides=['data.predictor_snapshot=x', f'reward.type={reward_type}',
                                           f'reward.multi.weights.{head}=1.0', f'reward.multi.{head}.{key}={missing}'])
        name, opts = rl.reward_options(cfg, None)
        with pytest.raises(ScorerError) as err:
            load_scorer(name, **opts)
        message = str(err.value)
        assert f'reward.multi.{head}.{key}' in message and 'absent.bin' in message, message


def test_shipped_rl_configs_resolve_against_the_schema_and_their_models():
    """Every configs/rl/*.yaml: known keys only, a valid PPO setup, a model config that exists, the per-prompt
    baseline and a KL anchor (the reference ships kl_coef 0); a named predictor snapshot loads, is EPD and belongs to
    the config's model."""
    import glob
    from omegaconf import OmegaConf
    import configs
    paths = sorted(glob.glob(os.path.join(os.path.dirname(rl.__file__), '..', 'configs', 'rl', '*.yaml')))
    names = {os.path.basename(p)[:-5] for p in paths}
    assert {'gmm_digits', 'ms_coco', 'sd3_512', 'sd3_1024', 'flux'} <= names
    for path in paths:
        raw = OmegaConf.load(path)
        snapshot = raw['data']['predictor_snapshot']
        over = [] if snapshot else ['data.predictor_snapshot=x']
        cfg = rl.load_rl_config(path, over)
        assert cfg['ppo']['kl_coef'] > 0 and cfg['ppo']['baseline'] == 'per_prompt', path
        dataset = cfg['model']['dataset_name']
        configs.load_config(dataset)
        name, opts = rl.reward_options(cfg, None)
        assert name in ('multi', 'class_posterior'), path
        if snapshot:
            predictor = training.load_predictor(snapshot)
            assert predictor.settings['sampler_stu'] == 'epd'
            assert rl.model_config_name(dataset, predictor.settings) == dataset, path
    # The SD3 table's own model config wins over its dataset_name (ms_coco, the reference's name for every
    # text-to-image model), as in sample.py; another model is refused in one line.
    sd3 = training.load_predictor('exps/ref-sd3-1024-epd-distilled').settings
    assert rl.model_config_name(None, sd3) == 'sd3_1024' and rl.model_config_name('ms_coco', sd3) == 'sd3_1024'
    with pytest.raises(rl.UsageError, match="distilled on 'sd3_1024', not 'flux'"):
        rl.model_config_name('flux', sd3)
