# Targets VCQ paper Table 5 / Appendix A, the Base tokenizer of VCQ B-B (rFID 2.77, PSNR 20.02): the 1D
# tokenizer the paper uses (TiTok-style; VCQ §4.1), ViT-B encoder + ViT-B decoder (172M parameters), L = 256
# latent tokens, cosine VCQ schedule from K_min = 2 to K_max = 16,384 (Table 2's cosine row: mean K 5964),
# single-stage pixel decoder, L1 + LPIPS + PatchGAN.
# The training recipe is config/vcq_cosine.py's (Appendix A: AdamW, global batch 256, 1.3M steps, 13k-step
# warmup, peak phase, linear decay; generator adversarial weight 0.1; DiffAugment; bf16); its assumptions hold
# here too. Lost in the paper's text and assumed here: K_max of the Base tokenizer (16,384, Table 2's), the
# code dimension (12, l2-normalised: TiTok-VQ's token size), patch size 16 (TiTok's at 256 px).
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/vcq_titok_b.py
exec(open('config/vcq_cosine.py').read())  # the VCQ tokenizer recipe; what differs follows
out_dir = 'out-vcq-titok-b'
tokenizer_type = 'titok'
titok_preset = 'base'  # ViT-B encoder + ViT-B decoder
patch_size = 16
num_latent_tokens = 256
code_dim = 12  # assumed (TiTok-VQ)
l2_norm = True
