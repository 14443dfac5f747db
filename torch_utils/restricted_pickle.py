"""Unpickling that never runs code from the file.

A pickle names the callables it wants called on load as (module, name) pairs. `RestrictedUnpickler` resolves
each pair through an allow-list that maps it to an object of ours; any other pair is refused with
`UnsafePickleError` before anything is called, so a file cannot reach `os.system`, `builtins.eval`, `exec`
or any other callable we did not list.

`TORCH_TENSOR_GLOBALS` is the allow-list for tensors and parameters as written by plain `pickle.dump` in
every PyTorch version we know of (storages as `torch.save` bytes, read back with `weights_only=True`).
"""
import collections
import io
import pickle
import warnings

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a callable outside the allow-list; nothing from it has been run."""


def _load_storage_from_bytes(data):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False): read the same bytes safely.
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('tensor storage payload is not bytes')
    return torch.load(io.BytesIO(data), weights_only=True, map_location='cpu')


def _check_hooks(hooks):
    if hooks:
        raise UnsafePickleError('tensor carries backward hooks; refusing to attach objects from the file')


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'tensor storage has unexpected type {type(storage).__name__}')
    _check_hooks(backward_hooks)
    if isinstance(storage, torch.storage.TypedStorage):
        tensor = torch.empty((0,), dtype=storage.dtype).set_(storage._untyped_storage, storage_offset, size, stride)
    else:
        tensor = torch.empty((0,), dtype=torch.uint8).set_(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError('parameter data is not a tensor')
    _check_hooks(backward_hooks)
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise UnsafePickleError('parameter carries extra python state; refusing to restore it')
    return _rebuild_parameter(data, requires_grad, backward_hooks)


TORCH_TENSOR_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
    ('builtins', 'float'): float,
    ('__builtin__', 'set'): set,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come only from `allowed`: {(module, name): object}.

    `unknown(module, name)`, when given, supplies inert stand-ins (classes whose construction runs nothing from
    the file) for globals outside the allow-list instead of refusing them; `storages(pid)` reads the persistent
    storage ids of TorchScript archives."""

    def __init__(self, file, allowed, source='pickle', unknown=None, storages=None):
        super().__init__(file)
        self.allowed = dict(allowed)
        self.source = source
        self.unknown = unknown
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == 'torch' and name.endswith('Storage') and hasattr(torch, name):
            return getattr(torch, name)             # storage type tags (their dtype), never called with data
        if self.unknown is not None:
            return self.unknown(module, name)
        raise UnsafePickleError(
            f'{self.source} asks to call {module}.{name}, which is not on the allow-list of this loader; '
            f'refusing to load it (nothing from the file has been run)')

    def persistent_load(self, pid):
        if self.storages is None:
            raise UnsafePickleError(f'{self.source} uses persistent ids, which this loader does not read')
        return self.storages(pid)


def restricted_load(file, allowed, source='pickle'):
    """Unpickle from a binary file object with only the allow-listed globals."""
    return RestrictedUnpickler(file, allowed, source=source).load()


# ---- whole pickled objects as inert records ------------------------------------------------------------------------
# A file holding a whole pickled model (torch.save(module)) names the model's classes; rebuilding them would run
# their code. Instead every global outside the tensor allow-list becomes a `Record` class that only remembers what
# the pickle hands it, and `collect_tensors` reads the parameters and buffers out of the rebuilt tree.

class Record:
    """Inert stand-in for any object in a pickle: remembers its class name, constructor args and state."""
    _class_name = '?'
    args, kwargs, state = (), {}, None          # NEWOBJ creates records without calling __init__

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):              # SETITEM(S) on dict-like classes
        if self.state is None:
            self.state = {}
        self.state[key] = value

    def append(self, value):                        # APPEND(S) on list-like classes
        self.args = self.args + (value,)

    def extend(self, values):
        self.args = self.args + tuple(values)


def record_class(module, name):
    return type(name, (Record,), {'_class_name': f'{module}.{name}'})


def _new_record(cls, *args):                       # copyreg.__newobj__ / _reconstructor
    if isinstance(cls, type) and issubclass(cls, Record):
        return cls()
    return Record()


def _persistent_record(meta):
    """torch_utils.persistence._reconstruct_persistent_obj: keep the state, never exec module_src."""
    rec = record_class('persistent', str(meta.get('class_name', '?')))()
    rec.state = meta.get('state')
    return rec


RECORD_GLOBALS = {
    **TORCH_TENSOR_GLOBALS,
    ('copyreg', '__newobj__'): _new_record,
    ('copyreg', '_reconstructor'): _new_record,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
}


def record_load(file, source='pickle', storages=None):
    """Unpickle with tensors through the allow-list and every other global as an inert record class, so nothing
    from the file runs. Storages of zip archives (torch.save, TorchScript) come from `storages`."""
    return RestrictedUnpickler(file, RECORD_GLOBALS, source=source, unknown=record_class, storages=storages).load()


def collect_tensors(node, prefix='', out=None, seen=None):
    """{dotted name: tensor} of a rebuilt record tree: a pickled nn.Module's parameters and persistent buffers
    under their state-dict names, or a TorchScript object's attributes."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if isinstance(node, torch.Tensor):
        out[prefix[:-1]] = node
        return out
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, Record):
        node = node.state
    if not isinstance(node, dict):
        return out
    if '_modules' in node or '_parameters' in node:        # a pickled nn.Module's __dict__
        skip = node.get('_non_persistent_buffers_set') or ()
        for group in ('_parameters', '_buffers'):
            for k, v in (node.get(group) or {}).items():
                if isinstance(v, torch.Tensor) and not (group == '_buffers' and k in skip):
                    out[prefix + k] = v
        for k, v in (node.get('_modules') or {}).items():
            if v is not None:
                collect_tensors(v, prefix + k + '.', out, seen)
        return out
    for k, v in node.items():                                # a TorchScript object's flat attribute dict
        if isinstance(k, str) and not k.startswith('_'):
            collect_tensors(v, prefix + k + '.', out, seen)
    return out


def read_zip_records(zf, source='pickle'):
    """The record tree of a zip archive's data.pkl (torch.save since PyTorch 1.6, TorchScript), with its storages
    read from the archive onto the CPU; code files in the archive are never read."""
    names = zf.namelist()
    data_pkl = next((n for n in names if n.endswith('/data.pkl') or n == 'data.pkl'), None)
    if data_pkl is None:
        raise UnsafePickleError(f'{source} is a zip archive without data.pkl; not a torch.save file')
    root = data_pkl[:-len('data.pkl')]

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[2], str)):
            raise UnsafePickleError(f'{source} has an unexpected persistent id')
        _tag, storage_type, key, _location, _numel = pid      # the location (e.g. 'cuda:0') is ignored: CPU
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')      # the storage type tags are deprecated classes; only their dtype
            dtype = storage_type.dtype if hasattr(storage_type, 'dtype') else storage_type
        if not isinstance(dtype, torch.dtype):
            raise UnsafePickleError(f'{source} has a malformed storage record')
        raw = bytearray(zf.read(f'{root}data/{key}'))
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    with zf.open(data_pkl) as f:
        return record_load(io.BytesIO(f.read()), source=source, storages=load_storage)
