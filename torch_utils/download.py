"""Model files from a local path or a URL, with a download cache.

A URL is cached as `<cache_dir>/<file name from the URL>`, so a user without network access can place the
file there by hand. Without a network (or when the download fails) the error names the URL and that path.
"""
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

from models import ModelError


def default_cache_dir():
    """$DIFFUSION_MODEL_CACHE, else ~/.cache/diffusion_models."""
    return os.environ.get('DIFFUSION_MODEL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                                    'diffusion_models')


def is_url(path):
    return isinstance(path, str) and urllib.parse.urlparse(path).scheme in ('http', 'https', 'ftp')


def cached_path(url, cache_dir=None):
    """Where the cached copy of `url` lives (whether or not it is there yet)."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    return os.path.join(cache_dir or default_cache_dir(), name)


def open_model_file(path_or_url, cache_dir=None, timeout=60, verbose=True):
    """Return a local path to the model file: the path itself, or the cached (downloaded if needed) copy."""
    if path_or_url is None:
        raise ModelError('no model file given; pass --model_path (a local file or a URL)')
    path_or_url = str(path_or_url)
    if path_or_url.startswith('file://'):
        path_or_url = urllib.request.url2pathname(urllib.parse.urlparse(path_or_url).path)
    if not is_url(path_or_url):
        if not os.path.isfile(path_or_url):
            raise ModelError(f'model file {path_or_url!r} does not exist; check --model_path')
        return path_or_url

    url = path_or_url
    dest = cached_path(url, cache_dir)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if verbose:
        print(f'Downloading {url} to {dest} ...')
    # Download into a temporary file in the same folder, then rename: a partial file never looks complete.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix='.download-')
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:  # URLError and socket timeouts are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ModelError(f'cannot download {url} ({e}); download it elsewhere and place it at {dest} '
                         f'(or pass its local path as --model_path)') from None
    return dest
