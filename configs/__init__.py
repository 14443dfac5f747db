"""Dataset configs: one YAML per dataset naming its model source and recommended settings."""
import os

from omegaconf import OmegaConf

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASET = 'gmm_image'


def known_datasets():
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))


def load_config(name):
    """The config of a dataset as a plain dict, with sections model, sample, train (each possibly empty).
    `name` is a config in configs/ or the path of a YAML file of the same form (for models of your own)."""
    path = name if str(name).endswith(('.yaml', '.yml')) else os.path.join(CONFIG_DIR, f'{name}.yaml')
    if not os.path.isfile(path):
        raise ValueError(f"unknown dataset_name {name!r}; known: {', '.join(known_datasets())}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - yaml and omegaconf raise several error types for a malformed file
        detail = ' '.join(str(e).split())
        raise ValueError(f"{path} is not a valid YAML config ({type(e).__name__}: {detail}); fix the file "
                         "(configs/gmm_image.yaml shows the form)")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must be a mapping with sections model, sample, train; got a "
                         f"{type(cfg).__name__}")
    for section in ('model', 'sample', 'train'):
        if not isinstance(cfg.get(section) or {}, dict):
            raise ValueError(f"{path}: the {section} section must be a mapping of options, not "
                             f"{cfg.get(section)!r}")
        cfg[section] = dict(cfg.get(section) or {})
    cfg.setdefault('dataset_name', os.path.splitext(os.path.basename(str(name)))[0])
    return cfg


def config_for_run(dataset_name, model_path=None):
    """The config a script runs with: --dataset_name's; with only a --model_path (a local file or folder), one made
    from the model itself (models/detect.py tells its family, or says which --dataset_name to add); else the
    default dataset's."""
    if dataset_name is None and model_path is not None and not str(model_path).startswith('python:'):
        from models.detect import config_for_model
        return config_for_model(model_path)
    return load_config(dataset_name or DEFAULT_DATASET)
