# Targets VCQ paper Table 5 "VCQ B-L" (gFID 2.75 with CFG, 7.47 without): AR-L (24 layers, 16 heads, width
# 1024, 343M; LlamaGen's L) on the codes of the VCQ Base tokenizer, recipe as config/ar_vcq_titok_b.py.
# VCQ's AR-XL (B-XL, 684M) is 32 layers x 1280 (20 heads), not LlamaGen's 36: --ar_model=XL --n_layer=32.
# Run: torchrun --standalone --nproc_per_node=8 train_ar.py config/ar_vcq_titok_l.py
exec(open('config/ar_vcq_titok_b.py').read())
out_dir = 'out-ar-vcq-titok-l'
ar_model = 'L'
