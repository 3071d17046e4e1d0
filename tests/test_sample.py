import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokenizer import CHECKPOINT_FORMAT

from conftest import ROOT
from quantizers import codebook_size_schedule
from sample import cfg_weights, sample_from_logits, sample_tokens, generate, sample_images, load_gpt
from test_train_ar import save_tiny_tokenizer, tiny_gpt, TINY_TOKENIZER, llamagen_forward, llamagen_freqs_cis
from tokenizer import Tokenizer, atomic_save, to_uint8


pytestmark = pytest.mark.usefixtures('one_torch_thread')


# -----------------------------------------------------------------------------
# CFG schedules

def test_cfg_schedules_start_at_one_and_end_at_w():
    T, w, p = 256, 10.0, 1.5
    vcq_sizes = codebook_size_schedule('cosine', 2, 16384, T)
    for schedule, sizes in (('cosine', None), ('linear', None), ('codebook_size_aware', None),
                            ('codebook_size_aware', vcq_sizes)):
        weights = cfg_weights(schedule, w, p, T, sizes)
        assert weights.shape == (T,)
        assert weights[0].item() == 1.0 and abs(weights[-1].item() - w) < 1e-9, schedule
        assert (weights.diff() >= -1e-12).all(), schedule  # non-decreasing ramps
    assert torch.equal(cfg_weights('constant', w, p, T), torch.full((T,), w, dtype=torch.float64))
    # on a constant codebook, codebook-size-aware CFG is the standard cosine-power schedule
    constant = [4096] * T
    assert torch.equal(cfg_weights('codebook_size_aware', w, p, T, constant), cfg_weights('cosine', w, p, T))
    # VCQ: r_t = (log K_t - log K_min) / (log K_max - log K_min) inside the cosine-power formula
    t = 200
    r = (math.log(vcq_sizes[t]) - math.log(2)) / (math.log(16384) - math.log(2))
    expected = 1 + (w - 1) * (1 - math.cos(math.pi * r ** p)) / 2
    assert abs(cfg_weights('codebook_size_aware', w, p, T, vcq_sizes)[t].item() - expected) < 1e-9
    x = t / (T - 1)
    cosine = 1 + (w - 1) * (1 - math.cos(math.pi * x ** p)) / 2
    assert abs(cfg_weights('cosine', w, p, T)[t].item() - cosine) < 1e-9
    assert abs(cfg_weights('linear', w, p, T)[t].item() - (1 + (w - 1) * x)) < 1e-9


# -----------------------------------------------------------------------------
# token sampling

def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 3
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_from_logits(logits, temperature=2.0, top_k=1, generator=g), logits.argmax(-1))
    # whole sequences: top_k=1 sampling equals argmax decoding (also checked against a full recompute)
    model = tiny_gpt()
    labels = torch.tensor([2, 5])
    greedy = generate(model, labels, top_k=1, temperature=0.7)
    assert torch.equal(greedy, generate(model, labels, top_k=1, temperature=3.0, top_p=0.5))


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tokens = sample_from_logits(probs.log(), top_p=0.7, generator=g)
    counts = torch.bincount(tokens, minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    assert abs(counts[0].item() / 4000 - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    full = torch.bincount(sample_from_logits(probs.log(), generator=g), minlength=4)
    assert (full > 0).all()


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_cfg_scale_one_equals_no_guidance(temperature):
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 7])
    plain = sample_tokens(model, labels, None, temperature, generator=torch.Generator().manual_seed(3))
    guided = sample_tokens(model, labels, torch.ones(model.seq_len), temperature,
                           generator=torch.Generator().manual_seed(3))  # [cond; uncond] batch with w_t = 1
    assert torch.equal(plain, guided)
    stronger = sample_tokens(model, labels, torch.full((model.seq_len,), 4.0), temperature,
                             generator=torch.Generator().manual_seed(3))
    assert not torch.equal(plain, stronger)  # guidance is really applied when w != 1


def test_vcq_masking_never_emits_codes_beyond_k_t():
    model = tiny_gpt(K=64, grid=4)
    sizes = codebook_size_schedule('cosine', 2, 64, model.seq_len)  # K_0 = 2 ... K_15 = 64
    labels = torch.arange(10).repeat(20)  # 200 sequences
    g = torch.Generator().manual_seed(0)
    codes = generate(model, labels, cfg_scale=5.0, cfg_schedule='codebook_size_aware', cfg_power=1.5,
                     temperature=5.0, codebook_sizes=sizes, generator=g)
    assert (codes < sizes[None, :]).all()
    assert codes[:, 0].unique().tolist() == [0, 1]  # K_0 = 2, and a hot temperature reaches both
    unmasked = generate(model, labels, temperature=5.0, generator=g)
    assert (unmasked[:, 0] >= 2).any()  # without the mask the same model does emit larger codes there


def test_class_id_out_of_range_is_an_error():
    model = tiny_gpt()  # 10 classes; id 10 is the null class
    for labels in ([3, 10], [-1, 2]):
        with pytest.raises(ValueError, match='out of range'):
            generate(model, torch.tensor(labels))


# -----------------------------------------------------------------------------
# decoding and loading

def test_sample_images_decode_in_float32_under_bf16_autocast():
    """The GPT samples under the caller's autocast; the tokenizer decodes its codes in float32 regardless."""
    model = tiny_gpt()  # K = 64 on a 4 x 4 grid: 8px images through the tiny tokenizer
    torch.manual_seed(0)
    tokenizer = Tokenizer(**TINY_TOKENIZER).eval()
    labels = torch.arange(10)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        images = sample_images(model, tokenizer, labels, generator=torch.Generator().manual_seed(0))
        codes = generate(model, labels, generator=torch.Generator().manual_seed(0)).reshape(10, 4, 4)
        bf16 = to_uint8(tokenizer.decode(codes).float()).permute(0, 2, 3, 1)
    plain = to_uint8(tokenizer.decode(codes)).permute(0, 2, 3, 1)
    assert images.dtype == torch.uint8 and torch.equal(images, plain)
    assert not torch.equal(bf16, plain)  # a bf16 decode does move pixels


def test_load_gpt_maps_the_checkpoint_and_drops_the_optimiser(tmp_path, monkeypatch):
    model = tiny_gpt(adaln=True)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1]), torch.randint(0, 64, (1, 15))).sum().backward()
    optimizer.step()
    model_args = dict(codebook_size=64, num_classes=10, grid_h=4, grid_w=4, n_layer=2, n_head=2, n_embd=32,
                      adaln=True)
    path = str(tmp_path / 'ckpt.pt')
    settings = {'kind': 'gpt', 'format': CHECKPOINT_FORMAT,
                'model_args': model_args, 'config': {'seed': 3}, 'tokenizer_ckpt': 'tok.pt',
                'tokenizer_fingerprint': '0123', 'image_size': 8, 'codebook_sizes': None}
    atomic_save({**settings, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                 'rng_states': [torch.get_rng_state()]}, path)
    calls = []
    torch_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: calls.append(kw) or torch_load(*a, **kw))
    loaded, loaded_settings = load_gpt(path, 'cpu')
    assert calls == [dict(map_location='cpu', mmap=True, weights_only=False)]
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded_settings == settings
    # a checkpoint of another format (an older nanoVQ's) is refused, naming the step to re-run
    atomic_save({**settings, 'format': CHECKPOINT_FORMAT - 1}, path)
    with pytest.raises(ValueError, match='older nanoVQ.*re-run train_ar.py'):
        load_gpt(path, 'cpu')


def test_sample_script_decodes_with_the_gpt_s_tokenizer(tmp_path, monkeypatch):
    """The GPT checkpoint records its tokenizer's weights: a tokenizer retrained in place at the recorded
    path is refused (an explicit --tokenizer_ckpt is the user's choice), and so is one of another grid."""
    from tokenizer import load_checkpoint, state_fingerprint, tokenizer_weights
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt', image_size=8)  # 8px -> 4 x 4 codes, K = 64
    model = tiny_gpt()
    gpt = str(tmp_path / 'gpt.pt')

    def save_gpt(image_size):
        fingerprint = state_fingerprint(tokenizer_weights(load_checkpoint(tok, 'tokenizer')))
        model_args = dict(codebook_size=64, num_classes=10, grid_h=4, grid_w=4, n_layer=2, n_head=2,
                          n_embd=32)
        atomic_save({'kind': 'gpt', 'format': CHECKPOINT_FORMAT,
                     'model': model.state_dict(), 'image_size': image_size, 'config': {},
                     'model_args': model_args, 'tokenizer_ckpt': tok, 'codebook_sizes': None,
                     'tokenizer_iter': 0, 'tokenizer_fingerprint': fingerprint}, gpt)

    def sample(*args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--ckpt={gpt}', f'--out_dir={tmp_path / "s"}',
                                          '--device=cpu', '--num_samples=2', '--batch_size=2',
                                          '--grid_per_class=1', *args])
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')

    save_gpt(image_size=8)
    sample()
    with np.load(tmp_path / 's' / 'samples.npz') as f:
        assert f['arr_0'].shape == (2, 8, 8, 3)
    checkpoint = torch.load(tok, weights_only=False)  # the tokenizer retrained in place
    checkpoint['model']['decoder.conv_out.bias'] += 0.1
    checkpoint['iter_num'] = 5
    atomic_save(checkpoint, tok)
    with pytest.raises(ValueError, match=r'not the one whose codes the GPT was trained on .*at iteration 5, '
                                         r'the GPT.s \w+ at iteration 0'):
        sample()
    sample(f'--tokenizer_ckpt={tok}', '--overwrite=True')  # named explicitly: decodes
    save_gpt(image_size=16)
    with pytest.raises(ValueError, match=r'at 16px are \(64, \(8, 8\)\), the GPT.s \(64, \(4, 4\)\)'):
        sample(f'--tokenizer_ckpt={tok}')


def save_llamagen_gpt(path, container='model', K=64, classes=10, C=128, n_layer=2, seed=0):
    """A random GPT in LlamaGen's layout (autoregressive/models/gpt.py's state_dict names and shapes; width
    128: 2 heads of 64) saved as its release is: torch.save of {'model': state_dict} (DDP), {'module': ...}
    (DeepSpeed), {'state_dict': ...} or the bare state_dict (FSDP, container None)."""
    g = torch.Generator().manual_seed(seed)
    hidden = 512  # LlamaGen's find_multiple(int(2 * 4 * 128 / 3), 256)
    shapes = {'tok_embeddings.weight': (K, C), 'cls_embedding.embedding_table.weight': (classes + 1, C),
              'norm.weight': (C,), 'output.weight': (K, C)}
    for i in range(n_layer):
        shapes.update({f'layers.{i}.attention.wqkv.weight': (3 * C, C),
                       f'layers.{i}.attention.wo.weight': (C, C),
                       f'layers.{i}.feed_forward.w1.weight': (hidden, C),
                       f'layers.{i}.feed_forward.w3.weight': (hidden, C),
                       f'layers.{i}.feed_forward.w2.weight': (C, hidden),
                       f'layers.{i}.attention_norm.weight': (C,), f'layers.{i}.ffn_norm.weight': (C,)})
    state = {k: 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1 else
             0.1 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    torch.save(state if container is None else {container: state}, str(path))
    return state


@pytest.mark.parametrize('container', ['model', 'module', 'state_dict', None])
def test_load_gpt_reads_llamagen_s_release(container, tmp_path):
    """A LlamaGen c2i checkpoint loads, converted in memory: its size from the shapes, the grid from the file
    name's image size over 16 (c2i_T_64.pt: 4 x 4), the class table's last row the null class; its logits are
    LlamaGen's forward computed from the raw state_dict."""
    path = tmp_path / 'c2i_T_64.pt'
    state = save_llamagen_gpt(path, container)
    model, settings = load_gpt(str(path), 'cpu')
    assert (model.n_layer, model.n_head, model.n_embd) == (2, 2, 128)
    assert (model.codebook_size, model.num_classes) == (64, 10)
    assert (model.grid_h, model.grid_w, settings['image_size'], settings['tokenizer_ckpt']) == (4, 4, 64, '')
    assert not model.training and settings['codebook_sizes'] is None
    labels, codes = torch.tensor([0, 7, 10]), torch.randint(0, 64, (3, 15))  # 10: LlamaGen's null class
    with torch.no_grad():
        logits = model(labels, codes)
    reference = llamagen_forward(state, labels, codes, 2, llamagen_freqs_cis(4, 4, 64))
    torch.testing.assert_close(logits, reference.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(model.null_class_embedding, state['cls_embedding.embedding_table.weight'][-1])
    save_llamagen_gpt(tmp_path / 'gpt.pt', container)  # no image size in the name: 256px, a 16 x 16 grid
    assert load_gpt(str(tmp_path / 'gpt.pt'), 'cpu')[0].seq_len == 256


def test_load_gpt_names_both_layouts_for_another_file(tmp_path):
    path = str(tmp_path / 'other.pt')
    torch.save({'model': {'weight': torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"not a gpt checkpoint of this nanoVQ.*nor is it LlamaGen's class-"
                                         r"conditional GPT .*cls_embedding.embedding_table"):
        load_gpt(path, 'cpu')


def test_sample_script_samples_a_llamagen_gpt(tmp_path, monkeypatch):
    """sample.py with a LlamaGen-layout GPT and a tokenizer whose grid matches (16x downsampling: 64px -> 4 x
    4 codes, K = 64) writes a valid .npz; without tokenizer_ckpt, or with a tokenizer of another grid, it
    stops with an error naming what to set or what differs."""
    gpt = tmp_path / 'c2i_T_64.pt'
    save_llamagen_gpt(gpt)
    model_args = dict(TINY_TOKENIZER, ch_mult=(1, 1, 1, 1, 1), quantizer_args=None)
    torch.manual_seed(0)
    atomic_save({'kind': 'tokenizer', 'format': CHECKPOINT_FORMAT,
                 'model': Tokenizer(**model_args).state_dict(), 'model_args': model_args,
                 'iter_num': 0, 'config': {'image_size': 64, 'data_dir': ''}}, str(tmp_path / 'tok.pt'))

    def sample(*args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--ckpt={gpt}', f'--out_dir={tmp_path / "s"}',
                                          '--device=cpu', '--num_samples=3', '--batch_size=2',
                                          '--cfg_scale=4.0', '--grid_per_class=1', '--grid_classes=(0, 9)',
                                          *args])
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')

    with pytest.raises(ValueError, match="records no tokenizer: set tokenizer_ckpt"):
        sample()
    sample(f'--tokenizer_ckpt={tmp_path / "tok.pt"}')
    with np.load(tmp_path / 's' / 'samples.npz') as f:
        assert f['arr_0'].shape == (3, 64, 64, 3) and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_1'], np.arange(3) % 10)
    with pytest.raises(ValueError, match=r"at 64px are \(64, \(32, 32\)\), the GPT.s \(64, \(4, 4\)\)"):
        sample(f'--tokenizer_ckpt={save_tiny_tokenizer(tmp_path / "tok2.pt", image_size=64)}')


# -----------------------------------------------------------------------------
# DDP (torchrun, gloo on CPU) code extraction, training and sampling on a VCQ tokenizer

@pytest.mark.slow
def test_ddp_vcq_chain(tmp_path):
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt', quantizer_args={'vcq_schedule': 'cosine', 'vcq_k_min': 2,
                                                                   'vcq_seq_len': 256})
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def run(args):
        result = subprocess.run(torchrun + args, cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    out = tmp_path / 'ar'
    run(['train_ar.py', f'--tokenizer_ckpt={tok}', f'--out_dir={out}', '--num_images=7', '--ten_crop=False',
         '--device=cpu', '--ar_model=B', '--n_layer=1', '--n_head=2', '--n_embd=32', '--batch_size=4',
         '--num_workers=0', '--max_iters=2', '--log_interval=1'])
    # each rank wrote its own images' rows: image 5 (rank 1) equals a direct encode
    from tokenizer import load_tokenizer, make_dataset
    tokenizer = load_tokenizer(tok)
    image = make_dataset('', 32, train=True, num_images=7, augment=False)[5][0][None]
    codes = np.load(out / 'codes' / 'codes.npy')
    direct = tokenizer.encode(torch.cat([image, image.flip(-1)])).reshape(2, 256)
    np.testing.assert_array_equal(codes[10:12], direct)
    sizes = tokenizer.quantizer.codebook_sizes
    assert torch.equal(torch.from_numpy(np.load(out / 'codes' / 'codebook_sizes.npy')), sizes)
    assert (torch.from_numpy(codes.astype(np.int64)) < sizes[None]).all()
    checkpoint = torch.load(out / 'ckpt.pt', weights_only=False)
    assert checkpoint['codebook_sizes'] == sizes.tolist() and checkpoint['iter_num'] == 2
    result = run(['sample.py', f'--ckpt={out / "ckpt.pt"}', '--num_samples=5', '--batch_size=2',
                  '--cfg_scale=3.0', '--cfg_schedule=codebook_size_aware', '--cfg_power=1.5',
                  '--grid_classes=(0,)', '--grid_per_class=2', '--device=cpu'])
    assert 'images/s' in result.stdout
    with np.load(out / 'samples.npz') as f:
        assert f['arr_0'].shape == (5, 32, 32, 3) and f['arr_0'].dtype == np.uint8
        np.testing.assert_array_equal(f['arr_1'], np.arange(5) % 10)
    # the rank parts merged
    assert sorted(os.listdir(out)) == ['.lock', 'ckpt.pt', 'codes', 'log.jsonl', 'samples.npz',
                                       'samples_grid.png']


@pytest.mark.parametrize('option,message', [
    ({'cfg_scale': 0.5}, 'cfg_scale must be >= 1.0 (1.0 = no guidance)'),
    ({'top_p': 1.5}, 'top_p must be in (0, 1]'), ({'top_p': 0.0}, 'top_p must be in (0, 1]'),
    ({'top_k': -1}, 'top_k must be >= 0'), ({'temperature': 0.0}, 'temperature must be > 0'),
    ({'cfg_schedule': 'exp'}, "cfg_schedule must be 'constant', 'linear', 'cosine' or 'codebook_size_aware', "
                               "got 'exp'"),
    ({'cfg_schedule': 'exp', 'cfg_scale': 3.0}, 'cfg_schedule must be'),
    ({'cfg_power': 0.0, 'cfg_schedule': 'cosine', 'cfg_scale': 3.0}, 'cfg_power must be > 0')])
def test_bad_sampling_options_are_refused(option, message):
    model = tiny_gpt()
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError) as error:
        generate(model, labels, **option)
    assert message in str(error.value)


@pytest.mark.parametrize('arg', ['--num_samples=0', '--batch_size=0', '--grid_per_class=0', '--cfg_scale=0.5',
                                 '--top_p=2.0', '--sample_name=sub/dir/x', '--sample_name=..'])
def test_sample_script_refuses_bad_options_before_writing(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['sample.py', '--ckpt=does-not-matter.pt', f'--out_dir={tmp_path / "s"}',
                                      '--device=cpu', arg])
    with pytest.raises(ValueError, match='must be'):
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    assert not os.path.exists(tmp_path / 's')


def test_samples_are_never_replaced_unasked_nor_left_partial(tmp_path, monkeypatch):
    """Under out_dir's lock: a second run stops naming the holder, and an existing samples file is refused
    before anything is sampled unless --overwrite=True; a full disk leaves no samples file, nor a part."""
    import fcntl
    tok = save_tiny_tokenizer(tmp_path / 'tok.pt', image_size=8)  # 8px -> 4 x 4 codes, K = 64
    model_args = dict(codebook_size=64, num_classes=10, grid_h=4, grid_w=4, n_layer=2, n_head=2, n_embd=32)
    atomic_save({'kind': 'gpt', 'format': CHECKPOINT_FORMAT, 'model': tiny_gpt().state_dict(),
                 'image_size': 8, 'config': {}, 'model_args': model_args, 'tokenizer_ckpt': '',
                 'codebook_sizes': None, 'tokenizer_iter': 0, 'tokenizer_fingerprint': None},
                str(tmp_path / 'gpt.pt'))
    out = tmp_path / 's'

    def sample(*args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, 'argv', ['sample.py', f'--ckpt={tmp_path / "gpt.pt"}', f'--out_dir={out}',
                                          f'--tokenizer_ckpt={tok}', '--device=cpu', '--num_samples=2',
                                          '--batch_size=2', '--grid_per_class=1', *args])
        runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')

    os.makedirs(out)
    with open(out / '.lock', 'w') as holder:  # another run's lock (flock: per open file, even in a process)
        fcntl.flock(holder, fcntl.LOCK_EX)
        print('pid 12345: sample.py --ckpt=other.pt', file=holder, flush=True)
        with pytest.raises(RuntimeError, match=rf'{out} is in use by another run \(pid 12345: sample.py'):
            sample()
    assert os.listdir(out) == ['.lock']
    sample()
    written = (out / 'samples.npz').read_bytes()
    monkeypatch.setattr(torch, 'multinomial', lambda *args, **kwargs: 1 / 0)  # nothing is sampled
    with pytest.raises(FileExistsError, match=f"{out / 'samples.npz'} already exists: --overwrite=True"):
        sample()
    assert (out / 'samples.npz').read_bytes() == written
    monkeypatch.undo()
    savez = np.savez

    def disk_full(file, **arrays):  # writes, then finds the disk full
        savez(file, **arrays)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'savez', disk_full)
    with pytest.raises(OSError, match='disk is full'):
        sample('--sample_name=again')
    assert sorted(os.listdir(out)) == ['.lock', 'samples.npz', 'samples_grid.png']
