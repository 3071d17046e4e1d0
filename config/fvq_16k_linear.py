# FVQ paper Table 5 row "linear+Annealing", 16k: the SimVQ-style single linear D -> D projector instead of VQBridge,
# with learning annealing, 16,384 codes x 256 channels -> rFID 1.52, usage 53%. Everything else as config/fvq_16k.py
# (FVQ Table 6 recipe, 40 epochs).
out_dir = 'out-fvq-16k-linear'
data_dir = 'data/imagenet/train'
image_size = 256
# optimisation (Table 6)
batch_size = 128  # global
gradient_accumulation_steps = 1
max_iters = 40 * 1281167 // 128  # 40 ImageNet epochs
learning_rate = 1e-4
base_batch_size = 128
beta1 = 0.9
beta2 = 0.95
lr_schedule = 'annealing'
warmup_frac = 0.1  # warmup(0.1) from 0.005x to 1x
constant_frac = 0.27  # "baselr(0.3)" is 30% of the 90% after warmup (the release's lrT=0.3 of the remaining steps)
grad_clip = 1.0
# model: LlamaGen VQ-16 encoder/decoder
ch = 128
ch_mult = (1, 1, 2, 2, 4)
num_res_blocks = 2
z_channels = 256
dropout = 0.0
quantizer = 'fvq'
codebook_size = 16384
code_dim = 256
projector = 'linear'
beta = 0.25
l2_norm = False
chunk_size = 2048
# losses (Table 6: commit beta 0.25, LPIPS 1.0, GAN 0.5; LlamaGen's L2, PatchGAN hinge from iteration 20k)
rec_loss = 'l2'
perceptual_weight = 1.0
disc_weight = 0.5
disc_start = 20000
disc_loss = 'hinge'
gen_loss = 'hinge'
adaptive_disc_weight = False
lecam_weight = 0.0
lecam_decay = 0.999
disc_layers = 3
disc_ch = 64
# system
eval_interval = 5000
log_interval = 100
compile = False
dtype = 'bfloat16'
seed = 0
