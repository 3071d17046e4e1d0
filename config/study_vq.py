# Study, GPU scale (README 'Results'): plain VQ (LlamaGen's VectorQuantizer: l2-normalised codes): FVQ Table 3
# row 2, usage 0.29% at 40 epochs.
# Targets the effect, not the number: same data, model, steps and optimiser in every study_* config (the
# others include this file); only the quantizer differs. 128x128 real images, K = 16,384 x 256-d codes (FVQ
# Table 3 rows 2 and 6); on one H100 about 1.5 minutes alone, 5 minutes with the four arms side
# by side.
# Run: python train_tokenizer.py config/study_vq.py
out_dir = 'out-study-vq'
data_dir = '../shared/data/imagenet_1k_samples'  # any ImageFolder root/<class>/*.JPEG (data/imagenet/train)
eval_images = 100  # held out of data_dir (the same 100 for every arm)
image_size = 128
num_workers = 3
# model: a LlamaGen-layout VQGAN at quarter width, 16x downsampling -> 8x8 tokens
ch = 64
num_res_blocks = 1
z_channels = 128
code_dim = 256
# losses: L2 reconstruction only (LPIPS's VGG weights need a download; no GAN: a reconstruction-only
# comparison)
perceptual_weight = 0.0
disc_weight = 0.0
# optimisation: FVQ Table 6's recipe (Adam (0.9, 0.95), warmup 10% from 0.005x, constant 30% of the rest,
# linear decay to 0.01x, grad clip 1.0), one learning rate for every arm
batch_size = 64
base_batch_size = 64
learning_rate = 2e-4
lr_schedule = 'annealing'
warmup_frac = 0.1
constant_frac = 0.3  # "baselr(0.3)": 30% of the post-warmup steps at the peak lr (FVQ Table 6)
max_iters = 1000
log_interval = 25
eval_interval = 500
# the quantizer, the only difference between the arms: here the default, plain VQ with l2-normalised codes
