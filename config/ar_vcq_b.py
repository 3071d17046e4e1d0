# Targets VCQ paper Table 4 row "VCQ-Cosine" (= VCQ B-B; Appendix A, B): GPT-B (12 layers, 12 heads, width
# 768) on the VCQ tokenizer (config/vcq_cosine.py: K_t from 2 to 16,384, cosine) -> gFID 4.79 with
# CodebookSize-Aware CFG, 14.80 without.
# Appendix A: 1.0M steps at global batch 512 (400 epochs), AdamW, 10k-step warmup, peak lr until step 50k,
# then linear decay; ten-crop + flip, class-label / AR / token-embedding dropout 0.1; weight decay off for
# biases, norms and adaptive norms; grad clip 1.0; a vanilla AR transformer (ar_adaln off, the default). Not
# given in the paper's text; assumed: FVQ Table 6's generation recipe for the peak and final lr, betas and
# weight decay (1e-4 per 256 -> 2e-4 at 512, (0.9, 0.95), 0.05, decay to 0.01x), which train_ar.py's defaults
# are.
# The paper's tokenizer is a 1D ViT (256 tokens); here it is the 16x16 raster of config/vcq_cosine.py.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_vcq_b.py
# Sample (Appendix B, Table 7): --cfg_schedule=codebook_size_aware --cfg_scale=10 --cfg_power=1.5
#   --temperature=1.0 (gFID 4.79); without CFG: --cfg_scale=1.0 --temperature=0.85 (gFID w/o CFG 14.80):
#   torchrun --standalone --nproc_per_node=8 sample.py --ckpt=out-ar-vcq-b/ckpt.pt \
#       --cfg_schedule=codebook_size_aware --cfg_scale=10 --cfg_power=1.5
exec(open('config/ar_gpt_b.py').read())  # GPT-B on ImageNet codes as config/ar_gpt_b.py; what differs follows
out_dir = 'out-ar-vcq-b'
tokenizer_ckpt = 'out-vcq-cosine/ckpt.pt'
codes_dir = 'out-vcq-cosine/ar_codes'
batch_size = 512  # global
max_iters = 1_000_000  # 400 epochs at batch 512
warmup_frac = 10_000 / max_iters  # the 10k-step warmup
constant_frac = (50_000 - 10_000) / (max_iters - 10_000)  # peak lr until step 50k
