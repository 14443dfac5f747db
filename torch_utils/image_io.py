"""Reading sets of images (PNG folders, zips, npz sample files) and writing files atomically.

An image set is read as uint8 arrays in CHW layout, in sorted order of relative path (EDM's convention), so
that index i means the same image on every worker.
"""
import io
import os
import re
import tempfile
import zipfile

import numpy as np
import PIL.Image

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.gif'}
ARRAY_EXTENSIONS = {'.npz', '.npy'}


class ImageSetError(Exception):
    """An image set cannot be read as asked; the message says what is wrong with which file."""


# What PIL raises for a file that is not an image, or is truncated or corrupt (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def atomic_write(path, data, fsync=True):
    """Write a file so that readers see either the old file or the complete new one, never a partial one.

    `data` is bytes, or a callable that writes into the binary file object it is given. The content goes to a
    temporary file in the same directory, which then replaces `path` (os.replace is atomic on one filesystem).
    Parent directories are created. fsync=False skips flushing to disk: still safe when the process is killed
    (the kernel holds the complete file before the rename), not against a power cut; for bulk outputs."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, 'wb') as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def to_uint8(images):
    """[-1, 1] float images [N, C, H, W] -> uint8, as EDM writes PNGs: floor(x * 127.5 + 128), clipped."""
    import torch
    return (images.to(torch.float64) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def seed_from_name(name):
    """The integer in an image's file name (EDM/sample.py write seed s as .../{s:06d}.png), or None."""
    digits = re.findall(r'\d+', os.path.splitext(os.path.basename(name))[0])
    return int(digits[-1]) if digits else None


def _to_chw(array, name):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageSetError(f'{name}: expected an image of shape HxW or HxWxC, got {array.shape}')
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class ImageSet:
    """A read-only, indexable set of images: `len(s)`, `s.names`, `s.shape` (C, H, W), `s[i]` -> uint8 CHW.

    path: a directory (searched recursively), a .zip, or an .npz/.npy of samples (uint8 NHWC or NCHW; npz key
    'arr_0', 'samples', 'images' or the only array). Every image must have the same shape; this is checked up
    front from the file headers, so a bad set fails before any work is done.
    max_size, seed: if the set is larger than max_size, keep a random subset of max_size images chosen by
    `seed` (EDM's ImageFolderDataset: numpy RandomState(seed % 2**31) shuffle, first max_size, sorted)."""

    def __init__(self, path, max_size=None, seed=0):
        self.path = os.fspath(path)
        self._zip = None
        self._array = None
        ext = os.path.splitext(self.path)[1].lower()
        if os.path.isdir(self.path):
            self._kind = 'dir'
            names = []
            for root, _dirs, files in os.walk(self.path):
                for f in files:
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        names.append(os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/'))
        elif ext == '.zip' and os.path.isfile(self.path):
            self._kind = 'zip'
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        elif ext in ARRAY_EXTENSIONS and os.path.isfile(self.path):
            self._kind = 'array'
            self._array = _load_sample_array(self.path)
            names = [f'{i:06d}' for i in range(self._array.shape[0])]
        else:
            raise ImageSetError(f'{self.path}: not a directory, .zip, .npz or .npy of images')
        if not names:
            raise ImageSetError(f'{self.path}: contains no images (looked for {", ".join(sorted(IMAGE_EXTENSIONS))})')
        names = sorted(names)
        self.all_count = len(names)
        index = np.arange(len(names))
        if max_size is not None and len(names) > max_size:
            np.random.RandomState(seed % (1 << 31)).shuffle(index)
            index = np.sort(index[:max_size])
        self._index = index
        self.names = [names[i] for i in index]
        self.shape = self._check_shapes()

    def __len__(self):
        return len(self.names)

    def _open_zip(self):
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def _open_file(self, name):
        if self._kind == 'dir':
            return open(os.path.join(self.path, name), 'rb')
        return self._open_zip().open(name, 'r')

    def _header_shape(self, name):
        try:
            with self._open_file(name) as f:
                img = PIL.Image.open(f)
                channels = 1 if img.mode in ('L', 'I', 'I;16', 'F', '1') else 3
                return (channels, img.height, img.width)
        except DECODE_ERRORS as e:
            raise ImageSetError(f'{self.path}: {name} is not a readable image ({e}); remove or regenerate it')

    def _check_shapes(self):
        if self._kind == 'array':
            return tuple(self._array.shape[1:])
        first = self._header_shape(self.names[0])
        for name in self.names[1:]:
            shape = self._header_shape(name)
            if shape != first:
                raise ImageSetError(f'{self.path}: images differ in size: {self.names[0]} is '
                                    f'{"x".join(map(str, first))} (CxHxW) but {name} is {"x".join(map(str, shape))}')
        return first

    def __getitem__(self, i):
        name = self.names[i]
        if self._kind == 'array':
            return self._array[self._index[i]]
        try:
            with self._open_file(name) as f:
                img = PIL.Image.open(io.BytesIO(f.read()))
                img.load()
        except DECODE_ERRORS as e:
            # A truncated or corrupt file can have a valid header: it fails only here, when decoded.
            raise ImageSetError(f'{self.path}: {name} cannot be decoded ({e}); remove or regenerate it')
        if img.mode not in ('L', 'RGB'):
            img = img.convert('L' if self.shape[0] == 1 else 'RGB')
        return _to_chw(np.asarray(img, dtype=np.uint8), name)

    def read_batch(self, indices):
        """uint8 array [B, C, H, W] of the images at the given positions."""
        return np.stack([self[int(i)] for i in indices])

    def file_signature(self):
        """What identifies this exact selection of files: (name, size, mtime_ns) each, or the array file's."""
        if self._kind == 'dir':
            sig = []
            for name in self.names:
                st = os.stat(os.path.join(self.path, name))
                sig.append((name, st.st_size, st.st_mtime_ns))
            return sig
        st = os.stat(self.path)
        return [(os.path.abspath(self.path), st.st_size, st.st_mtime_ns, tuple(int(i) for i in self._index))]

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_zip'] = None   # zip handles are per process (DataLoader workers)
        return state


def _load_sample_array(path):
    if path.lower().endswith('.npy'):
        arr = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            key = next((k for k in ('arr_0', 'samples', 'images') if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ImageSetError(f'{path}: cannot tell which array holds the images (keys: {keys}); '
                                    "name it 'arr_0', 'samples' or 'images'")
            arr = data[key]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ImageSetError(f'{path}: expected uint8 images of shape [N, H, W, C] or [N, C, H, W], '
                            f'got {arr.dtype} {arr.shape}')
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)     # NHWC (ADM/guided-diffusion sample files) -> NCHW
    if arr.shape[0] == 0:
        raise ImageSetError(f'{path}: contains no images')
    return np.ascontiguousarray(arr)
