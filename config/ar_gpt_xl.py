# FVQ paper Table 2 row "FVQ-XL (LlamaGen-XL)": LlamaGen GPT-XL (775M: 36 layers, 20 heads, width 1280) on the FVQ
# tokenizer (config/fvq_16k.py: VQBridge, 16,384 codes), ImageNet 256x256 -> FID 2.07, IS 287.0 (with CFG).
# Recipe: FVQ Table 6, generation column: 300 epochs, batch 256, AdamW (0.9, 0.95), lr 1e-4 per 256, weight decay
# 0.05, no warmup, constant for 5% then linear decay to 0.01x; LlamaGen's ten-crop + flip codes, dropout 0.1.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_gpt_xl.py
# Sample (the CFG scale is not given by FVQ; sweep it): torchrun --standalone --nproc_per_node=8 sample.py \
#     --ckpt=out-ar-gpt-xl/ckpt.pt --cfg_scale=1.75
out_dir = 'out-ar-gpt-xl'
tokenizer_ckpt = 'out-fvq-16k/ckpt.pt'
codes_dir = 'out-fvq-16k/ar_codes'  # shared with config/ar_gpt_l.py
data_dir = 'data/imagenet/train'
image_size = 256
ten_crop = True
num_workers = 8
ar_model = 'XL'
dropout = 0.1
token_dropout = 0.1
class_dropout = 0.1
batch_size = 256  # global
max_iters = 300 * 1281167 // 256  # 300 epochs
learning_rate = 1e-4
base_batch_size = 256
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.05
lr_schedule = 'annealing'
warmup_frac = 0.0
constant_frac = 0.05
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
ckpt_interval = 10000
log_interval = 100
