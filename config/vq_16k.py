# Targets the LlamaGen VQ-16 baseline: FVQ Table 3 row 1 (VQGAN, 40 epochs, ratio 16, K = 16k, 8-dim codes:
# rFID 2.19, usage 97%). ImageNet 256x256, batch 128, Adam (0.9, 0.95), lr 1e-4 constant, L2 + LPIPS 1.0 +
# hinge GAN 0.5 from iter 20k: train_tokenizer.py's defaults, so only the data and logging are set here.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/vq_16k.py
out_dir = 'out-vq_16k'
data_dir = 'data/imagenet/train'  # ImageFolder layout: train/<wnid>/*.JPEG
eval_data_dir = 'data/imagenet/val'  # the val set in the same layout
eval_interval = 5000
log_interval = 100
