# Targets the collapsing baseline: FVQ Table 3 row 2 (VQGAN, 40 epochs, ratio 16, K = 16k, 256-dim codes: rFID
# 9.21, usage 0.29%). Identical to config/vq_16k.py except for the code dimension; the codebook collapses as
# in LlamaGen's ablation.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/vq_16k_d256.py
exec(open('config/vq_16k.py').read())  # LlamaGen VQ-16; what differs follows
out_dir = 'out-vq_16k_d256'
code_dim = 256
