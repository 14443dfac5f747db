"""Frechet Inception Distance (FID), pixel-space Frechet distance and CLIP score, on one or many workers.

Examples:
  python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  python fid.py calc --images=samples/cifar10 --ref=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=4 fid.py calc --images=samples --ref=https://.../cifar10-32x32.npz
  python fid.py ref --dataset_name=gmm_image --dest=fid-refs/gmm_image-pixels.npz      # exact, analytic
  python fid.py calc --images=samples/gmm_image --ref=fid-refs/gmm_image-pixels.npz --detector=pixels --num=10000
  python fid.py clip --images=samples/coco --prompts=prompts.txt --clip_model=ViT-g-14 --clip_weights=clip.bin
  python fid.py score --images=samples/coco --prompts=prompts.txt --scorer=hps --option hps.weights_path=HPS_v2.1.pt
"""
import hashlib
import json
import os
import sys
import tempfile
import urllib.request

import click
import numpy as np
import torch

from models.inception import DETECTOR_FILE, DETECTOR_URL, PYTORCH_FID_FILE, DetectorError, load_inception
from models.inception import missing_detector_message
from torch_utils import distributed as dist
from torch_utils.image_io import ImageSet, ImageSetError, atomic_write, seed_from_name, to_uint8

STATS_VERSION = 1     # bump when the features or their statistics change, to invalidate cached statistics


def cache_dir():
    """Where downloaded files and cached statistics go: $FID_CACHE_DIR, else ~/.cache/fid."""
    return os.environ.get('FID_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'fid')


# -- Frechet distance ----------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, without a general matrix square root.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, and those equal the
    eigenvalues of the symmetric PSD matrix F^T S2 F for any factor S1 = F F^T. So one symmetric eigenvalue
    solve (values only) replaces scipy.linalg.sqrtm's Schur decomposition of a non-symmetric matrix. F is the
    Cholesky factor of whichever covariance is positive definite; when neither is (fewer samples than
    dimensions), F = V diag(sqrt(w)) from an eigendecomposition. Negative eigenvalues (round-off on singular
    covariances) are clipped to zero."""
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1, sigma2):
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 (float64), as described in frechet_distance.

    The factor F comes from LAPACK's pivoted Cholesky (dpstrf), which also handles singular covariances (fewer
    samples than dimensions): it stops at the numerical rank r, so F is d x r and F^T S2 F only r x r."""
    import scipy.linalg.lapack
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    if info < 0:
        raise ValueError(f'dpstrf failed (info={info})')
    lower = np.tril(c)[:, :rank]                   # P^T S1 P = L L^T  ->  S1 = (P L)(P L)^T
    factor = np.empty_like(lower)
    factor[piv - 1] = lower                        # LAPACK pivots are 1-based
    middle = factor.T @ sigma2 @ factor
    eig = torch.linalg.eigvalsh(torch.from_numpy((middle + middle.T) / 2)).numpy()
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


# -- detectors -----------------------------------------------------------------------------------------------

class PixelDetector:
    """Pixel features: the image in [-1, 1], flattened (uint8 u -> u / 127.5 - 1)."""
    name = 'pixels'

    def __init__(self, image_shape):
        self.feature_dim = int(np.prod(image_shape))

    def fingerprint(self):
        return 'pixels'

    def __call__(self, images):
        return images.to(torch.float64).reshape(images.shape[0], -1) / 127.5 - 1


class InceptionDetector:
    """pool3 features of the FID Inception-v3."""
    name = 'inception'
    feature_dim = 2048

    def __init__(self, path, device):
        self.path = path
        self.net = load_inception(path, device=device)

    def fingerprint(self):
        h = hashlib.sha256()
        with open(self.path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 22), b''):
                h.update(block)
        return 'inception:' + h.hexdigest()

    def __call__(self, images):
        return self.net(images, return_features=True).to(torch.float64)


def fetch_file(url_or_path, what):
    """A local path for `url_or_path`: the path itself, or the URL's file in the cache (downloaded once)."""
    if '://' not in url_or_path:
        return url_or_path
    dest = os.path.join(cache_dir(), 'downloads', os.path.basename(url_or_path.split('?')[0]))
    if os.path.isfile(dest):
        return dest
    if dist.get_rank() == 0:
        try:
            with urllib.request.urlopen(url_or_path, timeout=60) as r:
                atomic_write(dest, r.read())
        except Exception as e:
            if what == 'detector':
                raise DetectorError(missing_detector_message(dest) + f' (download failed: {e})')
            raise click.ClickException(f'cannot download {url_or_path} ({e}); download it elsewhere and pass '
                                       f'its local path, or put it at {dest}')
    dist.barrier()
    return dest


def resolve_detector(spec):
    """--detector value -> 'pixels' or the local path of an Inception weight file."""
    if spec == 'pixels':
        return spec
    if spec is None or spec == 'inception':
        for name in (DETECTOR_FILE, PYTORCH_FID_FILE, 'inception-2015-12-05.safetensors'):
            for folder in (os.path.join(cache_dir(), 'downloads'), cache_dir()):
                if os.path.isfile(os.path.join(folder, name)):
                    return os.path.join(folder, name)
        spec = DETECTOR_URL
    return fetch_file(spec, 'detector')


def make_detector(spec, image_shape, device):
    spec = resolve_detector(spec)
    if spec == 'pixels':
        return PixelDetector(image_shape)
    return InceptionDetector(spec, device)


# -- statistics ----------------------------------------------------------------------------------------------

class _Batches(torch.utils.data.Dataset):
    def __init__(self, image_set, batches):
        self.image_set, self.batches = image_set, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        # A file that cannot be decoded comes back as its one-line message: raised in a DataLoader worker, the
        # exception would reach the main process wrapped in the worker's traceback.
        try:
            return torch.from_numpy(self.image_set.read_batch(self.batches[i].tolist()))
        except ImageSetError as e:
            return str(e)


def feature_stats(features):
    """(mu, sigma) of a [N, D] feature matrix: mean and unbiased covariance in float64."""
    f = torch.as_tensor(features, dtype=torch.float64)
    n = f.shape[0]
    mu = f.mean(0)
    sigma = (f.T @ f - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def compute_stats(image_set, detector, batch=64, device=None, num_workers=0, cache=True):
    """Mean and unbiased covariance (float64 numpy) of the detector's features over the whole image set,
    spread over all workers. With `cache`, statistics of the same files under the same detector are read
    back from the cache instead of recomputed."""
    device = device or dist.get_device()
    cache_path = None
    if cache:
        key = json.dumps([STATS_VERSION, detector.fingerprint(), image_set.file_signature()])
        cache_path = os.path.join(cache_dir(), 'stats', hashlib.sha256(key.encode()).hexdigest() + '.npz')
        if os.path.isfile(cache_path):
            with np.load(cache_path) as data:
                dist.print0(f'Using cached statistics {cache_path}')
                return data['mu'], data['sigma']
    n = len(image_set)
    if n < 2:
        raise click.ClickException(f'Found {n} images in {image_set.path}; need at least 2 to compute statistics')
    d = detector.feature_dim
    s1 = torch.zeros(d, dtype=torch.float64, device=device)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=device)
    batches = dist.rank_batches(n, batch)
    loader = torch.utils.data.DataLoader(_Batches(image_set, batches), batch_size=None, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None)
    with torch.no_grad():
        for images in loader:
            if isinstance(images, str):
                raise click.ClickException(images)
            if images.shape[0] == 0:
                continue
            f = detector(images.to(device))
            s1 += f.sum(0)
            s2 += f.T @ f
    s1, s2 = dist.all_reduce_sum(s1), dist.all_reduce_sum(s2)
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    mu, sigma = mu.cpu().numpy(), sigma.cpu().numpy()
    if cache_path and dist.get_rank() == 0:
        atomic_write(cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma))
    return mu, sigma


def load_ref(path_or_url, feature_dim):
    """Reference statistics {mu, sigma} from an npz (path or URL), checked against the feature dimension."""
    path = fetch_file(path_or_url, 'ref')
    if not os.path.isfile(path):
        raise click.ClickException(f'reference statistics not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as data:
            ref = {k: data[k] for k in data.keys()}
    except Exception as e:
        raise click.ClickException(f'{path}: not a readable npz file ({e})')
    missing = [k for k in ('mu', 'sigma') if k not in ref]
    if missing:
        raise click.ClickException(f'{path}: reference statistics need arrays mu and sigma; missing '
                                   f'{", ".join(missing)} (found: {", ".join(ref) or "nothing"})')
    mu, sigma = ref['mu'], ref['sigma']
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        hint = ' (pixel statistics? use --detector=pixels)' if feature_dim == 2048 else \
            ' (Inception statistics? drop --detector=pixels)' if mu.shape == (2048,) else ''
        raise click.ClickException(f'{path}: mu {mu.shape} and sigma {sigma.shape} do not match the detector\'s '
                                   f'{feature_dim} features{hint}')
    return mu.astype(np.float64), sigma.astype(np.float64)


# -- pixel statistics of analytic models ---------------------------------------------------------------------

QUANTIZATION_VARIANCE = (1 / 127.5) ** 2 / 12


def pixel_reference_stats(net, quantized=True):
    """Exact pixel statistics of a model that knows its data distribution (data_mean(), data_covariance() in
    the [-1, 1] sample space). Images saved as PNG are rounded to 256 levels: u = floor(127.5 x + 128), read back
    as u / 127.5 - 1 = x + e with e uniform of width 1/127.5 and mean 0, independent of x to a very good
    approximation; so `quantized` adds its variance (1/127.5)^2/12 to the diagonal. Clipping to [0, 255] is not
    modelled (negligible when the data stay inside [-1, 1])."""
    mu = torch.as_tensor(net.data_mean(), dtype=torch.float64).reshape(-1).cpu().numpy()
    sigma = torch.as_tensor(net.data_covariance(), dtype=torch.float64).cpu().numpy().copy()
    if quantized:
        sigma[np.diag_indices_from(sigma)] += QUANTIZATION_VARIANCE
    return mu, sigma


def pixel_fd(samples, ref_mu, ref_sigma, quantize=True):
    """Pixel-space Frechet distance of float samples in [-1, 1] ([N, C, H, W]) against reference statistics;
    with `quantize` the samples are first rounded as PNG files would be (then use quantized reference stats)."""
    x = samples.to(torch.float64)
    feats = PixelDetector(x.shape[1:])(to_uint8(x)) if quantize else x.reshape(x.shape[0], -1)
    mu, sigma = feature_stats(feats)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def load_dataset_model(dataset_name):
    """The denoiser of a dataset config (configs/<name>.yaml), which must know its data distribution (an analytic
    model); checked on the config before anything is loaded or downloaded."""
    try:
        from configs import load_config
        import models
        from models.loading import load_model
    except ImportError as e:
        raise click.ClickException(f'--dataset_name needs the configs package ({e})')
    try:
        cfg = load_config(dataset_name)
    except (ValueError, OSError) as e:
        raise click.ClickException(f'--dataset_name: {e}')
    family = cfg['model'].get('family')
    not_analytic = (f"--dataset_name={dataset_name}: exact pixel statistics need an analytic model (one that knows "
                    f"its data distribution, e.g. gmm_image); this model is {{}}; compute reference statistics from "
                    f"dataset images with --data=<folder or zip> instead")
    if family not in (None, 'analytic'):
        raise click.ClickException(not_analytic.format(f'family {family!r}'))
    try:
        net = load_model(cfg, None, 'cpu')
    except (models.ModelError, ValueError, TypeError, OSError) as e:
        raise click.ClickException(f'--dataset_name={dataset_name}: {e}')
    if not (hasattr(net, 'data_mean') and hasattr(net, 'data_covariance')):
        raise click.ClickException(not_analytic.format(f'a {type(net).__name__} without data_mean/data_covariance'))
    return net


# -- CLIP score ----------------------------------------------------------------------------------------------

def read_prompts(path):
    with open(path, encoding='utf-8') as f:
        prompts = [line.rstrip('\n') for line in f if line.strip()]
    if not prompts:
        raise click.ClickException(f'{path}: no prompts')
    return prompts


def prompt_for(name, prompts):
    """Image named ...NNNNNN.png was generated from prompt line NNNNNN mod len(prompts) (0-based)."""
    seed = seed_from_name(name)
    if seed is None:
        raise click.ClickException(f'{name}: cannot read the seed from the file name (expected e.g. 000123.png)')
    return prompts[seed % len(prompts)]


def load_clip(model_name, weights, config=None, device='cpu'):
    """open_clip model, eval preprocessing and tokenizer, weights from a local file (no downloads)."""
    import open_clip
    if config is not None:
        open_clip.add_model_config(config)
    if weights is None or not os.path.isfile(weights):
        raise click.ClickException(f'CLIP weights not found: {weights}. Download the open_clip checkpoint for '
                                   f'{model_name} and pass its local path with --clip_weights')
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_score(image_set, prompts, model, preprocess, tokenizer, batch=64, device=None):
    """Mean over images of 100 * cos(image embedding, prompt embedding), summed over all workers."""
    import PIL.Image
    device = device or dist.get_device()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in dist.rank_batches(len(image_set), batch):
            if len(idx) == 0:
                continue
            idx = idx.tolist()
            pil = [PIL.Image.fromarray(image_set[i].transpose(1, 2, 0).squeeze(-1) if image_set.shape[0] == 1
                                       else image_set[i].transpose(1, 2, 0)) for i in idx]
            img = torch.stack([preprocess(p.convert('RGB')) for p in pil]).to(device)
            txt = tokenizer([prompt_for(image_set.names[i], prompts) for i in idx]).to(device)
            ie = torch.nn.functional.normalize(model.encode_image(img).to(torch.float64), dim=-1)
            te = torch.nn.functional.normalize(model.encode_text(txt).to(torch.float64), dim=-1)
            total[0] += (100 * (ie * te).sum(-1)).sum()
            total[1] += len(idx)
    total = dist.all_reduce_sum(total)
    return float(total[0] / total[1])


# -- command line --------------------------------------------------------------------------------------------

def check_dest(dest_path):
    """Refuse, before any work, a --dest that cannot become the statistics file: a folder, a path under a file,
    or a folder that cannot be written. Creates no file or folder."""
    dest = os.path.abspath(dest_path)
    if os.path.isdir(dest):
        raise click.ClickException(f'--dest={dest_path} is a folder; give the file to write, e.g. '
                                   f'--dest={os.path.join(dest_path, "ref.npz")}')
    parent = os.path.dirname(dest)
    while not os.path.exists(parent):                  # the nearest existing ancestor: atomic_write creates the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise click.ClickException(f'--dest={dest_path}: {parent} is a file, not a folder; choose another --dest')
    try:                                               # a real probe: permissions alone miss read-only mounts
        fd, probe = tempfile.mkstemp(dir=parent, prefix='.fid-dest-probe.')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise click.ClickException(f'--dest={dest_path}: cannot write in {parent} ({e.strerror}); choose a '
                                   f'writable --dest')

def _open_images(path, num=None, seed=0):
    try:
        return ImageSet(path, max_size=num, seed=seed)
    except ImageSetError as e:
        raise click.ClickException(str(e))


def _detector_or_error(spec, image_shape, device):
    try:
        return make_detector(spec, image_shape, device)
    except DetectorError as e:
        raise click.ClickException(str(e))


@click.group()
def main():
    """FID, pixel-space Frechet distance, CLIP score and reward-model scores of generated images (EDM's fid.py
    conventions).

    Run under `torchrun --standalone --nproc_per_node=N` to spread the work over N processes."""


_detector_option = click.option(
    '--detector', help="Inception weights (.pkl/.pt/.pth/.safetensors path or URL), or 'pixels'", metavar='PATH|URL',
    type=str, default=None, show_default='inception-2015-12-05 from the cache, else EDM\'s URL')
_cache_option = click.option('--cache/--no-cache', help='Reuse statistics of files already scored', default=True,
                             show_default=True)
_workers_option = click.option('--workers', help='Image-reading processes per worker', metavar='INT',
                               type=click.IntRange(min=0), default=2, show_default=True)


@main.command()
@click.option('--images', 'image_path', help='Generated images: folder, zip or npz', metavar='PATH|ZIP', type=str,
              required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (npz with mu, sigma)', metavar='NPZ|URL', type=str,
              required=True)
@click.option('--num', 'num_expected', help='Number of images to use', metavar='INT', type=click.IntRange(min=2),
              default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option
@_cache_option
@_workers_option
def calc(image_path, ref_path, num_expected, seed, batch, detector, cache, workers):
    """Calculate FID (or pixel FD) of a set of images against reference statistics."""
    dist.init()
    image_set = _open_images(image_path, num_expected, seed)
    if len(image_set) < num_expected:
        raise click.ClickException(f'Found {len(image_set)} images in {image_path}, but expected at least '
                                   f'{num_expected} (--num)')
    device = dist.get_device()
    det = _detector_or_error(detector, image_set.shape, device)
    ref_mu, ref_sigma = load_ref(ref_path, det.feature_dim)
    dist.print0(f'Calculating statistics of {len(image_set)} images from "{image_path}" ({det.name} features)...')
    mu, sigma = compute_stats(image_set, det, batch=batch, device=device, num_workers=workers, cache=cache)
    if dist.get_rank() == 0:
        fd = frechet_distance(mu, sigma, ref_mu, ref_sigma)
        print(f'{fd:g}')
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--data', 'dataset_path', help='Dataset images: folder, zip or npz', metavar='PATH|ZIP', type=str)
@click.option('--dataset_name', help='Analytic dataset: exact pixel statistics from its model', metavar='STR',
              type=str)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--num', 'num', help='Use a random subset of this many images (default: all)', metavar='INT',
              type=click.IntRange(min=2))
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@_detector_option
@_cache_option
@_workers_option
def ref(dataset_path, dataset_name, dest_path, num, seed, batch, detector, cache, workers):
    """Calculate reference statistics (npz with mu, sigma) for 'calc'."""
    if (dataset_path is None) == (dataset_name is None):
        raise click.ClickException('give exactly one of --data (images) and --dataset_name (analytic model)')
    check_dest(dest_path)
    dist.init()
    if dataset_name is not None:
        if detector not in (None, 'pixels'):
            raise click.ClickException('--dataset_name gives exact pixel statistics; it takes no Inception detector')
        mu, sigma = pixel_reference_stats(load_dataset_model(dataset_name))
    else:
        image_set = _open_images(dataset_path, num, seed)
        device = dist.get_device()
        det = _detector_or_error(detector, image_set.shape, device)
        dist.print0(f'Calculating statistics of {len(image_set)} images from "{dataset_path}" ({det.name} features)...')
        mu, sigma = compute_stats(image_set, det, batch=batch, device=device, num_workers=workers, cache=cache)
    if dist.get_rank() == 0:
        try:
            atomic_write(dest_path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        except OSError as e:
            raise click.ClickException(f'cannot write --dest={dest_path} ({e.strerror}); choose a writable --dest')
        print(f'Saved {dest_path}')
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--images', 'image_path', help='Generated images: folder, zip or npz', metavar='PATH|ZIP', type=str,
              required=True)
@click.option('--prompts', 'prompts_path', help='Text file, one prompt per line; image NNNNNN.png uses line '
              'NNNNNN mod count', metavar='TXT', type=str, required=True)
@click.option('--clip_model', help='open_clip architecture name', metavar='STR', type=str, default='ViT-g-14',
              show_default=True)
@click.option('--clip_weights', help='Local open_clip checkpoint for that architecture', metavar='PATH', type=str,
              required=True)
@click.option('--clip_config', help='JSON model config for an architecture open_clip does not ship', metavar='JSON',
              type=str)
@click.option('--num', 'num', help='Use a random subset of this many images (default: all)', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
def clip(image_path, prompts_path, clip_model, clip_weights, clip_config, num, seed, batch):
    """Calculate the CLIP score (100 * cosine similarity of image and prompt embeddings, averaged)."""
    dist.init()
    image_set = _open_images(image_path, num, seed)
    if num is not None and len(image_set) < num:
        raise click.ClickException(f'Found {len(image_set)} images in {image_path}, but expected at least {num}')
    prompts = read_prompts(prompts_path)
    for name in image_set.names:
        prompt_for(name, prompts)           # every file name must carry its seed; fail before any work
    device = dist.get_device()
    model, preprocess, tokenizer = load_clip(clip_model, clip_weights, clip_config, device)
    score = clip_score(image_set, prompts, model, preprocess, tokenizer, batch=batch, device=device)
    dist.print0(f'CLIP score: {score:g}')
    dist.barrier()
    dist.shutdown()


@main.command()
@click.option('--images', 'image_path', help='Generated images: folder, zip or npz', metavar='PATH|ZIP', type=str,
              required=True)
@click.option('--scorer', 'scorer_name', help='Reward model or score: hps, pickscore, imagereward, clip, aesthetic, '
              'mps, multi, class_posterior, log_density', metavar='NAME', type=str, required=True)
@click.option('--option', 'options', help="The scorer's files and settings as NAME.KEY=VALUE, e.g. "
              "mps.checkpoint=MPS_overall_checkpoint.pth (repeatable; multi: multi.hps.weights_path=...)",
              metavar='NAME.KEY=VALUE', type=str, multiple=True)
@click.option('--prompts', 'prompts_path', help='Text file, one prompt per line; image NNNNNN.png uses line '
              'NNNNNN mod count (text scorers)', metavar='TXT', type=str)
@click.option('--dataset_name', help='Analytic model whose exact posterior/density scores (class_posterior, '
              'log_density)', metavar='STR', type=str)
@click.option('--class', 'class_idx', help='Class label of every image (class_posterior)', metavar='INT', type=int)
@click.option('--model_config', help='JSON open_clip model config for an architecture open_clip does not ship',
              metavar='JSON', type=str)
@click.option('--num', 'num', help='Use a random subset of this many images (default: all)', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=16,
              show_default=True)
def score(image_path, scorer_name, options, prompts_path, dataset_name, class_idx, model_config, num, seed, batch):
    """Score images with a reward model (scorers/): mean per-image score with its standard error."""
    from omegaconf import OmegaConf
    from scorers import SCORERS, ScorerError, load_scorer
    dist.init()
    if scorer_name not in SCORERS:
        raise click.ClickException(f"--scorer={scorer_name}: unknown; known: {', '.join(SCORERS)}")
    bad = [o for o in options if '=' not in o or not o.startswith(scorer_name + '.')]
    if bad:
        raise click.ClickException(f"--option {bad[0]!r} must read {scorer_name}.KEY=VALUE")
    opts = OmegaConf.to_container(OmegaConf.from_dotlist(list(options)), resolve=True).get(scorer_name, {})
    if model_config is not None:
        import open_clip
        if not os.path.isfile(model_config):
            raise click.ClickException(f'--model_config={model_config}: no such file')
        open_clip.add_model_config(model_config)
    net = load_dataset_model(dataset_name) if dataset_name else None
    image_set = _open_images(image_path, num, seed)
    if num is not None and len(image_set) < num:
        raise click.ClickException(f'Found {len(image_set)} images in {image_path}, but expected at least {num}')
    prompts = read_prompts(prompts_path) if prompts_path else None
    if prompts is not None:
        for name in image_set.names:
            prompt_for(name, prompts)           # every file name must carry its seed; fail before any work
    device = dist.get_device()
    try:
        scorer = load_scorer(scorer_name, option_prefix=f'--option {scorer_name}', batch_size=batch, net=net,
                             **opts).to(device)
        if getattr(scorer, 'needs_start', False):
            raise ScorerError(f"--scorer={scorer_name} compares each image with the exact solution of the noise it "
                              "started from, which a folder of images does not keep; it is a reward of training.rl")
        total = torch.zeros(3, dtype=torch.float64, device=device)
        for idx in dist.rank_batches(len(image_set), batch):
            idx = idx.tolist()
            if not idx:
                continue
            x = torch.from_numpy(np.stack([image_set[i] for i in idx])).to(device, torch.float64) / 127.5 - 1
            if class_idx is not None:
                targets = [class_idx] * len(idx)
            else:
                targets = [prompt_for(image_set.names[i], prompts) for i in idx] if prompts else None
            s = scorer(x, targets).to(device, torch.float64)
            total += torch.stack([s.sum(), (s * s).sum(), torch.tensor(float(len(s)), device=device,
                                                                      dtype=torch.float64)])
    except ScorerError as e:
        raise click.ClickException(str(e))
    total = dist.all_reduce_sum(total)
    n = float(total[2])
    mean = float(total[0]) / n
    var = max(float(total[1]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
    dist.print0(f'{scorer_name} score: {mean:.6g} +- {(var / n) ** 0.5:.3g} (standard error, {int(n)} images)')
    dist.barrier()
    dist.shutdown()


def run_main():
    """main() with its errors printed once under torchrun (rank 0; torch_utils/distributed.report_error)."""
    try:
        code = main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as e:
        if dist.env_rank() == 0:
            e.show()
        sys.exit(e.exit_code)
    if isinstance(code, int) and code:      # ctx.exit(code) without standalone mode
        sys.exit(code)


if __name__ == '__main__':
    run_main()
