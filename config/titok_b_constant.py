# Targets the baseline row of VCQ paper Table 4 ("Uniform", gFID w/o CFG 27.98 with AR-B): the Base 1D
# tokenizer of config/vcq_titok_b.py with a constant codebook, K = 16,384 at every one of the 256 positions;
# everything else (model, recipe, assumptions) as there.
# Run: torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/titok_b_constant.py
exec(open('config/vcq_titok_b.py').read())
out_dir = 'out-titok-b-constant'
vcq_schedule = ''  # one codebook size for all positions
