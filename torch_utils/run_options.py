"""What determines a folder of samples, and the check that a folder only ever holds images of one setting."""
import hashlib
import json
import math
import os

OPTIONS_FILE = 'sample_options.json'


def file_digest(paths, length=8):
    """Short SHA-256 of the contents of the given files (in order): names a predictor or prompt file by content."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
    return h.hexdigest()[:length]


def canonical(value):
    """JSON round trip, so recorded and fresh values compare alike (tuples vs lists, ints vs floats stay)."""
    return json.loads(json.dumps(value, default=str))


def same_value(a, b):
    """Equal settings: numbers to float rounding (0.002 typed vs 0.002 recorded), everything else exactly."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_outdir(outdir, image_settings):
    """Refuse to add to a folder whose recorded image settings differ from this run's; names the first that does."""
    path = os.path.join(outdir, OPTIONS_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    before = recorded.get('images') if isinstance(recorded, dict) else None
    if not isinstance(before, dict):
        raise ValueError(f"--outdir={outdir} holds samples whose settings were not recorded; choose another "
                         f"--outdir (or delete that folder)")
    now = canonical(image_settings)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            raise ValueError(f"--outdir={outdir} holds images made with {key}={before.get(key)!r}, this run has "
                             f"{key}={now.get(key)!r}; choose another --outdir for these settings")
