# Targets FVQ paper Table 5 row "linear+Annealing", 16k: the SimVQ-style single linear D -> D projector
# instead of VQBridge, with learning annealing, 16,384 codes x 256 channels -> rFID 1.52, usage 53%.
# Everything else as config/fvq_16k.py (FVQ Table 6 recipe, 40 epochs).
exec(open('config/fvq_16k.py').read())  # FVQ-16384's recipe; what differs follows
out_dir = 'out-fvq-16k-linear'
projector = 'linear'
bridge_group_size = 0  # the default: there is no bridge
