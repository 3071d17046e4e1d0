# Targets FVQ paper Table 3 row 6 (= Table 1 "FVQ"): VQBridge, 16,384 codes x 256 channels, 40 epochs,
# learning annealing, ImageNet 256x256, 16x downsampling -> rFID 1.30, usage 100%. Recipe: FVQ Table 6 and the
# release's scripts/recon/FVQ-16384.sh (batch 128, lr 1e-4, Adam (0.9, 0.95), QBridge-L/4, bf16, grad clip
# 1.0).
# train_tokenizer.py's defaults give the rest: the LlamaGen VQ-16 encoder/decoder, 40 epochs at batch 128, lr
# 1e-4, Adam (0.9, 0.95), grad clip 1.0, bf16, and Table 6's losses (commitment beta 0.25, LPIPS 1.0, GAN 0.5)
# with LlamaGen's L2 and PatchGAN hinge from iteration 20k.
out_dir = 'out-fvq-16k'
data_dir = 'data/imagenet/train'
eval_interval = 5000
log_interval = 100
seed = 0
# quantizer: VQBridge (the default projector) with the release's settings
quantizer = 'fvq'
code_dim = 256
l2_norm = False
bridge_group_size = 16  # QBridge-L/4: 16 codes per bridge token
# learning annealing (Table 6)
lr_schedule = 'annealing'
warmup_frac = 0.1  # warmup(0.1) from 0.005x to 1x
constant_frac = 0.3  # "baselr(0.3)": 30% of the post-warmup steps at the peak lr (FVQ Table 6; release: lrT)
