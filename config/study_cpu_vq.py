# Study, CPU scale (README 'Results'): plain VQ (LlamaGen's VectorQuantizer: l2-normalised codes): FVQ Table 3
# row 2, usage 0.29% at 40 epochs.
# Targets the effect, not the number: same data, model, steps and optimiser in every study_cpu_* config (the
# others include this file); only the quantizer differs. 64x64 real images, K = 4,096 x 256-d codes; 11 to 15
# minutes on 2 CPU cores.
# Run: python train_tokenizer.py config/study_cpu_vq.py
out_dir = 'out-study-cpu-vq'
data_dir = '../shared/data/imagenet_1k_samples'  # any ImageFolder root/<class>/*.JPEG
eval_images = 100  # held out of data_dir (the same 100 for every arm)
image_size = 64
num_workers = 1
device = 'cpu'
# model: a LlamaGen-layout VQGAN at 1/8 width, 8x downsampling -> 8x8 tokens
ch = 16
ch_mult = (1, 2, 2, 4)
num_res_blocks = 1
z_channels = 64
codebook_size = 4096
code_dim = 256
# losses: L2 reconstruction only (LPIPS's VGG weights need a download; no GAN: a reconstruction-only
# comparison)
perceptual_weight = 0.0
disc_weight = 0.0
# optimisation: FVQ Table 6's recipe (Adam (0.9, 0.95), warmup 10% from 0.005x, constant 30% of the rest,
# linear decay to 0.01x, grad clip 1.0), one learning rate for every arm
batch_size = 16
base_batch_size = 16
learning_rate = 3e-4
lr_schedule = 'annealing'
warmup_frac = 0.1
constant_frac = 0.3  # "baselr(0.3)": 30% of the post-warmup steps at the peak lr (FVQ Table 6)
max_iters = 1200
log_interval = 25
eval_interval = 200
# the quantizer, the only difference between the arms: here the default, plain VQ with l2-normalised codes
