# VCQ paper Table 4 row "VCQ-Cosine" (= VCQ B-B; Appendix A, B): GPT-B (12 layers, 12 heads, width 768) on the
# VCQ tokenizer (config/vcq_cosine.py: K_t from 2 to 16,384, cosine) -> gFID 4.79 with CodebookSize-Aware CFG,
# 14.80 without.
# Appendix A: 1.0M steps at global batch 512 (400 epochs), AdamW, 10k-step warmup, peak lr until step 50k, then
# linear decay; ten-crop + flip, class-label / AR / token-embedding dropout 0.1; weight decay off for biases, norms
# and adaptive norms; grad clip 1.0. Values lost in the text extraction (peak and final lr, betas, weight decay) use
# FVQ Table 6's generation recipe (1e-4 per 256 -> 2e-4 at 512, (0.9, 0.95), 0.05, decay to 0.01x): a reading.
# The paper's tokenizer is a 1D ViT (256 tokens); here it is the 16x16 raster of config/vcq_cosine.py.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_vcq_b.py
# Sample (Appendix B, Table 7): --cfg_schedule=codebook_size_aware --cfg_scale=10 --cfg_power=1.5 --temperature=1.0
#   (gFID 4.79); without CFG: --cfg_scale=1.0 --temperature=0.85 (gFID w/o CFG 14.80):
#   torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out-ar-vcq-b/ckpt.pt --cfg_schedule=codebook_size_aware \
#       --cfg_scale=10 --cfg_power=1.5
out_dir = 'out-ar-vcq-b'
tokenizer_ckpt = 'out-vcq-cosine/ckpt.pt'
codes_dir = 'out-vcq-cosine/ar_codes'
data_dir = 'data/imagenet/train'
image_size = 256
ten_crop = True
num_workers = 8
ar_model = 'B'
ar_adaln = False  # VCQ uses a vanilla AR transformer
dropout = 0.1
token_dropout = 0.1
class_dropout = 0.1
batch_size = 512  # global
max_iters = 1_000_000  # 400 epochs at batch 512
learning_rate = 1e-4
base_batch_size = 256
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.05
lr_schedule = 'annealing'
warmup_frac = 0.01  # 10k steps
constant_frac = 0.04  # peak until step 50k
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
ckpt_interval = 10000
log_interval = 100
