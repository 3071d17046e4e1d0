# Targets FVQ Table 4 row 5: FVQ (VAR), 40 epochs, 680 tokens over VAR's 10 scales at 16x downsampling,
# K = 16,384 x 256-d codebook mapped by VQBridge, learning annealing: rFID 0.80 (VAR's own: 1.00 with
# K = 4,096 x 32; config/var_4k.py is the controlled baseline).
# Recipe: the release's tokenizer/tokenizer_image/vq_train_qbridge_lr_var.py defaults (no launch script for
# Table 4 is released): batch 128, lr 1e-4, Adam (0.9, 0.95), grad clip 1.0, 40 epochs, warmup_ep 0, lrT 0.3
# with linear decay (sche_type 'lin'), QB_type QBridge-S/4 (16 codes per bridge token, hidden 64); VAR's
# quantizer (quant_resi 0.5, 4 shared phi, loss averaged over the scales). Assumed: encoder output channels =
# code dim as the release's VQVAE (its 3x3 quant_conv is this repo's 1x1). The bridge runs over the codebook
# laid out as a 2D grid, as the release's and config/fvq_16k.py's.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_var_16k.py
exec(open('config/var_4k.py').read())  # the same tokenizer, data and steps; the codebook and the lr differ
out_dir = 'out-fvq-var-16k'
projector = 'vqbridge'
codebook_size = 16384
code_dim = 256
z_channels = 256
bridge_group_size = 16  # QBridge-S/4
bridge_dim = 64
lr_schedule = 'annealing'
warmup_frac = 0.0  # warmup_ep 0
constant_frac = 0.3  # lrT
