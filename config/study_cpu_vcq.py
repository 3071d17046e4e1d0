# Study, CPU scale (README 'Results'): the FVQ arm with a VCQ cosine codebook-size schedule over the token
# positions (K_t from 2 to K): VCQ Table 2's Cosine row, t* pushed later.
# Targets the effect, not the number: config/study_cpu_vq.py's data, model, steps and optimiser; only the
# quantizer changes.
# Run: python train_tokenizer.py config/study_cpu_vcq.py
exec(open('config/study_cpu_vq.py').read())  # the study's setup; only the quantizer changes
out_dir = 'out-study-cpu-vcq'
quantizer = 'fvq'  # the default projector: VQBridge, as config/study_cpu_fvq.py
l2_norm = False
vcq_schedule = 'cosine'  # from vcq_k_min = 2 (the default) to K
