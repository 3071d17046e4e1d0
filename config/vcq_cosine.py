# VCQ paper Table 2, Cosine row: K_min 2, K_max 16,384, cosine schedule over 256 positions (mean K 5964; the paper's
# default). The paper's tokenizer is a 1D ViT (TiTok-style, 256 tokens); here the same schedule runs over the raster
# order of a 16x16 VQGAN grid with a plain LlamaGen VQ (8-dim l2-normalised codes) as the shared codebook. Losses as
# the paper (L1 + LPIPS + PatchGAN), 1.3M steps at batch 256 (260 epochs). Values the text extraction lost
# (code dim, lr, betas, GAN weights) use LlamaGen VQ-16's.
out_dir = 'out-vcq-cosine'
data_dir = 'data/imagenet/train'
image_size = 256
# optimisation
batch_size = 256  # global
gradient_accumulation_steps = 1
max_iters = 260 * 1281167 // 256  # 260 ImageNet epochs = 1.3M steps
learning_rate = 1e-4
base_batch_size = 128
beta1 = 0.9
beta2 = 0.95
lr_schedule = 'constant'
warmup_frac = 0.0
constant_frac = 0.0
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
quantizer_args = {'l2_norm': True, 'beta': 0.25, 'vcq_schedule': 'cosine', 'vcq_k_min': 2, 'vcq_seq_len': 256,
                  'chunk_size': 4096}
# losses
rec_loss = 'l1'
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
