"""Reference predictor pickles (EPD, EPD-Solver++, AMED) as our predictors, read without running code from the file.

The reference repositories save predictors as pickles: distillation snapshots `network-snapshot-NNNNNN.pkl` holding
dict(model=<EPD_predictor or AMED_predictor>, loss_fn=<EPD_loss or AMED_loss>), RL exports and the released SD/FLUX
tables holding dict(model=<EPD_predictor>). Their classes are persistent classes (EDM's `torch_utils.persistence`):
each object is a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` carrying the module source, which
`pickle` would execute. Here the restricted unpickler maps those calls to inert records (models/edm.py), the loss'
references to solver functions to inert names, tensors of any device to CPU, and refuses every other callable.
The tables and settings are then copied into our EPDPredictor / AMEDPredictor (training/predictors.py).

    python -m training.convert_predictor exps/00002-cifar10-4-5-epd-uni1.0-afs/network-snapshot-000010.pkl OUTDIR

writes OUTDIR/predictor.json + predictor.safetensors (atomically: a temporary folder renamed into place).
`sample.py --predictor_path=<the .pkl>` converts in memory and samples directly.
"""
import io
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zipfile

import torch

from models import edm
from models.latent import flow_time_shift
from torch_utils.restricted_pickle import RestrictedUnpickler, UnsafePickleError

PICKLE_SUFFIXES = ('.pkl', '.pickle', '.pt', '.pth')


class ReferencePickleError(ValueError):
    """The file is not a reference predictor this converter can read (one line naming the file and the problem)."""


class FunctionName:
    """A reference to a function of the reference code (the loss' solver_stu / solver_tea): a name, never called."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f'the pickle calls {self.module}.{self.name}; refusing (nothing from it has run)')

    def __repr__(self):
        return f'{self.module}.{self.name}'


_REFERENCE_CLASSES = ('EPD_predictor', 'AMED_predictor', 'Linear', 'PositionalEmbedding', 'EPD_loss', 'AMED_loss')
_SOLVER_MODULES = ('solvers', 'solvers_amed', 'solver_utils')

ALLOWED_GLOBALS = dict(edm.ALLOWED_GLOBALS)
for _name in ('Sigmoid', 'Softmax', 'SiLU', 'Identity'):
    ALLOWED_GLOBALS[('torch.nn.modules.activation', _name)] = edm._module_record_class(_name)
for _name in _REFERENCE_CLASSES:    # the same classes pickled without the persistence wrapper
    ALLOWED_GLOBALS[('training.networks', _name)] = edm._module_record_class(_name)
    ALLOWED_GLOBALS[('training.loss', _name)] = edm._module_record_class(_name)
for _name in ('float16', 'bfloat16', 'float32', 'float64'):
    ALLOWED_GLOBALS[('torch', _name)] = getattr(torch, _name)
ALLOWED_GLOBALS[('torch', 'device')] = lambda *args: ':'.join(str(a) for a in args)   # kept as its name


def _unknown_global(source):
    def unknown(module, name):
        if module in _SOLVER_MODULES and name.isidentifier():
            return FunctionName(module, name)
        raise UnsafePickleError(f'{source} asks to call {module}.{name}, which is not on the allow-list of this '
                                'loader; refusing to load it (nothing from the file has been run)')
    return unknown


def _zip_storages(archive, prefix):
    """persistent_load for torch.save's zip format: storages from the archive, on the CPU whatever their tag."""
    def load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise UnsafePickleError('unexpected persistent id in the archive')
        _, storage_type, key, _location, numel = pid     # the location (e.g. 'cuda:0') is ignored: CPU
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')      # the storage type tags are deprecated classes; only their dtype
            dtype = getattr(storage_type, 'dtype', None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise UnsafePickleError('malformed storage record in the archive')
        data = bytearray(archive.read(f'{prefix}data/{key}'))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
    return load


def read_reference_pickle(path):
    """The pickle's contents as plain data and records (models.edm.PersistentRecord / ModuleRecord)."""
    source = f'predictor pickle {path}'
    try:
        if zipfile.is_zipfile(path):        # torch.save's archive: data.pkl + one file per storage
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith('data.pkl')]
                if not names:
                    raise ReferencePickleError(f'{path} is a zip archive without data.pkl; not a torch.save file')
                prefix = names[0][:-len('data.pkl')]
                unpickler = RestrictedUnpickler(io.BytesIO(archive.read(names[0])), ALLOWED_GLOBALS, source=source,
                                                unknown=_unknown_global(source),
                                                storages=_zip_storages(archive, prefix))
                return unpickler.load()
        with open(path, 'rb') as f:
            return RestrictedUnpickler(f, ALLOWED_GLOBALS, source=source, unknown=_unknown_global(source)).load()
    except UnsafePickleError as e:
        raise ReferencePickleError(f'{e}. The file is not a predictor pickle this loader can read safely.') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, RuntimeError,
            zipfile.BadZipFile) as e:
        if isinstance(e, ReferencePickleError):
            raise
        raise ReferencePickleError(f'{path} is not a readable predictor pickle ({type(e).__name__}: {e}); it may '
                                   'be truncated') from None


def _class_name(record):
    return getattr(record, 'class_name', '').split('.')[-1]


def _plain(value):
    """JSON-able copy of a setting (numpy scalars to Python numbers); None for anything else."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace('torch.', '')
    return None


def _attributes(record):
    """Constructor arguments and plain attributes of a record (attributes win: they are what the object held)."""
    state = record.state
    out = {k: _plain(v) for k, v in dict(state.get('_init_kwargs') or {}).items()}
    for key, value in state.items():
        if not key.startswith('_') and key != 'training':
            plain = _plain(value)
            if plain is not None or value is None:
                out[key] = plain
    return out


def _parameter(record, name, path):
    value = (record.state.get('_parameters') or {}).get(name)
    if not isinstance(value, torch.Tensor):
        raise ReferencePickleError(f'{path}: the predictor has no parameter {name!r}; not a reference '
                                   f'{_class_name(record)} pickle')
    return value.detach().to(torch.float64)


def _child(record, name, path, required=True):
    child = (record.state.get('_modules') or {}).get(name)
    if child is None and required:
        raise ReferencePickleError(f'{path}: the predictor has no submodule {name!r}; not a reference '
                                   f'{_class_name(record)} pickle')
    return child


LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c


def find_records(data, path):
    """(predictor record, loss record or None) of a loaded pickle."""
    if isinstance(data, int) and data == LEGACY_TORCH_MAGIC:
        raise ReferencePickleError(f'{path} is in the legacy torch.save format (before PyTorch 1.6), which this '
                                   'loader does not read; re-save it with torch.save or pickle.dump')
    loss = None
    if isinstance(data, dict):
        loss = data.get('loss_fn')
        for key in ('model', 'predictor', 'student', 'ema'):
            if key in data:
                data = data[key]
                break
        else:
            raise ReferencePickleError(f'{path} holds no predictor (keys: {", ".join(map(str, data))}); expected '
                                       "'model' as in EPD/AMED snapshots")
    if _class_name(data) not in ('EPD_predictor', 'AMED_predictor'):
        what = _class_name(data) or type(data).__name__
        hint = '; it is a model: pass it as --model_path' if what.endswith('Precond') else ''
        raise ReferencePickleError(f'{path} holds a {what}, not an EPD_predictor or AMED_predictor{hint}')
    return data, (loss if _class_name(loss) in ('EPD_loss', 'AMED_loss') else None)


# -- where each reference dataset lives here ------------------------------------------------------------------

def _ve(t):
    return t / (1 - t)


SD3_SHIFT, FLUX_SHIFT, TRAIN_STEPS = 3.0, math.exp(1.15), 1000


def flow_sigma_range(backend):
    """(sigma_min, sigma_max) in VE units of the reference's flow-matching grids. Both end where the reference's
    diffusers scheduler ends: SD3 at shift(shift(1/1000)) (set_timesteps re-shifts the already shifted last time),
    FLUX at its dynamic shift of 1/1000. The reference starts at flow time 1 (pure noise), sigma = inf; here the
    grid starts at the model's largest time shift(1 - 1/1000), as the models in models/latent.py do."""
    shift = SD3_SHIFT if backend == 'sd3' else FLUX_SHIFT
    t_max = flow_time_shift(1 - 1 / TRAIN_STEPS, shift)
    t_min = flow_time_shift(1 / TRAIN_STEPS, shift)
    if backend == 'sd3':
        t_min = flow_time_shift(t_min, shift)
    return _ve(t_min), _ve(t_max)


# dataset_name of the reference -> (our config, sample shape, sigma range of the reference's model)
REFERENCE_DATASETS = {
    'cifar10': ('cifar10', [3, 32, 32], (0.002, 80.0)),
    'ffhq': ('ffhq', [3, 64, 64], (0.002, 80.0)),
    'afhqv2': ('afhqv2', [3, 64, 64], (0.002, 80.0)),
    'imagenet64': ('imagenet64', [3, 64, 64], (0.002, 80.0)),
    'lsun_bedroom': ('lsun_bedroom', [3, 256, 256], (0.002, 80.0)),
    'imagenet256': ('imagenet256', [3, 256, 256], (0.010486, 152.17)),
    'lsun_bedroom_ldm': ('lsun_bedroom_ldm', [3, 64, 64], (0.03876, 83.8225)),
    'ms_coco': ('ms_coco', [4, 64, 64], (0.02917, 14.6146)),
}


def _placement(attrs, path):
    """(config, sample_shape, sigma_min, sigma_max, ode_space, guidance_type, guidance_rate)."""
    dataset = attrs.get('dataset_name')
    backend = attrs.get('backend') or 'ldm'
    guidance_type, guidance_rate = attrs.get('guidance_type'), attrs.get('guidance_rate')
    if backend in ('sd3', 'flux'):
        resolution = (attrs.get('backend_config') or {}).get('resolution') or attrs.get('img_resolution') or 1024
        if backend == 'sd3' and resolution not in (512, 1024):
            raise ReferencePickleError(f'{path}: SD3 predictor for resolution {resolution}; only 512 and 1024 exist')
        config = f'sd3_{resolution}' if backend == 'sd3' else 'flux'
        latent = resolution // 8
        if backend == 'flux':        # guidance-distilled: the rate goes into the model's guidance embedding
            guidance_type = 'embedded'
        return (config, [16, latent, latent], *flow_sigma_range(backend), 'flow', guidance_type, guidance_rate)
    if dataset not in REFERENCE_DATASETS:
        raise ReferencePickleError(f'{path}: reference dataset {dataset!r} has no counterpart here; known: '
                                   f'{", ".join(REFERENCE_DATASETS)}')
    config, shape, (sigma_min, sigma_max) = REFERENCE_DATASETS[dataset]
    sigma_min = attrs.get('sigma_min') or sigma_min     # RL exports record their range
    sigma_max = attrs.get('sigma_max') or sigma_max
    return config, shape, sigma_min, sigma_max, 've', guidance_type, guidance_rate


def reference_time_uniform(num_steps, sigma_min, sigma_max, rho=1.0, eps_s=1e-3):
    """The time_uniform grid as the reference computes it: in float32 on the CPU (its stored CIFAR-10 N = 4 grid is
    80, 6.950278, 1.286681, 0.0020132; float64 gives 80, 6.95024, 1.28667, 0.002). The learned tables are tied to
    this grid. Returned as float64 values of the float32 results."""
    f = lambda v: torch.tensor(v, dtype=torch.float32)
    lmax, lmin = torch.log(f(sigma_max) ** 2 + 1), torch.log(f(sigma_min) ** 2 + 1)
    beta_d = 2 * (lmin / eps_s - lmax) / (eps_s - 1)
    beta_min = lmax - 0.5 * beta_d
    u = torch.arange(num_steps, dtype=torch.float32) / (num_steps - 1)
    tau = (1 + u * (eps_s ** (1 / rho) - 1)) ** rho
    # exp(x) - 1 of x ~ 4e-6 in float32 keeps about 1.5 digits of sigma_min: 0.0020132 instead of 0.002. Torch's
    # float32 exp is the reference's; another library's exp may round one ulp apart (sigma_min 1.5% apart).
    sigmas = torch.sqrt(torch.exp(0.5 * beta_d * tau ** 2 + beta_min * tau) - 1)
    return [float(v) for v in sigmas]


def _common_settings(attrs, loss, path):
    config, shape, sigma_min, sigma_max, space, guidance_type, guidance_rate = _placement(attrs, path)
    settings = dict(dataset_name=configs_dataset(config), config=config, sampler_stu=attrs.get('sampler_stu'),
                    sampler_tea=attrs.get('sampler_tea'), num_steps=attrs.get('num_steps'), M=attrs.get('M'),
                    afs=bool(attrs.get('afs', False)), schedule_type=attrs.get('schedule_type'),
                    schedule_rho=float(attrs.get('schedule_rho') or 1.0), sigma_min=float(sigma_min),
                    sigma_max=float(sigma_max), max_order=attrs.get('max_order'),
                    predict_x0=bool(attrs.get('predict_x0', True)),
                    lower_order_final=bool(attrs.get('lower_order_final', True)),
                    guidance_type=guidance_type, guidance_rate=guidance_rate if guidance_type else None,
                    sample_shape=shape, dtype='float32')
    if space != 've':
        settings['ode_space'] = space
    if settings['afs']:
        settings['afs_formula'] = 'reference'      # x / sqrt(1 + sigma^2) and a zero feature (predictors.py)
    grid = loss.state.get('t_steps') if loss is not None else None
    if isinstance(grid, torch.Tensor) and grid.numel() == settings['num_steps'] and space == 've':
        # The grid the table was trained on, as the reference computed it (time_uniform in float32).
        settings['t_steps'] = [float(v) for v in grid.detach().to(torch.float64).flatten()]
    elif settings['schedule_type'] == 'time_uniform':
        # No stored grid: the one the reference's sampler computes (float32: its last point is not sigma_min).
        settings['t_steps'] = reference_time_uniform(settings['num_steps'], settings['sigma_min'],
                                                     settings['sigma_max'], settings['schedule_rho'])
    if 't_steps' in settings:
        settings['sigma_max'], settings['sigma_min'] = settings['t_steps'][0], settings['t_steps'][-1]
    if settings['sampler_stu'] is None or not settings['num_steps'] or settings['schedule_type'] is None:
        raise ReferencePickleError(f'{path}: the predictor lacks sampler_stu/num_steps/schedule_type; not a '
                                   'reference predictor pickle')
    return settings


def configs_dataset(config):
    import configs
    return configs.load_config(config)['dataset_name']


def _epd(record, loss, path):
    from training.predictors import EPDPredictor
    attrs = _attributes(record)
    tables = {ours: _parameter(record, theirs, path) for ours, theirs in (
        ('r_params', 'r_params'), ('scale_dir_params', 'scale_dir_params'),
        ('scale_time_params', 'scale_time_params'), ('weight_params', 'weight_s'))}
    steps, K = tables['r_params'].shape
    attrs.setdefault('num_steps', steps + 1)
    settings = _common_settings(attrs, loss, path)
    if steps != settings['num_steps'] - 1 or any(t.shape != (steps, K) for t in tables.values()):
        raise ReferencePickleError(f'{path}: tables of shape {tuple(tables["r_params"].shape)} do not fit '
                                   f'num_steps={settings["num_steps"]}')
    if settings['sampler_stu'] not in ('epd', 'ipndm'):
        raise ReferencePickleError(f"{path}: EPD predictor with sampler_stu={settings['sampler_stu']!r}; "
                                   "known: epd, ipndm")
    settings.update(predictor='epd', num_points=int(attrs.get('num_points') or K),
                    scale_dir=float(attrs.get('scale_dir') or 0), scale_time=float(attrs.get('scale_time') or 0),
                    fcn=bool(attrs.get('fcn', False)), alpha=attrs.get('alpha'), loss='inception',
                    max_order=settings['max_order'] or 3)
    predictor = EPDPredictor({k: v for k, v in settings.items() if k != 'predictor'})
    predictor.load_state_dict(tables)
    return predictor


def _linear(record, name, path, required=True):
    child = _child(record, name, path, required)
    if child is None:
        return None
    weight = _parameter(child, 'weight', f'{path}.{name}')
    bias = (child.state.get('_parameters') or {}).get('bias')
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    return weight, bias


def _amed(record, loss, path):
    from training.predictors import AMEDPredictor
    attrs = _attributes(record)
    settings = _common_settings(attrs, loss, path)
    if 'scale_dir' in attrs:
        scale_dir, scale_time = float(attrs.get('scale_dir') or 0), float(attrs.get('scale_time') or 0)
    else:   # the first release: fixed ranges, scale_time a switch
        scale_dir = 0.05 if settings['sampler_stu'] == 'dpmpp' and settings['predict_x0'] else 0.01
        scale_time = 0.2 if attrs.get('scale_time') else 0.0
    enc0, enc1 = _linear(record, 'enc_layer0', path), _linear(record, 'enc_layer1', path)
    time, fc_r = _linear(record, 'map_layer0', path), _linear(record, 'fc_r', path)
    fc_c, fc_a = _linear(record, 'fc_scale_dir', path, False), _linear(record, 'fc_scale_time', path, False)
    if time[0].shape != (8, 8) or enc1[0].shape[0] != 4 or fc_r[0].shape != (1, 20):
        raise ReferencePickleError(f'{path}: AMED predictor with noise_channels/bottleneck_output_dim/output_dim '
                                   'other than 8/4/1; only the released architecture converts')
    settings.update(predictor='amed', num_points=1, scale_dir=scale_dir, scale_time=scale_time,
                    feature_dim=int(enc0[0].shape[1]), hidden_dim=int(enc0[0].shape[0]), time_embedding='sigma',
                    loss='l2', fcn=False)
    predictor = AMEDPredictor({k: v for k, v in settings.items() if k != 'predictor'})
    # Our single head Linear(20, 3) holds the reference's heads fc_r, fc_scale_dir, fc_scale_time as rows; a head
    # the reference lacks (its scale is 0, so its output is never read) is a zero row.
    zero = (torch.zeros(1, 20, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    heads = [fc_r, fc_c if scale_dir else zero, fc_a if scale_time else zero]
    state = {'feature_net.0.weight': enc0[0], 'feature_net.0.bias': enc0[1],
             'feature_net.2.weight': enc1[0], 'feature_net.2.bias': enc1[1],
             'time_net.weight': time[0], 'time_net.bias': time[1],
             'head.weight': torch.cat([h[0] for h in heads]), 'head.bias': torch.cat([h[1] for h in heads])}
    predictor.load_state_dict(state)
    return predictor


def load_reference_predictor(path):
    """A reference EPD/AMED predictor pickle as our predictor (eval mode, no gradients)."""
    path = str(path)
    record, loss = find_records(read_reference_pickle(path), path)
    try:
        predictor = (_epd if _class_name(record) == 'EPD_predictor' else _amed)(record, loss, path)
    except (KeyError, RuntimeError, TypeError) as e:
        raise ReferencePickleError(f'{path}: cannot build our predictor from it ({type(e).__name__}: '
                                   f'{str(e).splitlines()[0]})') from None
    predictor.settings['source'] = dict(file=os.path.basename(path), reference_class=_class_name(record))
    predictor.progress = None
    return predictor.eval().requires_grad_(False)


def reference_pickle_in(folder):
    """The reference's choice of snapshot in an experiment folder (export/ first, then the latest step), or None."""
    def step(name):
        digits = os.path.splitext(name)[0].rsplit('-', 1)[-1].lstrip('step')
        return int(digits) if digits.isdigit() else -1
    for sub, prefix in (('export', 'network-snapshot-export-'), ('', 'network-snapshot-export-'),
                        ('', 'network-snapshot-')):
        where = os.path.join(folder, sub)
        if os.path.isdir(where):
            found = [n for n in os.listdir(where) if n.startswith(prefix) and n.endswith('.pkl')]
            if found:
                return os.path.join(where, max(found, key=step))
    return None


def write_predictor_folder(predictor, outdir, replace=False):
    """Save a predictor as a folder that appears complete or not at all: written into a temporary folder beside
    it, then renamed into place. An existing non-empty outdir is refused, or with replace=True swapped out."""
    import training
    outdir = os.path.abspath(outdir)
    exists = os.path.exists(outdir) and (not os.path.isdir(outdir) or os.listdir(outdir))
    if exists and not replace:
        raise ReferencePickleError(f'{outdir} already exists; choose a new folder for the converted predictor')
    parent = os.path.dirname(outdir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(outdir) + '.')
    except OSError as e:
        raise ReferencePickleError(f'cannot write into {parent} ({e.strerror}); choose a writable folder') from None
    old = None
    try:
        training.save_predictor(predictor, tmp)
        if exists:
            old = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(outdir) + '.old.')
            os.rename(outdir, os.path.join(old, 'previous'))
        elif os.path.isdir(outdir):
            os.rmdir(outdir)
        os.rename(tmp, outdir)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return outdir


def convert(src, outdir):
    """Write the converted predictor folder; refuses an existing non-empty outdir. Returns the predictor."""
    predictor = load_reference_predictor(src)
    write_predictor_folder(predictor, outdir)
    return predictor


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ('-h', '--help'):
        print('usage: python -m training.convert_predictor REFERENCE.pkl OUTDIR', file=sys.stderr)
        return 2
    src, outdir = argv
    if os.path.isdir(src):
        found = reference_pickle_in(src)
        if found is None:
            print(f'error: {src} holds no network-snapshot-*.pkl; give the pickle file', file=sys.stderr)
            return 1
        src = found
    elif not os.path.isfile(src):
        print(f'error: {src}: no such file; give a reference predictor pickle', file=sys.stderr)
        return 1
    try:
        predictor = convert(src, outdir)
    except ReferencePickleError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    s = predictor.settings
    print(json.dumps(dict(outdir=outdir, predictor=predictor.kind, config=s['config'], num_steps=s['num_steps'],
                          nfe=predictor.nfe(), solver=s['sampler_stu'], schedule_type=s['schedule_type'])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
