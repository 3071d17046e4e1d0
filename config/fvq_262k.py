# FVQ paper Table 3 row 11: VQBridge, 262,144 codes x 256 channels, 40 epochs, learning annealing, ImageNet 256x256,
# 16x downsampling -> rFID 0.95, usage 100%. Recipe: FVQ Table 6 and the release's scripts/recon/FVQ-262144.sh
# (batch 128, lr 1e-4, Adam (0.9, 0.95), QBridge-L/8: groups of 64 codes, bf16, grad clip 1.0).
out_dir = 'out-fvq-262k'
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
codebook_size = 262144
code_dim = 256
projector = 'vqbridge'
bridge_group_size = 64
bridge_dim = 256
bridge_depth = 2
bridge_heads = 4
bridge_mlp_ratio = 2.0
beta = 0.25
l2_norm = False
chunk_size = 1024
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
