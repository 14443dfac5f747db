"""Prompt sources for text-to-image models: one prompt, a text file (one prompt a line), or a CSV with a `text`
column (the MS-COCO caption CSV the seeds use for ms_coco).

The prompt of an image is a function of its seed alone, prompts[seed % len(prompts)], so an image comes out the
same for any batch size, number of workers or resume point (for seeds below the number of captions this is the
reference's "seed = caption index").
"""
import csv
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

from models import ModelError

MS_COCO_CAPTIONS_URL = ('https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/'
                        'MS-COCO_val2014_30k_captions.csv')
CSV_COLUMNS = ('text', 'prompt', 'caption')  # the first one a CSV has is used
DEFAULT_PROMPT_FILES = {'ms_coco': MS_COCO_CAPTIONS_URL}


class PromptError(ModelError):
    """A prompt source cannot be read; the message names the problem and the fix."""


def cache_dir():
    return os.environ.get('FDS_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'fds'))


def fetch(path_or_url):
    """A local path as is; an http(s)/file URL downloaded once into the cache (atomically) and its local path."""
    if '://' not in str(path_or_url):
        if not os.path.isfile(path_or_url):
            raise PromptError(f"prompt file {path_or_url} does not exist")
        return str(path_or_url)
    url = str(path_or_url)
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'prompts.txt'
    local = os.path.join(cache_dir(), 'prompts', name)
    if os.path.isfile(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        with urllib.request.urlopen(url) as response, \
                tempfile.NamedTemporaryFile('wb', dir=os.path.dirname(local), delete=False) as tmp:
            shutil.copyfileobj(response, tmp)
    except OSError as e:
        raise PromptError(f"cannot download {url} ({e}); download it yourself and pass --prompt_file=<path>")
    os.replace(tmp.name, local)
    return local


def read_prompt_file(path_or_url):
    """Prompts of a .csv (column text/prompt/caption) or a text file (non-empty lines, stripped)."""
    path = fetch(path_or_url)
    with open(path, newline='', encoding='utf-8') as f:
        if path.lower().endswith('.csv'):
            reader = csv.DictReader(f)
            column = next((c for c in CSV_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise PromptError(f"{path} has no column named {' or '.join(CSV_COLUMNS)} "
                                  f"(columns: {', '.join(reader.fieldnames or [])})")
            prompts = [row[column].strip() for row in reader]
        else:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


class PromptSource:
    """A fixed list of prompts indexed by seed."""

    def __init__(self, prompts):
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise PromptError("no prompts given")

    def __len__(self):
        return len(self.prompts)

    def prompt_for_seed(self, seed):
        return self.prompts[int(seed) % len(self.prompts)]

    def prompts_for_seeds(self, seeds):
        return [self.prompt_for_seed(s) for s in seeds]


def load_prompt_source(prompt=None, prompt_file=None, dataset_name=None):
    """--prompt (one prompt for every seed) or --prompt_file; else the dataset's default list (ms_coco: the
    MS-COCO 30k caption CSV). None when nothing applies (models without text conditioning)."""
    if prompt is not None and prompt_file is not None:
        raise PromptError("give --prompt or --prompt_file, not both")
    if prompt is not None:
        return PromptSource([prompt])
    if prompt_file is None:
        prompt_file = DEFAULT_PROMPT_FILES.get(dataset_name)
        if prompt_file is None:
            return None
    return PromptSource(read_prompt_file(prompt_file))
