# Study, GPU scale (README 'Results'): IBQ (index backpropagation, SEED-Voken's loss weighting, entropy
# penalty 0.05 at T 0.01): IBQ Table 1 / Table 4 regime, usage 96%.
# Targets the effect, not the number: config/study_vq.py's data, model, steps and optimiser; only the
# quantizer changes.
# Run: python train_tokenizer.py config/study_ibq.py
exec(open('config/study_vq.py').read())  # the study's setup; only the quantizer changes
out_dir = 'out-study-ibq'
quantizer = 'ibq'  # the defaults: beta on the codebook term, entropy penalty 0.05 at T 0.01
l2_norm = False
