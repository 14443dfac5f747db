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
