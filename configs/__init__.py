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
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for section in ('model', 'sample', 'train'):
        cfg[section] = dict(cfg.get(section) or {})
    cfg.setdefault('dataset_name', os.path.splitext(os.path.basename(str(name)))[0])
    return cfg
