# Targets VCQ paper Table 4 row "VCQ-Cosine" / Table 5 "VCQ B-B" (gFID 4.79 with CodebookSize-Aware CFG,
# 14.80 without): AR-B (12 layers, 12 heads, width 768, 115M) on the 256 1D codes of the VCQ Base tokenizer
# (config/vcq_titok_b.py), 1D RoPE over the 256 positions. The recipe and its assumptions are
# config/ar_vcq_b.py's (Appendix A: 1.0M steps at global batch 512, 10k-step warmup, peak until step 50k,
# linear decay, ten-crop + flip, dropouts 0.1, grad clip 1.0).
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_vcq_titok_b.py
# Sample (Appendix B, Table 7): torchrun --standalone --nproc_per_node=8 sample.py \
#     --ckpt=out-ar-vcq-titok-b/ckpt.pt --cfg_schedule=codebook_size_aware --cfg_scale=10 --cfg_power=1.5
exec(open('config/ar_vcq_b.py').read())
out_dir = 'out-ar-vcq-titok-b'
tokenizer_ckpt = 'out-vcq-titok-b/ckpt.pt'
codes_dir = 'out-vcq-titok-b/ar_codes'
