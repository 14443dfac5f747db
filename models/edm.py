"""NVIDIA EDM checkpoints (edm-*.pkl) as denoisers, read without running code from the file.

EDM's pickles are written by `torch_utils.persistence`: every network object is stored as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` whose `meta` holds the source code of the module
that defined the class (`module_src`), the `class_name` and the object's `state` (its `__dict__`: parameters,
buffers, submodules, and the constructor arguments `_init_args` / `_init_kwargs`). Loading it with `pickle`
would `exec` that source. Here the unpickler maps that call to an inert `PersistentRecord`; the network is then
rebuilt from our own classes (`models.edm_networks`) with the recorded constructor arguments, and the recorded
parameters and buffers are loaded into it strictly. `module_src` is never executed.

`save_persistence_pickle` writes a network of ours in the same structure (used by the tests, and handy to
produce EDM-format files from our classes).
"""
import copy
import inspect
import io
import os
import pickle

import numpy as np
import torch

from models import ModelError
from models.base import Denoiser
from models import edm_networks
from torch_utils.download import open_model_file
from torch_utils.restricted_pickle import TORCH_TENSOR_GLOBALS, UnsafePickleError, restricted_load

PERSISTENCE_VERSION = 6


class PersistentRecord:
    """What a persistent object of the pickle holds: class name, state, and the (unused) module source."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('class_name'), str):
            raise UnsafePickleError('malformed persistent object in the pickle')
        if meta.get('version') != PERSISTENCE_VERSION:
            raise UnsafePickleError(f"persistent object has version {meta.get('version')}, "
                                    f"expected {PERSISTENCE_VERSION}")
        self.class_name = meta['class_name']
        self.state = meta.get('state') or {}
        self.module_src = meta.get('module_src')

    def __repr__(self):
        return f'PersistentRecord({self.class_name})'


class ModuleRecord:
    """A plain torch module inside the pickle (e.g. torch.nn.ModuleDict): its state, nothing else."""

    class_name = 'torch.nn.Module'

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'ModuleRecord({self.class_name})'


def _module_record_class(name):
    return type(f'{name}Record', (ModuleRecord,), {'class_name': name})


class EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor restricted to the record classes above.
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)) or base is not object or state is not None:
        raise UnsafePickleError('copyreg._reconstructor used on a class outside the allow-list')
    return cls.__new__(cls)


def _numpy_dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec)
    if dtype.kind not in 'biufc':
        raise UnsafePickleError(f'numpy dtype {spec!r} is not numeric')
    return dtype


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes):
        raise UnsafePickleError('malformed numpy scalar in the pickle')
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_array(dtype, data, shape):
    # numpy.core.multiarray._reconstruct is not used: ndarrays are rebuilt only from raw bytes we check.
    raise UnsafePickleError('numpy arrays inside an EDM network are not expected')


_TORCH_MODULES = ['ModuleDict', 'ModuleList', 'Sequential', 'Identity', 'SiLU', 'Dropout']
_TORCH_MODULE_PATHS = {'ModuleDict': 'container', 'ModuleList': 'container', 'Sequential': 'container',
                       'Identity': 'linear', 'SiLU': 'activation', 'Dropout': 'dropout'}

ALLOWED_GLOBALS = dict(TORCH_TENSOR_GLOBALS)
ALLOWED_GLOBALS.update({
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): PersistentRecord,
    ('copyreg', '_reconstructor'): _reconstructor,
    ('builtins', 'object'): object,
    ('__builtin__', 'object'): object,
    ('dnnlib.util', 'EasyDict'): EasyDict,
    ('dnnlib', 'EasyDict'): EasyDict,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
})
for _name in _TORCH_MODULES:
    ALLOWED_GLOBALS[('torch.nn.modules.' + _TORCH_MODULE_PATHS[_name], _name)] = _module_record_class(_name)


def read_persistence_pickle(path):
    """Unpickle an EDM pickle into plain data and records; refuses any callable outside ALLOWED_GLOBALS."""
    with open(path, 'rb') as f:
        try:
            return restricted_load(f, ALLOWED_GLOBALS, source=f'EDM pickle {path}')
        except UnsafePickleError as e:
            raise ModelError(f'{e}. The file is not an EDM network pickle this loader can read safely.') from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ModelError(f'{path} is not a readable EDM pickle ({type(e).__name__}: {e})') from None


def _record_state_dict(record, prefix='', out=None):
    """Parameters and persistent buffers of a record tree, keyed as in `state_dict()`."""
    out = {} if out is None else out
    state = record.state
    for name, value in (state.get('_parameters') or {}).items():
        if value is not None:
            out[prefix + name] = value
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, value in (state.get('_buffers') or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _record_state_dict(child, prefix + name + '.', out)
    return out


def _check_structure(record, module, path='net'):
    """Each record must describe the class we built at that place, with the same plain attributes."""
    name = record.class_name.split('.')[-1]
    if name != type(module).__name__:
        raise ModelError(f'EDM pickle has {record.class_name} at {path} where our network has '
                         f'{type(module).__name__}; the checkpoint does not match these network classes')
    for key, value in record.state.items():
        if key.startswith('_') or key == 'training' or not isinstance(value, (bool, int, float, str)):
            continue
        ours = module.__dict__.get(key)
        if ours is not None and not (ours == value or (isinstance(value, float) and np.isnan(value))):
            raise ModelError(f'EDM pickle has {path}.{key} = {value!r}, our rebuilt network has {ours!r}')
    children = record.state.get('_modules') or {}
    for key, child in children.items():
        if child is None:
            continue
        ours = module._modules.get(key)
        if ours is None:
            raise ModelError(f'EDM pickle has a submodule {path}.{key} that our network lacks')
        _check_structure(child, ours, f'{path}.{key}')


def build_network(record):
    """Our preconditioner + U-Net rebuilt from a persistent record of one (NVIDIA's or ours)."""
    if not isinstance(record, PersistentRecord):
        raise ModelError(f'expected a persistent network object, found {type(record).__name__}')
    cls = edm_networks.PRECONDITIONERS.get(record.class_name)
    if cls is None:
        raise ModelError(f'EDM pickle holds a {record.class_name!r}; supported: '
                         f'{", ".join(edm_networks.PRECONDITIONERS)}')
    args = tuple(record.state.get('_init_args') or ())
    kwargs = dict(record.state.get('_init_kwargs') or {})
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG intact
            net = cls(*args, **kwargs)
    except TypeError as e:
        raise ModelError(f'cannot rebuild {record.class_name} from the arguments stored in the pickle ({e})')
    _check_structure(record, net)
    state = _record_state_dict(record)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f'EDM pickle weights do not fit the rebuilt {record.class_name}: {e}') from None
    return net.eval().requires_grad_(False)


def load_network(path):
    """The 'ema' network of an EDM snapshot/pickle, as our classes."""
    data = read_persistence_pickle(path)
    if isinstance(data, dict):
        for key in ('ema', 'net', 'model'):
            if key in data:
                return build_network(data[key])
        raise ModelError(f'EDM pickle {path} has no "ema" network (keys: {", ".join(map(str, data))})')
    return build_network(data)


class EDMDenoiser(Denoiser):
    """An EDM preconditioner (network included) under the denoiser protocol."""

    def __init__(self, net, sigma_min=None, sigma_max=None):
        super().__init__()
        self.net = net
        self.sigma_min = float(net.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(net.sigma_max if sigma_max is None else sigma_max)
        self.sample_shape = (net.img_channels, net.img_resolution, net.img_resolution)
        self.label_dim = int(net.label_dim)
        if isinstance(net, edm_networks.iDDPMPrecond):
            self.sigma_table = net.u[:net.M].flip(0).clone()  # u_{M-1} < ... < u_0

    def denoise(self, x, sigma, cond=None):
        D, bottleneck = self.net(x, sigma, class_labels=cond, return_bottleneck=True)
        return D.to(x.dtype), bottleneck.to(x.dtype).mean(dim=1).flatten(1)

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def export_spec(self):
        """(JSON-able description, state dict) for models.convert."""
        spec = dict(family='edm', class_name=type(self.net).__name__, init_kwargs=_jsonable(self.net.init_kwargs),
                    sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        return spec, self.net.state_dict()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def from_spec(spec, state_dict, sigma_min=None, sigma_max=None, **unused):
    """Rebuild an EDMDenoiser from models.convert's JSON and weights."""
    cls = edm_networks.PRECONDITIONERS.get(spec.get('class_name'))
    if cls is None:
        raise ModelError(f"converted EDM model names an unknown class {spec.get('class_name')!r}")
    with torch.random.fork_rng(devices=[]):
        net = cls(**spec['init_kwargs'])
    net.load_state_dict(state_dict, strict=True)
    net.eval().requires_grad_(False)
    return EDMDenoiser(net, sigma_min=spec.get('sigma_min') if sigma_min is None else sigma_min,
                       sigma_max=spec.get('sigma_max') if sigma_max is None else sigma_max)


def load(model_path, sigma_min=None, sigma_max=None, cache_dir=None, **config):
    """Family 'edm': an NVIDIA EDM pickle (local path or URL). sigma_min/max override the native range."""
    from models import check_model_options
    check_model_options('edm', config, ('sigma_min', 'sigma_max'))
    path = open_model_file(model_path, cache_dir=cache_dir)
    return EDMDenoiser(load_network(path), sigma_min=sigma_min, sigma_max=sigma_max)


# ---------------------------------------------------------------------------------------------------------
# Writing: our networks in the structure of EDM's persistence pickles.

class _Global:
    """Pickled as a reference to module.name, without that module having to exist here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError('only a reference to be pickled')

    def __reduce__(self):
        return self.name  # makes the pickler call save_global, which _PersistencePickler overrides


class _PersistencePickler(pickle._Pickler):
    """Pure-python pickler that stores our network modules as EDM persistent objects."""

    def __init__(self, file, module_src, protocol=4):
        super().__init__(file, protocol=protocol)
        self.module_src = module_src

    def save_global(self, obj, name=None):
        if isinstance(obj, _Global):
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def reducer_override(self, obj):
        if isinstance(obj, edm_networks._RecordsInitKwargs):
            meta = dict(type='class', version=PERSISTENCE_VERSION, module_src=self.module_src,
                        class_name=type(obj).__name__, state=dict(obj.__dict__))
            return _Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (meta,)
        if isinstance(obj, _PersistentStandIn):
            meta = dict(type='class', version=PERSISTENCE_VERSION, module_src=obj.module_src,
                        class_name=obj.class_name, state=dict(obj.state))
            return _Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (meta,)
        if type(obj) is EasyDict:
            return _Global('dnnlib.util', 'EasyDict'), (), None, None, iter(obj.items())
        return NotImplemented


class _PersistentStandIn:
    """A non-network persistent object (loss function, augment pipe) to put beside the network."""

    def __init__(self, class_name, state, module_src=''):
        self.class_name, self.state, self.module_src = class_name, state, module_src


def save_persistence_pickle(path, net, loss_state=None, dataset_kwargs=None):
    """Write `net` (one of our preconditioners) as an EDM snapshot: dict(ema, loss_fn, augment_pipe,
    dataset_kwargs), the network stored through persistent objects carrying module source."""
    net = copy.deepcopy(net).eval().requires_grad_(False).cpu()
    module_src = inspect.getsource(edm_networks)
    loss_fn = _PersistentStandIn('EDMLoss', loss_state or dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                                 module_src='# training/loss.py\n')
    data = dict(ema=net, loss_fn=loss_fn, augment_pipe=None,
                dataset_kwargs=EasyDict(dataset_kwargs or dict(class_name='training.dataset.ImageFolderDataset')))
    buffer = io.BytesIO()
    _PersistencePickler(buffer, module_src).dump(data)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)
