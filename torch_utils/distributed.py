"""Multi-process helpers for torchrun (one process per GPU, or several CPU processes).

Under torchrun (WORLD_SIZE > 1 in the environment) `init()` creates the process group from torchrun's
env:// variables: NCCL when CUDA is available, gloo otherwise. A plain `python script.py` is one process and
creates no process group at all, so it needs no free port and two single-process runs never collide.
Every helper below works in both cases; with one process the collectives are no-ops.
"""
import os
import sys

import torch
import torch.distributed as dist

_backend = None


def default_cpu_threads():
    """Intra-op threads for a CPU process: OMP_NUM_THREADS when set, else one per process (torchrun's default).

    The analytic models' and small networks' ops are too small to gain from intra-op parallelism, while idle
    threads spin-waiting for a core on a shared machine made `python train.py` 10x slower than with one thread
    (docs/sampling.md, "CPU threads"). Set OMP_NUM_THREADS=<n> for large networks on an otherwise idle machine."""
    value = os.environ.get('OMP_NUM_THREADS', '').strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def init(backend=None):
    """Join the torchrun process group if launched by torchrun; otherwise do nothing. Idempotent.
    A process that computes on the CPU gets `default_cpu_threads()` intra-op threads."""
    global _backend
    if not torch.cuda.is_available():
        torch.set_num_threads(default_cpu_threads())
    if dist.is_available() and dist.is_initialized():
        return
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return
    if backend is None:
        backend = os.environ.get('DIST_BACKEND') or ('nccl' if torch.cuda.is_available() else 'gloo')
    if backend == 'nccl':
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend, init_method='env://')
    _backend = backend


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))


def get_device():
    """The device this process should compute on: its own GPU if there is one, else the CPU."""
    if torch.cuda.is_available() and _backend != 'gloo':
        return torch.device('cuda', get_local_rank() % torch.cuda.device_count())
    return torch.device('cpu')


def barrier():
    if is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def _comm_device():
    return torch.device('cuda', torch.cuda.current_device()) if _backend == 'nccl' else torch.device('cpu')


def all_reduce_sum(tensor):
    """Sum of `tensor` over all processes (a new tensor on tensor's device; the input is left alone)."""
    if not is_initialized():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_gather(tensor):
    """Concatenate along dim 0 the tensors of all processes, in rank order.

    The tensors may differ in their first dimension (e.g. the last shard is short); the rest must agree."""
    if not is_initialized():
        return tensor.clone()
    world = get_world_size()
    dev = _comm_device()
    local = tensor.detach().to(dev).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=dev))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


def all_gather_object(obj):
    """List of `obj` from every process, in rank order (pickled; for small python objects only)."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """The value of `obj` on rank `src`, on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_batches(num_items, max_batch_size):
    """This process's share of range(num_items), as a list of index tensors (EDM's sharding).

    The items are split into near-equal contiguous chunks, a multiple of the world size in number, and rank r
    takes chunks r, r + W, r + 2W, ... Every rank gets the same number of chunks (some may be empty), so
    collectives called once per chunk stay in step."""
    world = get_world_size()
    num_batches = ((num_items - 1) // (max_batch_size * world) + 1) * world if num_items > 0 else world
    all_batches = torch.arange(num_items).tensor_split(num_batches)
    return all_batches[get_rank()::world]


def split_evaluate(call, rows):
    """Evaluate rows 0..rows-1 of one batched call split across the processes: rank r evaluates the r-th of
    `world` near-equal contiguous slices (call(lo, hi) -> tensor [hi - lo, ...]); the slices are all-gathered
    in rank order, so every process gets the whole result (a parallel-in-time solver's window, as the
    reference splits its window over GPUs)."""
    if not is_initialized():
        return call(0, rows)
    world, rank = get_world_size(), get_rank()
    bounds = [rows * r // world for r in range(world + 1)]
    return all_gather(call(bounds[rank], bounds[rank + 1]))


def env_rank():
    """This process's rank under torchrun (from its environment, so it is known before init()), else 0."""
    return int(os.environ.get('RANK', '0'))


def report_error(script, error, same_everywhere=True):
    """Print the one-line error that stops a run, once. Under torchrun every worker checks the same options and
    meets the same refusal, so only rank 0 prints it (`same_everywhere`); an error that may be a worker's own (a
    file it could not write, a NaN in its slice) is printed by every worker that meets it, naming its rank."""
    rank = env_rank()
    if rank == 0:
        print(f'{script}: error: {error}', file=sys.stderr, flush=True)
    elif not same_everywhere:
        print(f'{script}: error (rank {rank}): {error}', file=sys.stderr, flush=True)


def shutdown():
    """Leave the process group (if any), so that the process exits cleanly."""
    global _backend
    if is_initialized():
        dist.destroy_process_group()
    _backend = None
