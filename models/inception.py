"""The FID Inception-v3: a PyTorch network equal to TensorFlow's inception-2015-12-05 graph (pool3 features).

The standard FID numbers come from this particular graph, which differs from torchvision's Inception-v3:
  * input: uint8-range images of any size, resized to 299x299 with TensorFlow's old `resize_bilinear`
    (align_corners=False without half-pixel centres: source coordinate = destination * in/out, clamped at the
    border), then scaled with (x - 128) / 128;
  * every conv is followed by a batch norm without scale (gamma = 1), eps = 1e-3, and a ReLU;
  * average pools inside the blocks exclude the padding (count_include_pad=False);
  * the last block (mixed_10) pools its fourth branch with a 3x3 max pool instead of an average pool;
  * the classifier has 1008 outputs.
Parameter names follow the TorchScript translation that EDM/StyleGAN use (`layers.mixed_4.tower_1.conv_2.beta`
and so on). Weights load, without executing any code from the file, from:
  * EDM/StyleGAN3's `inception-2015-12-05.pkl` (a pickle whose objects are rebuilt as inert records),
  * StyleGAN2-ADA's TorchScript `inception-2015-12-05.pt` (its data.pkl read the same way; code ignored),
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a plain state dict; torch.load(weights_only=True)),
  * a safetensors file with either naming.
"""
import collections
import io
import os
import zipfile

import torch
import torch.nn.functional as F

from torch_utils.restricted_pickle import collect_tensors, read_zip_records, record_load

FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

DETECTOR_FILE = 'inception-2015-12-05.pkl'
DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/' + DETECTOR_FILE
PYTORCH_FID_FILE = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + PYTORCH_FID_FILE


class DetectorError(Exception):
    """The Inception weights cannot be found or read; the message names the file and the fix."""


# -- network -------------------------------------------------------------------------------------------------

class ConvBN(torch.nn.Module):
    """conv (no bias) -> batch norm with fixed statistics (beta, mean, var; scale 1 in the TF graph) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding, self.eps = stride, padding, BN_EPS
        self.weight = torch.nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = torch.nn.Parameter(torch.zeros(cout))
        self.mean = torch.nn.Parameter(torch.zeros(cout))
        self.var = torch.nn.Parameter(torch.ones(cout))
        # pytorch-fid's file stores a batch-norm scale too (all ones for the real weights); kept for exactness.
        self.scale = torch.nn.Parameter(torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, weight=self.scale, bias=self.beta, training=False, eps=self.eps)
        return F.relu(x)


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Sequence(torch.nn.Sequential):
    """An ordered, named chain of layers (the TF towers)."""

    def __init__(self, **layers):
        super().__init__(collections.OrderedDict(layers))


class AvgPool3(torch.nn.Module):
    def forward(self, x):
        return _avg3(x)


class BlockA(torch.nn.Module):          # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, cin, pool_channels):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = Sequence(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = Sequence(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                                conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = Sequence(pool=AvgPool3(), conv=ConvBN(cin, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(torch.nn.Module):          # mixed_3: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = Sequence(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                              conv_2=ConvBN(96, 96, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(torch.nn.Module):          # mixed_4 .. mixed_7 (17x17, factorized 7x7)
    def __init__(self, cin, mid):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = Sequence(conv=ConvBN(cin, mid, 1), conv_1=ConvBN(mid, mid, (1, 7), padding=(0, 3)),
                              conv_2=ConvBN(mid, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = Sequence(conv=ConvBN(cin, mid, 1), conv_1=ConvBN(mid, mid, (7, 1), padding=(3, 0)),
                                conv_2=ConvBN(mid, mid, (1, 7), padding=(0, 3)),
                                conv_3=ConvBN(mid, mid, (7, 1), padding=(3, 0)),
                                conv_4=ConvBN(mid, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = Sequence(pool=AvgPool3(), conv=ConvBN(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(torch.nn.Module):          # mixed_8: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.tower = Sequence(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = Sequence(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                                conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
                                conv_3=ConvBN(192, 192, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(torch.nn.Module):          # mixed_9 (average pool branch), mixed_10 (max pool branch; TF graph quirk)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], 1)


class MaxPool3s2(torch.nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 3, stride=2)


class GlobalAvgPool(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


def resize_tf_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`: output pixel j samples the input at j * in/out
    (no half-pixel offset), clamping at the last row/column. Written as grid_sample with the grid shifted by
    half an input pixel minus half an output pixel, which lands exactly on those coordinates."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


class InceptionV3(torch.nn.Module):
    """FID Inception-v3. forward(images) with images uint8 (or float in [0, 255]) [B, C, H, W], C in {1, 3},
    any H, W -> pool3 features [B, 2048] float32; return_features=False gives the 1008-way softmax instead."""

    def __init__(self):
        super().__init__()
        self.layers = Sequence(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=MaxPool3s2(), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3), pool1=MaxPool3s2(),
            mixed=BlockA(192, 32), mixed_1=BlockA(256, 64), mixed_2=BlockA(288, 64), mixed_3=BlockB(288),
            mixed_4=BlockC(768, 128), mixed_5=BlockC(768, 160), mixed_6=BlockC(768, 160), mixed_7=BlockC(768, 192),
            mixed_8=BlockD(768), mixed_9=BlockE(1280, max_pool=False), mixed_10=BlockE(2048, max_pool=True),
            pool2=GlobalAvgPool())
        self.output = torch.nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images):
        """uint8-range images -> the normalized 299x299 float32 input of the first conv."""
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize_tf_bilinear(x, 299)
        return (x - 128) / 128

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        features = self.layers(self.preprocess(images)).flatten(1)
        if return_features:
            return features
        return torch.softmax(self.output(features), dim=1)


# -- weight names --------------------------------------------------------------------------------------------

def _pytorch_fid_names():
    """Map pytorch-fid (torchvision Inception3) module names onto ours."""
    m = {'Conv2d_1a_3x3': 'layers.conv', 'Conv2d_2a_3x3': 'layers.conv_1', 'Conv2d_2b_3x3': 'layers.conv_2',
         'Conv2d_3b_1x1': 'layers.conv_3', 'Conv2d_4a_3x3': 'layers.conv_4'}
    for tv, ours in [('Mixed_5b', 'mixed'), ('Mixed_5c', 'mixed_1'), ('Mixed_5d', 'mixed_2')]:
        p = 'layers.' + ours
        m.update({f'{tv}.branch1x1': f'{p}.conv', f'{tv}.branch5x5_1': f'{p}.tower.conv',
                  f'{tv}.branch5x5_2': f'{p}.tower.conv_1', f'{tv}.branch3x3dbl_1': f'{p}.tower_1.conv',
                  f'{tv}.branch3x3dbl_2': f'{p}.tower_1.conv_1', f'{tv}.branch3x3dbl_3': f'{p}.tower_1.conv_2',
                  f'{tv}.branch_pool': f'{p}.tower_2.conv'})
    m.update({'Mixed_6a.branch3x3': 'layers.mixed_3.conv', 'Mixed_6a.branch3x3dbl_1': 'layers.mixed_3.tower.conv',
              'Mixed_6a.branch3x3dbl_2': 'layers.mixed_3.tower.conv_1',
              'Mixed_6a.branch3x3dbl_3': 'layers.mixed_3.tower.conv_2'})
    for tv, ours in [('Mixed_6b', 'mixed_4'), ('Mixed_6c', 'mixed_5'), ('Mixed_6d', 'mixed_6'), ('Mixed_6e', 'mixed_7')]:
        p = 'layers.' + ours
        m.update({f'{tv}.branch1x1': f'{p}.conv', f'{tv}.branch_pool': f'{p}.tower_2.conv'})
        for i in range(3):
            m[f'{tv}.branch7x7_{i + 1}'] = f'{p}.tower.' + ('conv' if i == 0 else f'conv_{i}')
        for i in range(5):
            m[f'{tv}.branch7x7dbl_{i + 1}'] = f'{p}.tower_1.' + ('conv' if i == 0 else f'conv_{i}')
    m.update({'Mixed_7a.branch3x3_1': 'layers.mixed_8.tower.conv', 'Mixed_7a.branch3x3_2': 'layers.mixed_8.tower.conv_1'})
    for i in range(4):
        m[f'Mixed_7a.branch7x7x3_{i + 1}'] = 'layers.mixed_8.tower_1.' + ('conv' if i == 0 else f'conv_{i}')
    for tv, ours in [('Mixed_7b', 'mixed_9'), ('Mixed_7c', 'mixed_10')]:
        p = 'layers.' + ours
        m.update({f'{tv}.branch1x1': f'{p}.conv', f'{tv}.branch3x3_1': f'{p}.tower_conv',
                  f'{tv}.branch3x3_2a': f'{p}.tower_mixed_conv', f'{tv}.branch3x3_2b': f'{p}.tower_mixed_conv_1',
                  f'{tv}.branch3x3dbl_1': f'{p}.tower_1_conv', f'{tv}.branch3x3dbl_2': f'{p}.tower_1_conv_1',
                  f'{tv}.branch3x3dbl_3a': f'{p}.tower_1_mixed_conv',
                  f'{tv}.branch3x3dbl_3b': f'{p}.tower_1_mixed_conv_1', f'{tv}.branch_pool': f'{p}.tower_2_conv'})
    return m


PYTORCH_FID_NAMES = _pytorch_fid_names()
_BN_SUFFIX = {'conv.weight': 'weight', 'bn.weight': 'scale', 'bn.bias': 'beta', 'bn.running_mean': 'mean',
              'bn.running_var': 'var'}


def pytorch_fid_to_ours(state):
    """pytorch-fid state dict -> our names (num_batches_tracked and auxiliary heads are dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith('fc.'):
            out['output.' + key[3:]] = value
            continue
        if key.endswith('num_batches_tracked') or key.startswith('AuxLogits.'):
            continue
        module, _, rest = key.rpartition('.')          # e.g. 'Mixed_5b.branch1x1.conv', 'weight'
        module, _, layer = module.rpartition('.')     # 'Mixed_5b.branch1x1', 'conv'
        suffix = f'{layer}.{rest}'
        if module not in PYTORCH_FID_NAMES or suffix not in _BN_SUFFIX:
            raise DetectorError(f'unexpected parameter {key!r} in a pytorch-fid style Inception state dict')
        out[f'{PYTORCH_FID_NAMES[module]}.{_BN_SUFFIX[suffix]}'] = value
    return out


def ours_to_pytorch_fid(state):
    """Our state dict -> pytorch-fid's names (the inverse of pytorch_fid_to_ours; used to write test files)."""
    inverse = {ours: tv for tv, ours in PYTORCH_FID_NAMES.items()}
    back = {v: k for k, v in _BN_SUFFIX.items()}
    out = {}
    for key, value in state.items():
        if key.startswith('output.'):
            out['fc.' + key[7:]] = value
            continue
        module, _, param = key.rpartition('.')
        out[f'{inverse[module]}.{back[param]}'] = value
    return out


# -- reading files without running their code ----------------------------------------------------------------

def _record_load(file, storages=None):
    return record_load(file, source='Inception weight file', storages=storages)


def _collect_tensors(node, prefix, out, seen):
    collect_tensors(node, prefix, out, seen)


def _read_torchscript_archive(zf, names):
    return read_zip_records(zf, source='Inception weight file')


def read_state_dict(path):
    """Tensors of an Inception weight file in any supported format, under their names in the file."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if path.endswith('.safetensors') or (len(head) > 9 and head[8:9] == b'{'):
        import safetensors.torch
        return dict(safetensors.torch.load_file(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith('constants.pkl') or '/code/' in n for n in names):
                tree = _read_torchscript_archive(zf, names)      # TorchScript: parameters only, code unread
                out = {}
                _collect_tensors(tree, '', out, set())
                return out
        state = torch.load(path, weights_only=True, map_location='cpu')
        if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
            state = state['state_dict']
        return dict(state)
    with open(path, 'rb') as f:
        tree = _record_load(f)
    out = {}
    _collect_tensors(tree, '', out, set())
    return out


def _to_our_names(state):
    if any(k.startswith('Conv2d_1a_3x3.') for k in state):
        return pytorch_fid_to_ours(state)
    # Files saved from a wrapper may carry a prefix before 'layers.' (e.g. 'model.'); strip it.
    prefixes = {k[:k.index('layers.')] for k in state if 'layers.' in k}
    if len(prefixes) == 1:
        p = prefixes.pop()
        state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    return state


def load_inception(path, device='cpu'):
    """InceptionV3 with the weights of the file at `path` (any supported format)."""
    if not os.path.isfile(path):
        raise DetectorError(missing_detector_message(path))
    try:
        state = _to_our_names(read_state_dict(path))
    except DetectorError:
        raise
    except Exception as e:
        raise DetectorError(f'{path}: cannot read Inception weights from this file ({type(e).__name__}: {e})')
    net = InceptionV3()
    expected = net.state_dict()
    if not any(k.endswith('.scale') for k in state):   # EDM/StyleGAN files: the TF graph has no BN scale
        state.update({k: torch.ones_like(v) for k, v in expected.items() if k.endswith('.scale')})
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DetectorError(f'{path}: not an FID Inception-v3 weight file; {len(missing)} parameters missing '
                            f'(first: {", ".join(missing[:3])})')
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DetectorError(f'{path}: parameter {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}')
    net.load_state_dict({k: state[k].to(torch.float32) for k in expected})
    return net.to(device)


def missing_detector_message(path):
    return (f'Inception weights not found at {path}. This machine cannot download them: fetch {DETECTOR_URL} '
            f'(or pytorch-fid\'s {PYTORCH_FID_URL}) elsewhere and put the file at {path}, or point --detector=PATH '
            f'at it.')
