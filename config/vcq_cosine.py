# Targets VCQ paper Table 2, Cosine row: K_min 2, K_max 16,384, cosine schedule over 256 positions (mean K 5964; the
# paper's default), the tokenizer behind "VCQ-Cosine" / VCQ B-B. The paper's tokenizer is a 1D ViT (TiTok-style, 256
# tokens); here the same schedule runs over the raster order of a 16x16 VQGAN grid with a plain LlamaGen VQ (8-dim
# l2-normalised codes) as the shared codebook.
# Recipe as VCQ Appendix A gives it: AdamW; global batch 256 for 1.3M steps (260 epochs); a 13k-step warmup, a peak
# phase, then linear decay; L1 + LPIPS + discriminator + commitment at weight 1.0 and the generator's adversarial
# loss at 0.1; random crop + flip; adversarial augmentation always on (DiffAugment here: our reading); bf16.
# Assumptions (the text lost or does not give them): peak lr 1e-4 and final lr 0.01x (FVQ Table 6's), the peak phase
# lasting until step 65k, AdamW betas (0.9, 0.95) and weight decay 1e-4, beta 0.25, hinge GAN losses from step 20k,
# the 8-dim LlamaGen codebook.
out_dir = 'out-vcq-cosine'
data_dir = 'data/imagenet/train'
image_size = 256
# optimisation
optimizer = 'adamw'
batch_size = 256  # global
gradient_accumulation_steps = 1
max_iters = 260 * 1281167 // 256  # 260 ImageNet epochs = 1.3M steps
learning_rate = 1e-4  # assumed peak
base_batch_size = 256
beta1 = 0.9  # assumed
beta2 = 0.95  # assumed
weight_decay = 1e-4  # assumed
lr_schedule = 'annealing'  # warmup from 0.005x, constant, linear decay to 0.01x
warmup_frac = 13000 / max_iters  # the 13k-step warmup
constant_frac = (65000 - 13000) / max_iters  # peak until step 65k (assumed reading of "a 65k-step peak")
grad_clip = 1.0
# model: LlamaGen VQ-16, 16x16 tokens = the schedule's 256 positions
ch = 128
ch_mult = (1, 1, 2, 2, 4)
num_res_blocks = 2
z_channels = 256
dropout = 0.0
quantizer = 'vq'
codebook_size = 16384  # K_max
code_dim = 8
l2_norm = True
beta = 0.25
vcq_schedule = 'cosine'
vcq_k_min = 2
vcq_seq_len = 256
chunk_size = 4096
# losses
rec_loss = 'l1'
perceptual_weight = 1.0
disc_weight = 0.1  # the generator's adversarial loss
disc_loss_weight = 1.0
disc_start = 20000
disc_loss = 'hinge'
gen_loss = 'hinge'
adaptive_disc_weight = False
lecam_weight = 0.0
disc_augment = True
disc_layers = 3
disc_ch = 64
# system
eval_interval = 5000
log_interval = 100
compile = False
dtype = 'bfloat16'
seed = 0
