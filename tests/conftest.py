import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope='session')
def gmm_image():
    from models.analytic import image_mixture
    return image_mixture()


@pytest.fixture(scope='session')
def gmm_2d():
    from models.analytic import planar_mixture
    return planar_mixture()


def run_cli(args, cwd=ROOT, nproc=1, env=None, timeout=600, check=True):
    """Run a CLI script (optionally under torchrun with `nproc` CPU workers); returns CompletedProcess."""
    import subprocess
    base = [PYTHON] if nproc == 1 else [PYTHON, '-m', 'torch.distributed.run', '--standalone',
                                         f'--nproc_per_node={nproc}']
    if args and args[0].endswith('.py') and not os.path.isabs(args[0]):
        args = [os.path.join(ROOT, args[0])] + list(args[1:])
    full_env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    proc = subprocess.run(base + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
