"""Scorers: each head on a tiny random-weight instance of its real architecture, saved in the real file format
and loaded through the public path, equals the score computed by an independent path (open_clip's own checkpoint
loading and forward, transformers' own CLIP forward, the aesthetic MLP by hand); the analytic rewards equal the
model's exact posterior and density; bad files are one clear error."""
import json
import os

import pytest
import torch

from scorers import ScorerError, load_scorer
from scorers.clip import to_pil

PROMPTS = ['a red digit seven', 'two cats on a sofa', 'a photo of a blue sky', 'x']


def tiny_open_clip(tmp_path, base, name, embed_dim=16, image_size=32):
    """Register a shrunken copy of open_clip's `base` config (same architecture family, random weights)."""
    import open_clip
    cfg = open_clip.get_model_config(base)
    cfg['embed_dim'] = embed_dim
    cfg['vision_cfg'].update(image_size=image_size, layers=2, width=64, patch_size=8)
    if 'head_width' in cfg['vision_cfg']:
        cfg['vision_cfg']['head_width'] = 32
    cfg['text_cfg'].update(width=32, heads=2, layers=2)
    path = tmp_path / f'{name}.json'
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():       # random, non-degenerate projections
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def images(n=4, size=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2.2 - 1.1)


def open_clip_reference(arch, path, imgs, prompts):
    """open_clip's own loading of the checkpoint file, its transform and forward (normalised features)."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
    model.eval()
    pixels = torch.stack([preprocess(p) for p in to_pil(imgs)])
    tokens = open_clip.get_tokenizer(arch)(prompts) if prompts else None
    with torch.no_grad():
        if tokens is None:
            return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1), None
        f_img, f_txt, _ = model(pixels, tokens)
    return f_img, f_txt


def test_hps_equals_open_clip(tmp_path):
    model = tiny_open_clip(tmp_path, 'ViT-H-14', 'tiny-hps-ViT-H-14')
    path = tmp_path / 'HPS_v2.1_compressed.pt'
    torch.save({'state_dict': model.state_dict()}, path)     # the HPSv2 checkpoint layout
    scorer = load_scorer('hps', weights_path=str(path), arch='tiny-hps-ViT-H-14', batch_size=3)
    x = images()
    got = scorer(x, PROMPTS)
    f_img, f_txt = open_clip_reference('tiny-hps-ViT-H-14', path, x, PROMPTS)
    want = (f_img * f_txt).sum(-1).double()
    assert got.shape == (4,) and got.dtype == torch.float64
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert got.std() > 1e-3                       # the scores depend on the image/prompt
    assert torch.equal(scorer.normalise(torch.tensor([-0.5, 0.3, 2.0])), torch.tensor([0.0, 0.3, 1.0]))
    # A file of another architecture (a CLIP ViT-L shape) is refused in one line naming the option.
    other = tiny_open_clip(tmp_path, 'ViT-L-14-quickgelu', 'tiny-other', embed_dim=24)
    bad = tmp_path / 'other.pt'
    torch.save(other.state_dict(), bad)
    with pytest.raises(ScorerError, match=r'not a HPSv2.1.*reward.weights_path') as e:
        load_scorer('hps', weights_path=str(bad), arch='tiny-hps-ViT-H-14')
    assert '\n' not in str(e.value)
    with pytest.raises(ScorerError, match='one prompt'):
        scorer(x, PROMPTS[:2])


def test_clip_score_and_aesthetic_equal_open_clip_and_the_mlp_by_hand(tmp_path):
    from safetensors.torch import save_file
    model = tiny_open_clip(tmp_path, 'ViT-L-14-quickgelu', 'tiny-clip-L14', embed_dim=768)
    path = tmp_path / 'open_clip_model.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = images(size=32)                          # the model's own size: no resize
    got = load_scorer('clip', weights_path=str(path), arch='tiny-clip-L14')(x, PROMPTS)
    f_img, f_txt = open_clip_reference('tiny-clip-L14', path, x, PROMPTS)
    assert torch.allclose(got, (f_img * f_txt).sum(-1).double(), atol=1e-5)
    # The aesthetic MLP in its real state-dict layout (layers.0/2/4/6/7 of 768-1024-128-64-16-1).
    g = torch.Generator().manual_seed(3)
    dims = [768, 1024, 128, 64, 16, 1]
    mlp = {}
    for idx, (i, o) in zip([0, 2, 4, 6, 7], zip(dims, dims[1:])):
        mlp[f'layers.{idx}.weight'] = torch.randn(o, i, generator=g) / i ** 0.5
        mlp[f'layers.{idx}.bias'] = torch.randn(o, generator=g) * 0.1
    mlp_path = tmp_path / 'sac+logos+ava1-l14-linearMSE.pth'
    torch.save(mlp, mlp_path)
    scorer = load_scorer('aesthetic', predictor_path=str(mlp_path), clip_path=str(path), arch='tiny-clip-L14')
    got = scorer(x)
    h = f_img.double()
    for idx in (0, 2, 4, 6, 7):
        h = h @ mlp[f'layers.{idx}.weight'].double().T + mlp[f'layers.{idx}.bias'].double()
    assert torch.allclose(got, h[:, 0], rtol=1e-4, atol=1e-5), (got, h[:, 0])
    with pytest.raises(ScorerError, match='reward.predictor_path'):
        load_scorer('aesthetic', predictor_path=str(tmp_path / 'none.pth'), clip_path=str(path), arch='tiny-clip-L14')


def write_tiny_pickscore(folder):
    """A tiny transformers CLIP model folder and a processor folder with the real CLIP BPE vocabulary."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    tok = open_clip.tokenizer.SimpleTokenizer()
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    names = {'<start_of_text>': '<|startoftext|>', '<end_of_text>': '<|endoftext|>'}   # HF's special tokens
    (folder / 'vocab.json').write_text(json.dumps({names.get(k, k): v for k, v in tok.encoder.items()}))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n')
    tokenizer = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': 32},
                                                                 crop_size={'height': 32, 'width': 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(str(folder / 'processor'))
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder / 'model'))
    return str(folder / 'model'), str(folder / 'processor')


def test_pickscore_equals_transformers_forward(tmp_path):
    from transformers import CLIPModel, CLIPProcessor
    model_dir, proc_dir = write_tiny_pickscore(tmp_path)
    assert os.path.isfile(os.path.join(model_dir, 'model.safetensors'))
    x = images()
    got = load_scorer('pickscore', model=model_dir, processor=proc_dir, batch_size=3)(x, PROMPTS)
    model = CLIPModel.from_pretrained(model_dir).eval()
    inputs = CLIPProcessor.from_pretrained(proc_dir)(images=to_pil(x), text=PROMPTS, padding='max_length',
                                                     truncation=True, max_length=77, return_tensors='pt')
    with torch.no_grad():
        want = model(**inputs).logits_per_image.diagonal().double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got, want)
    with pytest.raises(ScorerError, match=r'reward\.model'):
        load_scorer('pickscore', model=str(tmp_path / 'absent'), processor=proc_dir)


def test_missing_weights_name_file_source_and_option():
    with pytest.raises(ScorerError) as e:
        load_scorer('hps', weights_path='weights/HPS_v2.1_compressed.pt')
    msg = str(e.value)
    assert 'weights/HPS_v2.1_compressed.pt' in msg and 'huggingface.co/xswu/HPSv2' in msg
    assert 'reward.weights_path' in msg and '\n' not in msg
    with pytest.raises(ScorerError, match='unknown scorer'):
        load_scorer('nope')


def test_pickled_code_is_refused(tmp_path):
    import pickle
    path = tmp_path / 'evil.pt'

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': Evil()}, f)
    with pytest.raises(ScorerError, match='not a plain state-dict'):
        load_scorer('hps', weights_path=str(path))


@pytest.fixture(scope='module')
def digits():
    from models.analytic import digit_mixture
    return digit_mixture()


def test_analytic_rewards_are_the_exact_posterior_and_density(digits):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 7, 0, 9])
    x = torch.stack([digits.sample_data(1, generator=g, label=int(y))[0] for y in labels]).reshape(4, 3, 32, 32)
    post = load_scorer('class_posterior', net=digits)(x, labels)
    assert torch.all(post > 0.99)                                 # clean samples of their own class
    wrong = load_scorer('class_posterior', net=digits)(x, (labels + 1) % 10)
    assert torch.all(wrong < 1e-3)
    # The posterior is Bayes' rule on the exact class-conditional densities: p(y|x) = p(x|y) p(y) / sum.
    noisy = x + 6.0 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    scorer = load_scorer('class_posterior', net=digits, sigma=6.0)
    onehots = torch.eye(10, dtype=torch.float64)
    logp = torch.stack([digits.log_density(noisy, 6.0, onehots[c].expand(4, -1)) for c in range(10)], 1)
    bayes = torch.softmax(logp + torch.log(digits.class_prior()), dim=1)
    assert torch.allclose(scorer(noisy, labels), bayes[torch.arange(4), labels], rtol=1e-9, atol=1e-12)
    assert torch.allclose(scorer(noisy, torch.nn.functional.one_hot(labels, 10)), scorer(noisy, labels))
    dens = load_scorer('log_density', net=digits)(x, labels)
    assert torch.allclose(dens * 3072, digits.log_density(x, 0.0, onehots[labels]))
    with pytest.raises(ScorerError, match='class-conditional analytic'):
        load_scorer('class_posterior', net=None)


def test_multi_is_the_weighted_normalised_mean(digits):
    g = torch.Generator().manual_seed(1)
    x = digits.sample_data(3, generator=g, label=2).reshape(3, 3, 32, 32)
    labels = torch.tensor([2, 2, 5])
    multi = load_scorer('multi', net=digits, weights=dict(class_posterior=3.0, log_density=1.0, hps=0.0))
    assert set(multi.heads) == {'class_posterior', 'log_density'}     # zero weight: head not built
    p = load_scorer('class_posterior', net=digits)(x, labels)
    d = load_scorer('log_density', net=digits)(x, labels)
    assert torch.allclose(multi(x, labels), (3 * p + d) / 4)
    assert torch.equal(multi.last_heads['class_posterior'], p)
    with pytest.raises(ScorerError, match='positive weight'):
        load_scorer('multi', net=digits, weights=dict(hps=0))


def test_neg_error_is_the_distance_to_the_exact_solution_of_the_same_noise(digits):
    """-RMSE per pixel to the exact ODE solution of each image's own noise and class (tight-tolerance ground truth),
    alone and inside multi; without the start it is refused (a folder of images does not keep its noise)."""
    from solvers.exact import solve_exact
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([1, 4, 4])
    cond = torch.nn.functional.one_hot(labels, 10).to(torch.float64)
    noise = 80 * torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([80.0, 3.0, 0.002], dtype=torch.float64)
    exact = solve_exact(digits, noise, 80.0, 0.002, cond, rtol=1e-10, atol=1e-10)
    scale = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)[:, None, None, None]
    delta = torch.randn(noise.shape, generator=g, dtype=torch.float64) * scale
    start = dict(noise=noise, sigmas=sigmas, cond=cond)
    got = load_scorer('neg_error', net=digits)(exact + delta, labels, start=start)
    want = -delta.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(got, want, atol=1e-4) and got[0] > -1e-4 and got[2] < -0.4
    multi = load_scorer('multi', net=digits, weights=dict(neg_error=1.0, class_posterior=1.0))
    assert multi.needs_start
    p = load_scorer('class_posterior', net=digits)(exact + delta, labels)
    assert torch.allclose(multi(exact + delta, labels, start=start), (got + p) / 2, atol=1e-9)
    with pytest.raises(ScorerError, match='noise each image started from'):
        load_scorer('neg_error', net=digits)(exact, labels)
