# Targets FVQ paper Table 2 row "FVQ-L (LlamaGen-L)": LlamaGen GPT-L (343M: 24 layers, 16 heads, width 1024)
# on the FVQ tokenizer (config/fvq_16k.py: VQBridge, 16,384 codes), ImageNet 256x256 -> FID 2.39, IS 276.6
# (with CFG).
# Recipe: FVQ Table 6, generation column, as config/ar_gpt_b.py: 300 epochs, batch 256, AdamW (0.9, 0.95), lr
# 1e-4 per 256, weight decay 0.05, no warmup, constant for 5% then linear decay to 0.01x; LlamaGen's ten-crop
# + flip codes, dropout 0.1.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_gpt_l.py
# Sample (the CFG scale is not given by FVQ; sweep it): torchrun --standalone --nproc_per_node=8 sample.py \
#     --ckpt=out-ar-gpt-l/ckpt.pt --cfg_scale=1.75
exec(open('config/ar_gpt_b.py').read())  # GPT-B's data and recipe; what differs follows
out_dir = 'out-ar-gpt-l'
tokenizer_ckpt = 'out-fvq-16k/ckpt.pt'
codes_dir = 'out-fvq-16k/ar_codes'  # shared with config/ar_gpt_xl.py
ar_model = 'L'
