"""The reference repositories' released EPD tables whose every number is published, as predictor folders in exps/.

The numbers are those decoded from the released predictor pickles (EPD-Solver, ICCV 2025: CIFAR-10 runs 00001,
00002 and 00018 of the `EPD-Solver` branch of BeierZhu/EPD; EPD-Solver++ / RDPO: the SD3-Medium-1024, SD1.5 and
FLUX.1-dev tables of its default branch), transcribed below as data with the rounding of that record (4-5
significant digits). Tables that were only summarised there (the SD1.5 distilled table, the SD3-512 ones) are not
shipped. Each folder records the reference's settings: solver, teacher, steps, schedule, AFS, scale ranges,
guidance, and the model config here that runs it.

    python -m training.reference_tables [--outdir=exps]

rewrites exps/ref-*/ from this file (each folder atomically). Settings that differ from the reference's run are
named in exps/README.md.
"""
import os
import sys

import torch

from training.convert_predictor import flow_sigma_range, reference_time_uniform, write_predictor_folder
from training.predictors import EPDPredictor

EPD_ICCV = 'EPD-Solver (ICCV 2025), branch EPD-Solver of BeierZhu/EPD'
EPD_PP = 'EPD-Solver++ / RDPO (TPAMI), default branch of BeierZhu/EPD'


def _cifar(num_steps, sampler_stu, sampler_tea, scale_time, run):
    grid = reference_time_uniform(num_steps, 0.002, 80.0)
    return dict(dataset_name='cifar10', config='cifar10', sampler_stu=sampler_stu, sampler_tea=sampler_tea, M=3,
                num_steps=num_steps, num_points=2, afs=True, afs_formula='reference', scale_dir=0.05,
                scale_time=scale_time, fcn=False, loss='inception', alpha=10, schedule_type='time_uniform',
                schedule_rho=1.0, sigma_min=grid[-1], sigma_max=grid[0], t_steps=grid, max_order=3,
                predict_x0=True, lower_order_final=True, guidance_type=None, guidance_rate=None,
                sample_shape=[3, 32, 32], dtype='float32', source=dict(reference=EPD_ICCV, run=run))


def _text(config, num_steps, schedule_type, guidance_type, guidance_rate, shape, sigma_range, table):
    flow = schedule_type == 'flowmatch'
    settings = dict(dataset_name='ms_coco', config=config, sampler_stu='epd', sampler_tea='dpm', M=1,
                    num_steps=num_steps, num_points=2, afs=False, scale_dir=0.0, scale_time=0.0, fcn=False,
                    loss='rdpo', alpha=10, schedule_type=schedule_type, schedule_rho=1.0,
                    sigma_min=sigma_range[0], sigma_max=sigma_range[1], max_order=2, predict_x0=False,
                    lower_order_final=True, guidance_type=guidance_type, guidance_rate=guidance_rate,
                    sample_shape=shape, dtype='float32', source=dict(reference=EPD_PP, table=table))
    if flow:
        settings['ode_space'] = 'flow'
    return settings


def _pairs(w1):
    return [[w, 1 - w] for w in w1]


def sd15_sigma_range():
    """The ends of SD1.5's discrete sigma table (scaled-linear betas 0.00085 .. 0.012, 1000 steps): 0.02917, 14.61."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas) / alphas).sqrt()
    return float(sigmas[0]), float(sigmas[-1])


SD3_RANGE, FLUX_RANGE, SD15_RANGE = flow_sigma_range('sd3'), flow_sigma_range('flux'), sd15_sigma_range()

# name -> settings and the published values: r (position in log sigma, or log t for flow tables), w (weights),
# c (direction scale), a (time scale); rows are steps, pairs the K = 2 points.
TABLES = {
    'ref-cifar10-epd-nfe3': dict(
        settings=_cifar(3, 'epd', 'heun', 0.05, '00001 (EPD-Solver, 3 NFE; teacher heun M=3)'),
        r=[[0.01339, 0.67921], [0.10020, 0.28855]],
        w=[[0.85185, 0.14815], [0.75008, 0.24992]],
        c=[[0.99731, 0.99754], [0.99500, 1.02139]],
        a=[[0.96349, 0.95231], [1.03590, 0.95457]]),
    'ref-cifar10-epd-nfe5': dict(
        settings=_cifar(4, 'epd', 'heun', 0.05, '00002 (EPD-Solver, 5 NFE; teacher heun M=3)'),
        r=[[0.03333, 0.79558], [0.07587, 0.63244], [0.38699, 0.09434]],
        w=[[0.86941, 0.13059], [0.41741, 0.58259], [0.22410, 0.77590]],
        c=[[0.99735, 0.98616], [0.99400, 1.00711], [1.00299, 0.99999]],
        a=[[0.95415, 0.95376], [1.04503, 1.04331], [0.95588, 1.01795]]),
    'ref-cifar10-epd-plugin-nfe5': dict(
        settings=_cifar(4, 'ipndm', 'dpm', 0.2, '00018 (EPD-Plugin on iPNDM, 5 NFE; teacher dpm M=3)'),
        r=[[0.10548, 0.96750], [0.04114, 0.57891], [0.27989, 0.05394]],
        w=[[0.95656, 0.04344], [0.52907, 0.47093], [0.26331, 0.73669]],
        c=[[0.99606, 1.00082], [1.00480, 1.02490], [0.95600, 0.98523]],
        a=[[0.80808, 0.89210], [1.03816, 1.02063], [1.00150, 1.02182]]),
    'ref-sd3-1024-epd-distilled': dict(
        settings=_text('sd3_1024', 11, 'flowmatch', 'cfg', 4.5, [16, 128, 128], SD3_RANGE,
                       'exps/sd3-1024/sd3-1024-distilled.pkl (distillation)'),
        r=[[.4026, .7317], [.2978, .6242], [.4628, .7728], [.4579, .7398], [.4432, .7668], [.3246, .6270],
           [.4304, .7471], [.4272, .6838], [.2532, .6309], [.1625, .4086]],
        w=_pairs([.4975, .4102, .5546, .5550, .5725, .4915, .4075, .4854, .4201, .5972])),
    'ref-sd3-1024-epd-rl-best': dict(
        settings=_text('sd3_1024', 11, 'flowmatch', 'cfg', 4.5, [16, 128, 128], SD3_RANGE,
                       'exps/sd3-1024/, the RL-best table'),
        r=[[.3176, .7630], [.5061, .7378], [.4244, .8155], [.2335, .7226], [.6506, .8253], [.3200, .7740],
           [.5625, .7890], [.5750, .7348], [.2240, .6967], [.1494, .3596]],
        w=_pairs([.4398, .3391, .1227, .0647, .3320, .4205, .6472, .1999, .4196, .9154])),
    'ref-sd15-epd-rl-best': dict(
        settings=_text('ms_coco', 11, 'discrete', 'cfg', 7.5, [4, 64, 64], SD15_RANGE, 'exps/sd15/, the RL-best table'),
        r=[[.1527, .6174], [.3155, .6552], [.1789, .7312], [.7170, .8688], [.7039, .7982], [.1881, .8929],
           [.4221, .7753], [.2924, .8053], [.4910, .8393], [.2692, .5522]],
        w=_pairs([.8919, .6976, .6353, .0842, .0618, .5654, .4210, .2695, .1363, .9160])),
    'ref-flux-epd-rl-best': dict(
        settings=_text('flux', 9, 'flowmatch', 'embedded', 3.5, [16, 128, 128], FLUX_RANGE,
                       'exps/flux/, the RL-best table'),
        r=[[.1713, .3654], [.4058, .8054], [.4132, .9257], [.5036, .7139], [.1460, .3339], [.4282, .6624],
           [.4147, .7276], [.0823, .1852]],
        w=_pairs([.6495, .5147, .3649, .3458, .6835, .3921, .5060, .7026])),
}


def _logit(p):
    return torch.log(p) - torch.log1p(-p)


def build(name):
    """Our EPDPredictor holding TABLES[name]: raw parameters by the inverse maps of the tables."""
    spec = TABLES[name]
    settings = dict(spec['settings'])
    predictor = EPDPredictor(settings)
    t = lambda key: torch.tensor(spec[key], dtype=torch.float64)
    steps, K = settings['num_steps'] - 1, settings['num_points']
    for key in ('r', 'w') + (('c', 'a') if 'c' in spec else ()):
        if t(key).shape != (steps, K):
            raise ValueError(f'{name}: table {key} has shape {tuple(t(key).shape)}, expected {(steps, K)}')
    with torch.no_grad():
        predictor.r_params.copy_(_logit(t('r')))
        predictor.weight_params.copy_(torch.log(t('w')))
        for key, param, scale in (('c', predictor.scale_dir_params, settings['scale_dir']),
                                  ('a', predictor.scale_time_params, settings['scale_time'])):
            if scale:
                param.copy_(2 * _logit((t(key) - (1 - scale)) / (2 * scale)))
            else:
                param.zero_()
    return predictor


def write_all(outdir='exps'):
    written = []
    for name in TABLES:
        written.append(write_predictor_folder(build(name), os.path.join(outdir, name), replace=True))
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    outdir = 'exps'
    for arg in argv:
        if arg.startswith('--outdir='):
            outdir = arg.split('=', 1)[1]
        else:
            print(f'usage: python -m training.reference_tables [--outdir=DIR]  (unknown argument {arg!r})',
                  file=sys.stderr)
            return 2
    for folder in write_all(outdir):
        print(folder)
    return 0


if __name__ == '__main__':
    sys.exit(main())
