# Targets FVQ Table 4 row 3: FVQ (RQ-VAE), 10 epochs, 8x8x4 codes (32x downsampling, depth 4), one shared
# K = 16,384 x 256-d codebook mapped by VQBridge, learning annealing: rFID 2.98 (RQ-VAE: 4.73 at 10 epochs,
# 3.20 at 50; config/rqvae_16k.py is the same run without the bridge and annealing).
# Recipe: the release's tokenizer/tokenizer_image/vq_train_qbridge_lr_rqvae.py defaults (no launch script for
# Table 4 is released): batch 128, lr 1e-4, Adam (0.9, 0.95), grad clip 1.0, 10 epochs, warmup_ep 1 (0.1),
# lrT 0.3, QB_type QBridge-S/4 (16 codes per bridge token, hidden 4 heads x 16 = 64), RQ-VAE's losses on every
# partial sum. Assumed: 32x = the release's VQ-32 (ch_mult (1, 1, 2, 2, 4, 4)). The bridge runs over the
# codebook laid out as a 2D grid, as the release's and config/fvq_16k.py's.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_rqvae_16k.py
exec(open('config/rqvae_16k.py').read())  # the same tokenizer, data and steps; the quantizer's codebook and the lr
out_dir = 'out-fvq-rqvae-16k'
projector = 'vqbridge'
bridge_group_size = 16  # QBridge-S/4
bridge_dim = 64
lr_schedule = 'annealing'
warmup_frac = 0.1  # warmup_ep 1 of 10
constant_frac = 0.3  # lrT
