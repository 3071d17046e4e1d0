# Targets the LlamaGen paper's GPT-B row: GPT-B (111M: 12 layers, 12 heads, width 768) class-conditional on
# ImageNet 256x256 with the LlamaGen VQ-16 tokenizer (config/vq_16k.py) -> FID 5.46 with CFG 2.0. Trained with
# the recipe of FVQ Table 6 (generation column), which train_ar.py's defaults are: 300 epochs, batch 256,
# AdamW (0.9, 0.95), lr 1e-4 per 256, weight decay 0.05, no warmup, constant for 5% then linear decay to
# 0.01x; ten-crop + flip codes, class/token/residual dropout 0.1.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_gpt_b.py
# Sample: torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out-ar-gpt-b/ckpt.pt --cfg_scale=2.0
out_dir = 'out-ar-gpt-b'
tokenizer_ckpt = 'out-vq_16k/ckpt.pt'
codes_dir = 'out-vq_16k/ar_codes'  # shared by every GPT size trained on this tokenizer
data_dir = 'data/imagenet/train'
image_size = 256
num_workers = 8
compile = True
ckpt_interval = 10000
log_interval = 100
