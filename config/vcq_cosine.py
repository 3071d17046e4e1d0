# Targets VCQ paper Table 2, Cosine row: K_min 2, K_max 16,384, cosine schedule over 256 positions (mean K
# 5964; the paper's default), the tokenizer behind "VCQ-Cosine" / VCQ B-B. The paper's tokenizer is a 1D ViT
# (TiTok-style, 256 tokens); here the same schedule runs over the raster order of a 16x16 VQGAN grid with a
# plain LlamaGen VQ (8-dim l2-normalised codes) as the shared codebook.
# Recipe as VCQ Appendix A gives it: AdamW; global batch 256 for 1.3M steps (260 epochs); a 13k-step warmup, a
# peak phase, then linear decay; L1 + LPIPS + discriminator + commitment at weight 1.0 and the generator's
# adversarial loss at 0.1; random crop + flip; adversarial augmentation always on (DiffAugment here: our
# reading); bf16. Not given in the paper's text; assumed: peak lr 1e-4 and final lr 0.01x (FVQ Table 6's), the
# peak phase lasting until step 65k, AdamW betas (0.9, 0.95) and weight decay 1e-4, beta 0.25, hinge GAN
# losses from step 20k, the 8-dim LlamaGen codebook. Those not set below are train_tokenizer.py's defaults.
out_dir = 'out-vcq-cosine'
data_dir = 'data/imagenet/train'
eval_interval = 5000
log_interval = 100
seed = 0
# optimisation
batch_size = 256  # global
max_iters = 260 * 1281167 // 256  # 260 ImageNet epochs = 1.3M steps
base_batch_size = 256
weight_decay = 1e-4  # assumed; on weight matrices and kernels only (train_tokenizer.make_optimizer)
lr_schedule = 'annealing'  # warmup from 0.005x, constant, linear decay to 0.01x
warmup_frac = 13000 / max_iters  # the 13k-step warmup
# peak lr until step 65k (assumed reading of "a 65k-step peak"): 52k of the post-warmup steps
constant_frac = (65000 - 13000) / (max_iters - 13000)
# quantizer: the default LlamaGen VQ-16 (K_max = 16,384 8-dim l2-normalised codes); 16x16 tokens = the
# schedule's 256 positions
vcq_schedule = 'cosine'
# losses
rec_loss = 'l1'
disc_weight = 0.1  # the generator's adversarial loss
disc_loss_weight = 1.0
disc_augment = True
