# Smoke run of the AR stage (no paper row): a tiny GPT (3 layers, width 96) on the codes of the smoke
# tokenizer (config/smoke.py's out-smoke/ckpt.pt: 32px built-in procedural images -> 8x8 FVQ codes, K = 256),
# CPU, about 25 seconds. 500 images x {image, flip} are encoded once into out-ar-smoke/codes/; the loss falls
# from log(256) = 5.55. The lr schedule is train_ar.py's default, FVQ Table 6's generation column: no warmup,
# constant 5%, linear decay to 0.01x.
# Then: python sample.py --ckpt=out-ar-smoke/ckpt.pt --num_samples=100 --batch_size=50 --cfg_scale=2.0 \
#     --device=cpu
out_dir = 'out-ar-smoke'
tokenizer_ckpt = 'out-smoke/ckpt.pt'
device = 'cpu'
num_images = 500  # of the built-in procedural dataset (data_dir '', no download)
ten_crop = False  # the image and its flip
num_workers = 0
# GPT-B's structure (ar_model 'B'), shrunk:
n_layer = 3
n_head = 4
n_embd = 96
batch_size = 16
max_iters = 300
learning_rate = 1e-3
base_batch_size = 16
log_interval = 25
ckpt_interval = 100
