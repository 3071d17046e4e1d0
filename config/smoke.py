# Smoke run and two-minute demo of FVQ's point (no paper row; targets the effect of FVQ Table 3 rows 2 vs 6):
# a tiny VQGAN with FVQ's VQBridge and 256-dim codes, the release's settings (l2 off, learning annealing), on
# the built-in procedural images (no download), 32x32 -> 8x8 tokens, K = 256, CPU. The bridge keeps most of the
# codebook in use (counted over the last 10 K tokens) where plain VQ with the same 256-dim codes
# (--quantizer=vq --l2_norm=True) collapses to a few codes. LPIPS and the GAN are off: LPIPS needs a download,
# and at this size and length the GAN only slows the reconstruction down. The bridge is 64 wide (the release's:
# 256), which makes each step cheaper and buys the steps that make the reconstructions recognisable.
out_dir = 'out-smoke'
device = 'cpu'
image_size = 32
num_workers = 0
ch = 16
ch_mult = (1, 2, 2)  # downsample 4: 8x8 tokens
num_res_blocks = 1
z_channels = 32
quantizer = 'fvq'  # VQBridge (the default projector), groups of 1 code (quantizers.bridge_group_size_for)
codebook_size = 256
code_dim = 256
l2_norm = False
bridge_dim = 64
batch_size = 16
max_iters = 1000
learning_rate = 1e-3
base_batch_size = 16
lr_schedule = 'annealing'  # FVQ's learning annealing, Table 6 fractions
warmup_frac = 0.1
constant_frac = 0.3  # "baselr(0.3)": 30% of the post-warmup steps at the peak lr (FVQ Table 6)
perceptual_weight = 0.0
disc_weight = 0.0
log_interval = 50
eval_interval = 250
eval_images = 32
