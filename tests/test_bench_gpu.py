"""bench/bench_gpu.py's code path on tiny networks (the GPU figures themselves need a GPU)."""
from tests.conftest import run_cli


def test_gpu_bench_runs_on_tiny_networks(tmp_path):
    out = tmp_path / 'gpu.md'
    run_cli(['bench/bench_gpu.py', '--tiny', '--device=cpu', '--compile=False', '--edm_batch=2', '--sd_batch=1',
             '--repeats=1', f'--out={out}'])
    rows = [line for line in out.read_text().splitlines() if line.startswith('| EDM') or line.startswith('| SD1.5')]
    assert [r.split(' | ')[1] for r in rows[:3]] == ['fp32', 'fp16', 'bf16'] and len(rows) == 5
    assert all(float(r.split(' | ')[-1].rstrip(' |')) > 0 for r in rows)
    assert 'TINY' in out.read_text()


def test_gpu_bench_without_cuda_is_a_clear_error(tmp_path):
    result = run_cli(['bench/bench_gpu.py', f'--out={tmp_path / "gpu.md"}'], check=False)
    assert result.returncode != 0 and 'no CUDA device' in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'gpu.md').exists()
