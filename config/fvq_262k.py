# Targets FVQ paper Table 3 row 11: VQBridge, 262,144 codes x 256 channels, 40 epochs, learning annealing,
# ImageNet 256x256, 16x downsampling -> rFID 0.95, usage 100%. Recipe: FVQ Table 6 and the release's
# scripts/recon/FVQ-262144.sh (batch 128, lr 1e-4, Adam (0.9, 0.95), QBridge-L/8: groups of 64 codes, bf16,
# grad clip 1.0).
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/fvq_262k.py
exec(open('config/fvq_16k.py').read())  # FVQ-16384's recipe; what differs follows
out_dir = 'out-fvq-262k'
codebook_size = 262144
bridge_group_size = 64  # QBridge-L/8
