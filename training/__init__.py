"""Predictors of learned solvers, their distillation (training/distill.py) and loading."""
import json
import os
import re

from safetensors.torch import load_file, save_file

from torch_utils.image_io import atomic_write
from training.predictors import PREDICTORS, AMEDPredictor, EPDPredictor  # noqa: F401
from training.sigma_schedule import SEDSigmaPredictor

PREDICTORS.setdefault(SEDSigmaPredictor.kind, SEDSigmaPredictor)

PREDICTOR_FILE = 'predictor.safetensors'
SETTINGS_FILE = 'predictor.json'
EXPS_DIR = 'exps'


def save_predictor(predictor, folder, progress=None):
    """Weights as safetensors and every setting as JSON, each written atomically. `progress` (iteration,
    total_iterations) records how far the training had got, so that a snapshot of an unfinished run says so."""
    os.makedirs(folder, exist_ok=True)
    meta = dict(predictor.settings, predictor=predictor.kind)
    if progress is not None:
        meta['training'] = dict(iteration=int(progress[0]), total_iterations=int(progress[1]))
    atomic_write(os.path.join(folder, SETTINGS_FILE), json.dumps(meta, indent=2).encode())
    tensors = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    tmp = os.path.join(folder, '.' + PREDICTOR_FILE + '.tmp')
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(folder, PREDICTOR_FILE))


def resolve_predictor_path(path, exps_dir=EXPS_DIR):
    """A folder, a file inside it, or an experiment number (folder exps/NNNNN-*) -> the predictor folder."""
    path = str(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return path
    if re.fullmatch(r'\d+', path) and os.path.isdir(exps_dir):
        prefix = f'{int(path):05d}-'
        matches = sorted(d for d in os.listdir(exps_dir) if d.startswith(prefix))
        if matches:
            return os.path.join(exps_dir, matches[0])
    raise ValueError(f"--predictor_path={path}: no such folder, file or experiment number in {exps_dir}/")


def reference_pickle(path, exps_dir=EXPS_DIR):
    """The reference predictor pickle that `path` names (the file, or the latest snapshot in a folder without our
    predictor files), or None."""
    from training.convert_predictor import PICKLE_SUFFIXES, reference_pickle_in
    path = str(path)
    if os.path.isfile(path):
        return path if path.endswith(PICKLE_SUFFIXES) else None
    try:
        folder = resolve_predictor_path(path, exps_dir)
    except ValueError:
        return None
    if os.path.isfile(os.path.join(folder, SETTINGS_FILE)):
        return None
    return reference_pickle_in(folder)


def predictor_files(path, exps_dir=EXPS_DIR):
    """The files that determine the predictor `path` names (for naming its samples by content)."""
    pkl = reference_pickle(path, exps_dir)
    if pkl is not None:
        return [pkl]
    folder = resolve_predictor_path(path, exps_dir)
    return [os.path.join(folder, SETTINGS_FILE), os.path.join(folder, PREDICTOR_FILE)]


def load_predictor(path, exps_dir=EXPS_DIR):
    """Load a trained predictor (no code is executed: JSON settings and safetensors weights), or a reference
    repository's predictor pickle (restricted unpickler, converted in memory: training/convert_predictor.py)."""
    pkl = reference_pickle(path, exps_dir)
    if pkl is not None:
        from training.convert_predictor import load_reference_predictor
        return load_reference_predictor(pkl)
    folder = resolve_predictor_path(path, exps_dir)
    settings_path, weights_path = os.path.join(folder, SETTINGS_FILE), os.path.join(folder, PREDICTOR_FILE)
    if not (os.path.isfile(settings_path) and os.path.isfile(weights_path)):
        raise ValueError(f"{folder} holds no trained predictor ({SETTINGS_FILE} and {PREDICTOR_FILE}); has the "
                         "training finished?")
    try:
        with open(settings_path) as f:
            settings = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{settings_path} is not valid JSON ({e}); restore it from the training run or retrain")
    if not isinstance(settings, dict):
        raise ValueError(f"{settings_path} holds a {type(settings).__name__}, not the predictor's settings")
    kind = settings.pop('predictor', None)
    progress = settings.pop('training', None)
    if kind not in PREDICTORS:
        raise ValueError(f"{settings_path}: unknown predictor kind {kind!r}; known: {', '.join(PREDICTORS)}")
    predictor = PREDICTORS[kind](settings)
    try:
        state = load_file(weights_path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
                         "truncated: restore it from the training run or retrain")
    try:
        predictor.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not match the predictor described in {settings_path} "
                         f"({str(e).splitlines()[0]})")
    predictor.progress = progress
    return predictor.eval().requires_grad_(False)


def unfinished_notice(predictor, folder):
    """One line saying that the predictor is a snapshot of a run stopped before its end, or None."""
    progress = getattr(predictor, 'progress', None) or {}
    done, total = progress.get('iteration'), progress.get('total_iterations')
    if done is None or total is None or done >= total:
        return None
    return (f"note: the predictor in {folder} is from an unfinished run (iteration {done} of {total}); resume its "
            "training with train.py --resume to finish it")
