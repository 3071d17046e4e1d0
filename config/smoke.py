# Smoke run (no paper row): a tiny VQGAN + plain VQ (LlamaGen-style, l2-normalised 8-dim codes) on the built-in
# procedural data, 64x64 images, CPU: about 3 minutes on 2 cores. The held-out PSNR rises from ~10 dB to ~15 dB.
# LPIPS and the GAN are off: LPIPS would need a download, and at this size and length the GAN only slows the
# reconstruction down (tried: disc_weight 0.1 from iter 200 doubled the reconstruction loss).
out_dir = 'out-smoke'
device = 'cpu'
image_size = 64
num_workers = 0
ch = 32
ch_mult = (1, 2, 2)  # downsample 4: 16x16 tokens
num_res_blocks = 1
z_channels = 64
quantizer = 'vq'
codebook_size = 512
code_dim = 8
quantizer_args = {'l2_norm': True, 'beta': 0.25}
batch_size = 8
max_iters = 300
learning_rate = 1e-3
base_batch_size = 8
lr_schedule = 'annealing'  # FVQ's learning annealing, Table 6 fractions
warmup_frac = 0.1
constant_frac = 0.3
perceptual_weight = 0.0
disc_weight = 0.0
log_interval = 25
eval_interval = 100
eval_images = 32
