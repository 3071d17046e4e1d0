# Smoke run of VCQ's own system (no paper row; VCQ §4.1's setup at toy size): a tiny 1D (TiTok)
# tokenizer, a ViT over 4x4 patches of 32x32 built-in procedural images (no download) with L = 32 latent
# tokens, quantized by FVQ with VCQ's cosine schedule (K_t from 2 to 256 along the 32 tokens), CPU.
# Trains on 2 CPU cores in under 3 minutes; then train_ar.py config/ar_smoke_1d.py and sample.py run on it.
out_dir = 'out-smoke-1d'
device = 'cpu'
image_size = 32
num_workers = 0
tokenizer_type = 'titok'
titok_preset = 'tiny'  # ViTs of width 64, depth 2
patch_size = 4
num_latent_tokens = 32
quantizer = 'fvq'
codebook_size = 256
code_dim = 16
l2_norm = False
bridge_dim = 64  # a small bridge: at K = 256 (groups of 1 code) the default 256-wide one costs more than the ViTs
vcq_schedule = 'cosine'
vcq_k_min = 2
batch_size = 32
max_iters = 600
learning_rate = 1e-3
base_batch_size = 32
lr_schedule = 'annealing'
warmup_frac = 0.1
constant_frac = 0.3
perceptual_weight = 0.0
disc_weight = 0.0
rec_loss = 'l1'  # VCQ trains with L1 (+ LPIPS + PatchGAN, off at this size)
log_interval = 50
eval_interval = 300
eval_images = 32
