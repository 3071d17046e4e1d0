# Baseline for FVQ Table 4 row 1: RQ-VAE (Lee et al. 2022), 10 epochs, 8x8x4 codes (32x downsampling, depth 4),
# one shared K = 16,384 x 256-d codebook: rFID 4.73 (row 2, 50 epochs: 3.20). Those numbers are RQ-VAE's own
# runs (its EMA codebook updates and recipe). This config is the controlled baseline of config/fvq_rqvae_16k.py:
# the same tokenizer and recipe with RQ-VAE's quantizer (no projector), constant lr.
# Assumed (not stated by FVQ): the codebook is trained by its loss (the release's rqvae quantizer without its
# bridge), not by EMA; 32x = the release's VQ-32, LlamaGen's encoder/decoder with ch_mult (1, 1, 2, 2, 4, 4);
# LlamaGen's losses as the release's script (L2, LPIPS 1.0, hinge GAN 0.5 from iter 20k), batch 128, lr 1e-4.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/rqvae_16k.py
# Then: python evaluate.py --mode=recon --ckpt=out-rqvae-16k/ckpt.pt --data_dir=data/imagenet/val
#       (rFID, PSNR, usage over all codes and per depth)
out_dir = 'out-rqvae-16k'
data_dir = 'data/imagenet/train'
eval_data_dir = 'data/imagenet/val'
eval_interval = 5000
log_interval = 100
seed = 0
ch_mult = (1, 1, 2, 2, 4, 4)  # 256 / 32 = 8x8 positions
quantizer = 'rq'
projector = ''  # RQ-VAE's own codebook
rq_depth = 4
codebook_size = 16384
code_dim = 256
l2_norm = False
max_iters = 10 * 1281167 // 128  # 10 epochs
