"""torchrun-aware process group helpers. A single process (no torchrun) needs no process group at all;
under torchrun the backend is NCCL on GPU and gloo on CPU."""
import os

import torch
import torch.distributed as dist


def init(device=None):
    """Join the torchrun process group if launched by torchrun; returns the torch device of this rank."""
    cuda = torch.cuda.is_available() if device is None else str(device).startswith('cuda')
    if 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
    if device is not None:
        return torch.device(device)
    if cuda:
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    return torch.device('cpu')


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_gather_tensor(tensor):
    """Concatenate a tensor's rows from every rank (rows may differ in number across ranks)."""
    if not dist.is_initialized():
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros(biggest, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
