# Targets FVQ paper Table 3 row 8: VQBridge, 65,536 codes x 256 channels, 40 epochs, learning annealing,
# ImageNet 256x256, 16x downsampling -> rFID 1.14, usage 100%. Recipe: FVQ Table 6 and the release's
# scripts/recon/FVQ-65536.sh (batch 128, lr 1e-4, Adam (0.9, 0.95), QBridge-L/8: groups of 64 codes, bf16,
# grad clip 1.0).
exec(open('config/fvq_16k.py').read())  # FVQ-16384's recipe; what differs follows
out_dir = 'out-fvq-65k'
codebook_size = 65536
bridge_group_size = 64  # QBridge-L/8
