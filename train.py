"""Distil a learned solver (EPD, EPD-Plugin on iPNDM, AMED, AMED-Plugin) from a teacher solver's trajectories, or
learn a classical solver's time grid (LD3, training/ld3.py).

    torchrun --standalone --nproc_per_node=2 train.py --dataset_name=gmm_image --sampler_stu=epd --num_steps=4
    python train.py --dataset_name=gmm_image --sampler_stu=ld3 --solver=unipc --num_steps=6
"""
import json
import math
import os
import re
import sys
import time

import click
import torch
from click.core import ParameterSource

import configs
import models
import solvers
import training
from models.loading import load_model
from training import ld3
from training.distill import TEACHERS, distill_loss, draw_batch
from torch_utils import distributed as dist
from torch_utils.image_io import atomic_write
from torch_utils.plots import loss_curve
from torch_utils.run_options import same_value

STUDENTS = ('epd', 'ipndm', 'amed', 'euler', 'dpm', 'dpmpp', 'ld3')   # ipndm: EPD-Plugin; euler/dpm/dpmpp: AMED-Plugin;
# ld3: a learned time grid for --solver
STATE_FILE = 'training-state.pt'
OPTIONS_FILE = 'training_options.json'
STATS_FILE = 'stats.jsonl'


# Options a dataset config's `train:` section may set; the command line overrides both.
TRAIN_DEFAULTS = dict(sampler_stu='epd', sampler_tea='dpm', num_steps=4, M=3, num_points=2, afs=True, scale_dir=0.05,
                      scale_time=0.05, fcn=False, loss=None, alpha=10.0, schedule_type='polynomial',
                      schedule_rho=7.0, predict_x0=True, lower_order_final=True, prompt_path=None, batch=64,
                      total_kimg=10.0, lr=0.01, coslr=False, dtype='float32', learn_schedule=False, lr_grid=None)

# A learned grid moves every time point at once, and with the settings above EPD stops far short (1.5x the best
# classical solver). Its own defaults (chosen on gmm_image's mixture over 3 seeds, docs/robust_epd.md, with the
# earlier teacher on the student's grid; a slower grid, --lr_grid 0.01 or 0.02, did worse there; with the teacher on
# its own grid they give 0.40-0.41x there, docs/robust_epd_own_teacher_grid.md) replace the built-in ones when EPD's tables learn a grid (AMED's network
# was not measured with them); a config's train section and the command line still override them.
LEARNED_GRID_DEFAULTS = dict(batch=32, total_kimg=38.4, lr=0.05, coslr=True, scale_dir=0.5, scale_time=0.5)


def _learned(name):
    return f'; {LEARNED_GRID_DEFAULTS[name]} for EPD with --learn_schedule=True'


class UsageError(Exception):
    pass


def resolve_options(cfg, given, plugin='epd'):
    """Training options: the built-in defaults, then the dataset config's `train:` section, then its `epd:` or
    `amed:` subsection for the predictor being trained, then the command line (options given as None were not
    given). The training dtype falls back to the config's sampling dtype."""
    section = dict(cfg['train'])
    per_kind = {kind: dict(section.pop(kind) or {}) for kind in ('epd', 'amed') if kind in section}
    unknown = sorted(set(section).union(*per_kind.values()) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)} in the train section of the {cfg['dataset_name']} "
                         f"config; allowed: {', '.join(TRAIN_DEFAULTS)} (and epd:, amed: subsections of them)")
    given = {k: v for k, v in given.items() if v is not None}

    def layered(defaults):
        opts = dict(defaults, dtype=cfg['sample'].get('dtype', TRAIN_DEFAULTS['dtype']))
        opts.update(section)
        opts.update(per_kind.get(predictor_kind(given.get('sampler_stu', opts['sampler_stu']), plugin), {}))
        opts.update(given)
        return opts
    opts = layered(TRAIN_DEFAULTS)
    epd = predictor_kind(opts['sampler_stu'], plugin) == 'epd'
    return layered(dict(TRAIN_DEFAULTS, **LEARNED_GRID_DEFAULTS)) if opts['learn_schedule'] and epd else opts


def default_loss(cfg, net, model_path=None):
    """The objective when neither the command line nor the config names one: the seeds' Inception-feature loss for
    RGB image models; the final RMSE for the analytic models (exact, and offline: no detector weights to fetch) and
    for samples that are not RGB images, where Inception features mean nothing."""
    analytic = cfg['model'].get('family') == 'analytic' and not str(model_path or '').startswith('python:')
    shape = tuple(net.sample_shape)
    rgb = len(shape) == 3 and (net.image_channels or shape[0]) == 3      # decode() gives RGB images
    return 'inception' if rgb and not analytic else 'rmse'


def predictor_kind(sampler_stu, plugin):
    if sampler_stu == 'epd':
        return 'epd'
    if sampler_stu == 'amed':
        return 'amed'
    if sampler_stu == 'ipndm':
        return 'amed' if plugin == 'amed' else 'epd'
    return 'amed'        # euler, dpm, dpmpp: AMED-Plugin


def next_run_dir(outdir, name):
    """Create and return outdir/NNNNN-name with the next free number; mkdir claims the number, so runs started at
    the same moment get different folders."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        ids = [int(m.group(1)) for d in os.listdir(outdir) if (m := re.match(r'(\d+)-', d))]
        path = os.path.join(outdir, f'{max(ids, default=0) + 1:05d}-{name}')
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def resume_folder(resume, outdir):
    """The experiment folder --resume names (a folder or an experiment number in outdir); refuses files and folders
    that hold no training_options.json."""
    path = str(resume)
    if os.path.isfile(path):
        raise UsageError(f"--resume={resume} is a file; give the experiment's folder or its number (e.g. --resume=1)")
    folder = path if os.path.isdir(path) else None
    if folder is None and re.fullmatch(r'\d+', path) and os.path.isdir(outdir):
        matches = sorted(d for d in os.listdir(outdir) if d.startswith(f'{int(path):05d}-'))
        folder = os.path.join(outdir, matches[0]) if matches else None
    if folder is None:
        raise UsageError(f"--resume={resume}: no such folder, and no experiment {path} in --outdir={outdir}")
    if not os.path.isfile(os.path.join(folder, OPTIONS_FILE)):
        raise UsageError(f"--resume={resume}: {folder} is not an experiment folder (it has no {OPTIONS_FILE}); give "
                         f"an {outdir}/NNNNN-* folder or its number")
    return folder


def recorded_values(options):
    """The command-line values a run was started with, read back from its training_options.json."""
    s = options['settings']
    values = {k: s[k] for k in ('sampler_stu', 'sampler_tea', 'num_steps', 'M', 'afs', 'scale_dir', 'scale_time',
                                'fcn', 'loss', 'alpha', 'schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max',
                                'max_order', 'predict_x0', 'lower_order_final', 'guidance_type', 'guidance_rate',
                                'dtype', 'learn_schedule') if k in s}
    values.update({k: options[k] for k in ('batch', 'total_kimg', 'lr', 'lr_grid', 'coslr', 'seed', 'model_path',
                                           'prompt_path', 'classifier_path', 'resolution') if k in options})
    values['dataset_name'] = options.get('dataset_config', s['dataset_name'])
    if values.get('learn_schedule') and values.get('lr_grid') is None:    # a run from before LEARNED_GRID_DEFAULTS
        values['lr_grid'] = values['lr']
    if s['predictor'] == 'epd':
        values['num_points'] = s['num_points']
    if s['sampler_stu'] == 'ipndm':                  # the plugin only means something for the iPNDM student
        values['plugin'] = options.get('plugin', s['predictor'])
    return values


def check_solver_options(opts, sigma_min, sigma_max, max_order):
    """sample.py's checks (solvers.check_options) on the grid, and on the student's base solver and the teacher: an
    option sample.py refuses is refused here too. max_order must suit every multistep solver of the run."""
    student, teacher = opts['sampler_stu'], opts['sampler_tea']
    grid = dict(num_steps=opts['num_steps'], schedule_type=opts['schedule_type'], schedule_rho=opts['schedule_rho'],
                sigma_min=sigma_min, sigma_max=sigma_max)
    solvers.check_options('euler', **grid)
    multistep = [name for name in dict.fromkeys((student, teacher))
                 if name in solvers.SOLVERS and solvers.SOLVERS[name].orders != (None,)]
    if max_order is not None and not multistep:
        raise UsageError(f"--max_order={max_order} applies to neither the student {student} nor the teacher "
                         f"{teacher}; drop it (it sets the order of ipndm and dpmpp)")
    for name in multistep:
        solvers.check_options(name, max_order=max_order, **grid)


def resume_options(kwargs, explicit):
    """The options of a resumed run: those recorded in its training_options.json. An option given on the command line
    must agree with the record (total_kimg may change: a run can be extended); refuses in one line otherwise."""
    folder = resume_folder(kwargs['resume'], kwargs['outdir'])
    with open(os.path.join(folder, OPTIONS_FILE)) as f:
        recorded = recorded_values(json.load(f))
    if 'desc' in explicit:
        raise UsageError(f"--desc names a new run's folder; drop it when resuming {folder}")
    for name in sorted(explicit & set(recorded)):
        if name != 'total_kimg' and not same_value(kwargs[name], recorded[name]):
            raise UsageError(f"--{name}={kwargs[name]} contradicts the run's {name}={recorded[name]} ({folder}/"
                             f"{OPTIONS_FILE}); drop --{name} to resume this run, or start a new one")
    merged = dict(kwargs, resume=folder)
    merged.update({k: v for k, v in recorded.items() if k not in explicit})
    return merged


def read_stats(path):
    """The records of stats.jsonl (a line cut short by a kill is skipped)."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return records


class Logger:
    def __init__(self, path):
        self.file = open(path, 'a') if path else None

    def __call__(self, line):
        if dist.get_rank() == 0:
            print(line, flush=True)
            if self.file:
                self.file.write(line + '\n')
                self.file.flush()


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', metavar='NAME|YAML', default=None, help=f'Dataset config (configs/NAME.yaml or a YAML path) [default: told from --model_path, else {configs.DEFAULT_DATASET}]')
@click.option('--model_path', metavar='PATH|URL|python:MOD:FN', default=None, help='Override the config\'s model source')
@click.option('--classifier_path', metavar='PATH|URL', default=None, help='Noise-aware classifier for --guidance_type=cg (family adm) [default: the config\'s]')
@click.option('--resolution', metavar='INT', type=click.IntRange(min=8), default=None, help='Image size of latent models [default: the config\'s; with another --model_path, the model\'s own]')
@click.option('--sampler_stu', metavar='NAME', type=click.Choice(STUDENTS), default=None, help='Student: epd, ipndm (EPD-Plugin, or AMED-Plugin with --plugin=amed), amed, euler/dpm/dpmpp (AMED-Plugin) [default: epd]')
@click.option('--plugin', metavar='epd|amed', type=click.Choice(['epd', 'amed']), default='epd', help='For --sampler_stu=ipndm: which predictor plugs in')
@click.option('--sampler_tea', metavar='NAME', type=click.Choice(TEACHERS), default=None, help='Teacher solver [default: dpm]')
@click.option('--num_steps', metavar='INT', type=click.IntRange(min=2), default=None, help='Student time points [default: 4]')
@click.option('--M', 'M', metavar='INT', type=click.IntRange(min=0), default=None, help='Teacher points inserted per student step [default: 3]')
@click.option('--num_points', metavar='INT', type=click.IntRange(min=1), default=None, help='EPD parallel points per step (K) [default: 2]')
@click.option('--afs', metavar='BOOL', type=bool, default=None, help='Analytical first step [default: True]')
@click.option('--scale_dir', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=None, help=f'Direction scale range [1-s, 1+s] [default: 0.05{_learned("scale_dir")}]')
@click.option('--scale_time', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=None, help=f'Time scale range [1-s, 1+s] [default: 0.05{_learned("scale_time")}]')
@click.option('--fcn', metavar='BOOL', type=bool, default=None, help='EPD: no direction scale on the final step [default: False]')
@click.option('--loss', metavar='l2|inception|rmse', type=click.Choice(['l2', 'inception', 'rmse']), default=None, help='Objective: per-step L2, final Inception features, final RMSE [default: inception for RGB image models, rmse for analytic ones and other shapes]')
@click.option('--alpha', metavar='FLOAT', type=float, default=None, help='Weight of the Inception-feature loss [default: 10]')
@click.option('--inception_path', metavar='PATH', default=None, help='Inception-v3 detector for --loss=inception')
@click.option('--schedule_type', metavar='NAME', type=click.Choice(solvers.SCHEDULES), default=None, help='Time schedule [default: polynomial]')
@click.option('--schedule_rho', metavar='FLOAT', type=float, default=None, help='Schedule exponent [default: 7]')
@click.option('--learn_schedule', metavar='BOOL', type=bool, default=None, help='Learn the time grid with the tables (LD3\'s parametrisation), starting from --schedule_type; for EPD it changes the defaults of ' + ', '.join(f'--{k}' for k in LEARNED_GRID_DEFAULTS) + ' [default: False]')
@click.option('--sigma_min', metavar='FLOAT', type=float, default=None, help='[default: the model\'s]')
@click.option('--sigma_max', metavar='FLOAT', type=float, default=None, help='[default: the model\'s]')
@click.option('--max_order', metavar='INT', type=int, default=None, help='Multistep order (iPNDM plugins, multistep teachers)')
@click.option('--predict_x0', metavar='BOOL', type=bool, default=None, help='DPM-Solver++ teacher: data prediction [default: True]')
@click.option('--lower_order_final', metavar='BOOL', type=bool, default=None, help='DPM-Solver++ teacher option [default: True]')
@click.option('--guidance_type', metavar='cg|cfg|uncond', default=None, help='Guidance (models that support it)')
@click.option('--guidance_rate', metavar='FLOAT', type=float, default=None, help='Guidance strength')
@click.option('--prompt_path', '--prompt_file', 'prompt_path', metavar='PATH', default=None, help='Prompts for text-to-image models (lines or CSV)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=None, help=f'Total batch size [default: 64{_learned("batch")}]')
@click.option('--batch-gpu', 'batch_gpu', metavar='INT', type=click.IntRange(min=1), default=None, help='Per-worker cap (gradient accumulation)')
@click.option('--total_kimg', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None, help=f'Training length in thousands of samples [default: 10{_learned("total_kimg")}]')
@click.option('--lr', metavar='FLOAT', type=float, default=None, help=f'Adam learning rate [default: 0.01{_learned("lr")}]')
@click.option('--lr_grid', metavar='FLOAT', type=click.FloatRange(min=0), default=None, help='Adam rate of the learned grid (with --learn_schedule=True) [default: --lr]')
@click.option('--coslr', metavar='BOOL', type=bool, default=None, help=f'Cosine learning-rate schedule [default: False{_learned("coslr")}]')
@click.option('--seed', metavar='INT', type=int, default=0, help='Random seed')
@click.option('--snap', metavar='INT', type=click.IntRange(min=1), default=10, help='Save the training state every N iterations')
@click.option('--outdir', metavar='DIR', default='exps', help='Where experiment folders go')
@click.option('--desc', metavar='STR', default=None, help='Extra text for the folder name')
@click.option('--resume', metavar='DIR|INT', default=None, help='Continue an experiment from its last saved state, with its recorded options (--total_kimg may extend it)')
@click.option('--dtype', metavar='NAME', type=click.Choice(['float32', 'float64']), default=None, help='Training dtype [default: float32]')
@click.option('--device', metavar='DEV', default=None, help='[default: cuda if available]')
@click.option('-n', '--dry-run', 'dry_run', is_flag=True, help='Print the options and exit')
@ld3.cli_options
def main(**kwargs):
    """Distil a learned-solver predictor into exps/NNNNN-<dataset>-<steps>-<nfe>-<stu>-<tea>-<M>-<schedule>[-afs]."""
    ctx = click.get_current_context()
    explicit = {k for k in kwargs if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT,
                                                                          ParameterSource.DEFAULT_MAP, None)}
    ld3_given = {k: kwargs.pop(k) for k in list(kwargs) if k in ld3.DEFAULTS}
    try:
        if kwargs['sampler_stu'] == 'ld3' and kwargs['learn_schedule'] is not None:
            raise UsageError("--learn_schedule is for EPD and AMED; LD3 (--sampler_stu=ld3) learns nothing but its "
                             "grid: drop it")
        if kwargs['sampler_stu'] == 'ld3' or kwargs['resume'] is not None and ld3_run(kwargs):
            ld3.run_cli(kwargs, ld3_given)
            dist.shutdown()
            return
        stray = sorted(k for k, v in ld3_given.items() if v is not None)
        if stray:
            raise UsageError(f"--{stray[0]} is an LD3 option; it applies with --sampler_stu=ld3 only")
        if kwargs['resume'] is not None:
            kwargs = resume_options(kwargs, explicit)
        run(**kwargs)
    except (UsageError, ValueError, models.ModelError, OSError) as e:
        dist.report_error('train.py', e, same_everywhere=not isinstance(e, OSError))
        dist.shutdown()
        sys.exit(1)
    dist.shutdown()


def ld3_run(kwargs):
    """Whether --resume names an LD3 run."""
    with open(os.path.join(resume_folder(kwargs['resume'], kwargs['outdir']), OPTIONS_FILE)) as f:
        return 'ld3' in json.load(f)


def run(dataset_name, model_path, sampler_stu, plugin, sampler_tea, num_steps, M, num_points, afs, scale_dir,
        scale_time, fcn, loss, alpha, inception_path, schedule_type, schedule_rho, learn_schedule, sigma_min, sigma_max, max_order,
        predict_x0, lower_order_final, guidance_type, guidance_rate, prompt_path, batch, batch_gpu, total_kimg, lr,
        lr_grid, coslr, seed, snap, outdir, desc, resume, dtype, device, dry_run, classifier_path=None, resolution=None):
    dist.init()
    device = torch.device(device) if device else dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    if dataset_name is None and (model_path is None or str(model_path).startswith('python:')):
        dataset_name = configs.DEFAULT_DATASET
    cfg = configs.config_for_run(dataset_name, model_path)
    opts = resolve_options(cfg, {k: v for k, v in locals().items() if k in TRAIN_DEFAULTS}, plugin)
    sampler_stu, sampler_tea, num_steps, M, num_points, afs = (opts[k] for k in (
        'sampler_stu', 'sampler_tea', 'num_steps', 'M', 'num_points', 'afs'))
    scale_dir, scale_time, fcn, loss, alpha, schedule_type, schedule_rho = (opts[k] for k in (
        'scale_dir', 'scale_time', 'fcn', 'loss', 'alpha', 'schedule_type', 'schedule_rho'))
    predict_x0, lower_order_final, prompt_path, batch, total_kimg, lr, coslr, dtype, learn_schedule = (opts[k] for k in (
        'predict_x0', 'lower_order_final', 'prompt_path', 'batch', 'total_kimg', 'lr', 'coslr', 'dtype',
        'learn_schedule'))
    lr_grid = opts['lr_grid'] if opts['lr_grid'] is not None or not learn_schedule else lr
    if lr_grid is not None and not learn_schedule:
        raise UsageError(f'--lr_grid={lr_grid} is the rate of a learned grid: add --learn_schedule=True, or drop it')
    if batch % world:
        raise UsageError(f"--batch={batch} must be divisible by the number of workers ({world})")
    check_solver_options(opts, sigma_min, sigma_max, max_order)          # before the model is built
    net = load_model(cfg, model_path, device, guidance_type, guidance_rate, classifier_path, resolution)
    if loss is None:
        loss = default_loss(cfg, net, model_path)
    kind = predictor_kind(sampler_stu, plugin)
    settings = dict(predictor=kind, dataset_name=cfg['dataset_name'], sampler_stu=sampler_stu, sampler_tea=sampler_tea,
                    num_steps=num_steps, M=M, num_points=num_points if kind == 'epd' else 1, afs=afs,
                    scale_dir=scale_dir, scale_time=scale_time, fcn=fcn, loss=loss, alpha=alpha,
                    schedule_type=schedule_type, schedule_rho=schedule_rho,
                    sigma_min=net.sigma_min if sigma_min is None else sigma_min,
                    sigma_max=net.sigma_max if sigma_max is None else sigma_max,
                    max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                    guidance_type=guidance_type, guidance_rate=guidance_rate,
                    sample_shape=list(net.sample_shape), dtype=dtype)
    if learn_schedule:
        settings['learn_schedule'] = True
    check_solver_options(opts, settings['sigma_min'], settings['sigma_max'], max_order)   # with the model's range
    prompts = None
    if getattr(net, 'prompt_keys', None):
        from models.prompts import load_prompt_source
        prompts = load_prompt_source(prompt_file=prompt_path, dataset_name=cfg['dataset_name'])
    elif prompt_path is not None:
        raise UsageError(f"--prompt_path given, but {cfg['dataset_name']} is not a text-to-image model; drop it")
    if kind == 'amed':
        # The bottleneck's size, from one call on a real (drawn) input.
        with torch.no_grad():
            probe, probe_cond = draw_batch(net, seed, 0, [0], torch.float32, device, prompts)
            _, feature = net(probe, torch.ones(1, device=device), probe_cond, return_bottleneck=True)
        settings['feature_dim'] = int(feature.reshape(1, -1).shape[1])
    feature_net = None
    if loss == 'inception':
        from models.inception import load_inception, missing_detector_message
        path = inception_path or os.environ.get('FID_INCEPTION_PATH')
        if not path or not os.path.isfile(path):
            raise UsageError('--loss=inception needs the Inception-v3 detector, and none is available offline: '
                             + missing_detector_message(path or 'inception-2015-12-05.pkl')
                             + ' (or train with --loss=l2)')
        from models.inception import DetectorError
        try:
            feature_net = load_inception(path, device=device)
        except DetectorError as e:
            raise UsageError(f'--inception_path={path}: {e} (give the Inception-v3 detector, or train with '
                             '--loss=l2 or --loss=rmse)') from None
    nfe = 2 * (num_steps - 1) - int(afs)
    name = f"{cfg['dataset_name']}-{num_steps}-{nfe}-{sampler_stu}-{sampler_tea}-{M}-{schedule_type}" + \
        ('-learned' if learn_schedule else '') + ('-afs' if afs else '') + (f'-{desc}' if desc else '')
    options = dict(settings=settings, batch=batch, batch_gpu=batch_gpu, total_kimg=total_kimg, lr=lr, lr_grid=lr_grid,
                   coslr=coslr, seed=seed, world_size=world, model_path=model_path, classifier_path=classifier_path, resolution=resolution,
                   prompt_path=prompt_path,
                   dataset_config=dataset_name, plugin=plugin)
    if dry_run:
        dist.print0(json.dumps(dict(options, run_dir=os.path.join(outdir, 'NNNNN-' + name)), indent=2))
        return
    if resume is not None:
        run_dir = resume
        with open(os.path.join(run_dir, OPTIONS_FILE)) as f:
            before = json.load(f)
        # The same options must give the same settings; a difference means the model or its config has changed.
        now = json.loads(json.dumps(settings))
        for key in sorted(set(before['settings']) | set(now)):
            if not same_value(before['settings'].get(key), now.get(key)):
                raise UsageError(f"--resume={run_dir}: the run was trained with {key}={before['settings'].get(key)!r}, "
                                 f"which is now {now.get(key)!r} (has the model or its config changed?); start a new "
                                 "run")
    else:
        run_dir = problem = None
        if rank == 0:
            try:
                run_dir = next_run_dir(outdir, name)
            except OSError as e:
                problem = f"cannot create a run folder in --outdir={outdir} ({e.strerror}); choose a writable folder"
        run_dir, problem = dist.broadcast_object((run_dir, problem))    # every worker stops on a problem
        if problem:
            raise UsageError(problem)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if resume is None:
            atomic_write(os.path.join(run_dir, OPTIONS_FILE),
                         json.dumps(dict(options, run_dir=run_dir), indent=2).encode())
    dist.barrier()
    log = Logger(os.path.join(run_dir, 'log.txt'))

    torch_dtype = torch.float64 if dtype == 'float64' else torch.float32
    predictor = training.PREDICTORS[kind](settings, generator=torch.Generator().manual_seed(seed)).to(device)
    if learn_schedule:        # the learned grid starts at the chosen hand-made one
        predictor.start_grid(solvers.get_schedule(num_steps, settings['sigma_min'], settings['sigma_max'],
                                                  schedule_type, schedule_rho, net=net).to(device))
    if lr_grid is None or lr_grid == lr:
        optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    else:                     # the grid in its own group; with --coslr both rates decay to the smaller one / 100
        tables = [q for n, q in predictor.named_parameters() if n != 'schedule_theta']
        optimizer = torch.optim.Adam([dict(params=tables), dict(params=[predictor.schedule_theta], lr=lr_grid)], lr=lr)
    total_iters = max(1, math.ceil(total_kimg * 1000 / batch))
    floor = min(lr, lr if lr_grid is None else lr_grid) * 0.01
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_iters, eta_min=floor) \
        if coslr else None
    start_iter = 0
    state_path, stats_path = os.path.join(run_dir, STATE_FILE), os.path.join(run_dir, STATS_FILE)
    elapsed = 0.0          # seconds already spent on this run (before a resume)
    if resume is not None:
        if os.path.isfile(state_path):
            state = torch.load(state_path, map_location=device, weights_only=True)   # tensors and containers only
            predictor.load_state_dict(state['predictor'])
            optimizer.load_state_dict(state['optimizer'])
            if scheduler is not None and state.get('scheduler'):
                scheduler.load_state_dict(state['scheduler'])
                scheduler.T_max = total_iters     # an extended run stretches the cosine to its new end from here on
            start_iter = int(state['iteration'])
        if start_iter > total_iters:
            raise UsageError(f"--total_kimg={total_kimg} is less than the {start_iter * batch / 1000:g} kimg this run "
                             "has already trained; give a larger --total_kimg or leave it out")
        records = read_stats(stats_path)
        # The time of every iteration run so far (those after the last snapshot included), and the records up to
        # the snapshot only: the iterations after it are trained again.
        elapsed = max([float(r.get('sec', 0)) for r in records] + [0.0])
        if rank == 0:
            kept = ''.join(json.dumps(r) + '\n' for r in records if r.get('iteration', 0) <= start_iter)
            atomic_write(stats_path, kept.encode())
            if total_kimg != before['total_kimg']:
                atomic_write(os.path.join(run_dir, OPTIONS_FILE),
                             json.dumps(dict(before, total_kimg=total_kimg), indent=2).encode())
        dist.barrier()
        log(f'Resuming {run_dir} at iteration {start_iter} of {total_iters} ({elapsed:.1f} s so far)')
    else:
        log(f'Training {kind} ({sampler_stu}, teacher {sampler_tea}, {num_steps} time points, NFE {nfe}) into {run_dir}')

    per_rank = batch // world
    cap = batch_gpu or per_rank
    start = time.time() - elapsed
    for it in range(start_iter, total_iters):
        optimizer.zero_grad(set_to_none=True)
        step_losses = torch.zeros(num_steps - 1, dtype=torch.float64, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for lo in range(0, per_rank, cap):
            idx = list(range(rank * per_rank + lo, rank * per_rank + min(lo + cap, per_rank)))
            latents, cond = draw_batch(net, seed, it, idx, torch_dtype, device, prompts)
            loss_value, per_step = distill_loss(predictor, net, latents, cond, settings, feature_net, batch)
            loss_value.backward()
            step_losses += per_step.to(torch.float64)
            total += loss_value.detach().to(torch.float64)
        # Sum the gradients of the global-batch-normalised loss over workers: the same update as one process.
        for p in predictor.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = torch.nan_to_num(dist.all_reduce_sum(p.grad), nan=0.0, posinf=1e5, neginf=-1e5)
        step_losses = dist.all_reduce_sum(step_losses)
        total = dist.all_reduce_sum(total)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        done = it + 1
        if rank == 0:
            stats = dict(iteration=done, kimg=done * batch / 1000, loss=total.item(),
                         step_losses=[round(v, 8) for v in step_losses.tolist()], lr=optimizer.param_groups[0]['lr'],
                         sec=round(time.time() - start, 3))
            with open(stats_path, 'a') as f:
                f.write(json.dumps(stats) + '\n')
            if done % max(1, total_iters // 20) == 0 or done == total_iters:
                log(f"iter {done}/{total_iters} kimg {stats['kimg']:.3f} loss {stats['loss']:.6g} "
                    f"time {stats['sec']:.1f}s")
            if done % snap == 0 or done == total_iters:
                state = dict(predictor=predictor.state_dict(), optimizer=optimizer.state_dict(), iteration=done,
                             scheduler=scheduler.state_dict() if scheduler is not None else None)
                atomic_write(state_path, lambda f: torch.save(state, f))
                training.save_predictor(predictor, run_dir, progress=(done, total_iters))
        dist.barrier()
    if rank == 0:
        training.save_predictor(predictor, run_dir, progress=(total_iters, total_iters))
        if os.path.isfile(os.path.join(run_dir, 'stats.jsonl')):
            loss_curve(os.path.join(run_dir, 'stats.jsonl'), os.path.join(run_dir, 'loss.png'),
                       title=os.path.basename(run_dir))
        log(f'Done: predictor in {run_dir} ({time.time() - start:.1f} s), loss curve in loss.png')


if __name__ == '__main__':
    main()
