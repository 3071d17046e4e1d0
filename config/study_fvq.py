# Study, GPU scale (README 'Results'): FVQ (VQBridge, the release's settings: l2 off, zero-initialised expand
# layer): FVQ Table 3 row 6, usage 100%.
# Targets the effect, not the number: config/study_vq.py's data, model, steps and optimiser; only the
# quantizer changes.
# Run: python train_tokenizer.py config/study_fvq.py
exec(open('config/study_vq.py').read())  # the study's setup; only the quantizer changes
out_dir = 'out-study-fvq'
quantizer = 'fvq'  # the default projector: VQBridge, zero-initialised expand layer
l2_norm = False
