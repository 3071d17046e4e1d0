# Baseline for FVQ Table 4 row 4: VAR's multi-scale tokenizer (Tian et al. 2024), 680 tokens over 10 scales
# (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) at 16x downsampling, K = 4,096 x 32-d codebook, phi convolutions
# (quant_resi 0.5, 4 shared): rFID 1.00. That number is VAR's own run (trained on OpenImages with its recipe);
# this config is the controlled baseline of config/fvq_var_16k.py: the same tokenizer and recipe with VAR's own
# codebook (no projector), constant lr, 40 epochs of ImageNet.
# Assumed: the release's var/model/vqvae.py sizes (ch 128, ch_mult (1, 1, 2, 2, 4), encoder output channels =
# code dim; its 3x3 quant_conv is this repo's 1x1), LlamaGen's losses as the release's script (L2, LPIPS 1.0,
# hinge GAN 0.5 from iter 20k), batch 128, lr 1e-4.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/var_4k.py
# Then: python evaluate.py --mode=recon --ckpt=out-var-4k/ckpt.pt --data_dir=data/imagenet/val
#       (rFID, PSNR, usage over all codes and per scale)
out_dir = 'out-var-4k'
data_dir = 'data/imagenet/train'
eval_data_dir = 'data/imagenet/val'
eval_interval = 5000
log_interval = 100
seed = 0
quantizer = 'msvq'
projector = ''  # VAR's own codebook
l2_norm = False  # VAR's using_znorm off: the nearest code by Euclidean distance
codebook_size = 4096
code_dim = 32
z_channels = 32
max_iters = 40 * 1281167 // 128  # 40 epochs
