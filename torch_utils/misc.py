"""Seeds, per-seed generators, atomic file writes."""
import os
import re
import tempfile

import torch


def parse_int_list(text):
    """'0-63' or '1,5,10-19' -> list of ints (ranges inclusive). Raises ValueError with the expected form."""
    if isinstance(text, (list, tuple)):
        return list(text)
    result = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} runs backwards; write it as {hi}-{lo}")
            result.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            result.append(int(part))
        else:
            raise ValueError(f"malformed seeds {text!r}: use non-negative integers and ranges, e.g. '0-63' or "
                             "'1,5,10-19'")
    return result


def seed_generators(seeds, device):
    """One generator per seed, seeded with the seed mod 2^32: a seed's draws do not depend on its batch."""
    return [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def randn_per_seed(generators, shape, dtype, device):
    """Stack one draw of `shape` from each generator: [len(generators), *shape]. Drawn in float64 and cast, so
    a seed's noise is the same (up to the cast) whatever dtype is sampled in."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float64)
                        for g in generators]).to(dtype)


def atomic_write(path, write_fn, mode='wb'):
    """Write a file under a temporary name in the same folder, then rename it into place: a reader (or a
    resumed run) never sees a truncated file under its final name. write_fn(file_object) writes the content."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
