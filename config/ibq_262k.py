# Targets IBQ paper Table 1 row "IBQ (Ours)" 262,144 codes x 256 channels: ImageNet 256x256, 16x16 tokens, 330
# epochs -> rFID 1.00, usage 84%. Recipe: IBQ section 4.2 and TencentARC/SEED-Voken
# configs/IBQ/gpu/imagenet_ibqgan_262144.yaml (8 nodes x 8 GPUs x 4 = batch 256, lr 1e-4, Adam (0.5, 0.9), 4
# ResBlocks, LeCAM 0.05, entropy 0.05 at T 0.01).
exec(open('config/ibq_16k.py').read())  # IBQ-16384's recipe; what differs follows
out_dir = 'out-ibq-262k'
codebook_size = 262144
