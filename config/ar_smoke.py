# Smoke run of the AR stage (no paper row): a tiny GPT (3 layers, width 96) on the codes of the smoke tokenizer
# (config/smoke.py's out-smoke/ckpt.pt: 32px built-in procedural images -> 8x8 FVQ codes, K = 256), CPU, about a
# minute. 500 images x {image, flip} are encoded once into out-ar-smoke/codes/; the loss falls from log(256) = 5.55.
# Then: python sample.py --ckpt=out-ar-smoke/ckpt.pt --num_samples=100 --batch_size=50 --cfg_scale=2.0 --device=cpu
out_dir = 'out-ar-smoke'
tokenizer_ckpt = 'out-smoke/ckpt.pt'
device = 'cpu'
data_dir = ''  # the built-in procedural dataset, no download
num_images = 500
ten_crop = False
flip_augment = True
num_workers = 0
ar_model = 'B'  # the preset's structure, shrunk:
n_layer = 3
n_head = 4
n_embd = 96
batch_size = 16
max_iters = 300
learning_rate = 1e-3
base_batch_size = 16
lr_schedule = 'annealing'  # FVQ Table 6 generation column: no warmup, constant 5%, linear decay to 0.01x
warmup_frac = 0.0
constant_frac = 0.05
log_interval = 25
ckpt_interval = 100
