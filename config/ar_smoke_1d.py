# Smoke run of the AR stage on a 1D tokenizer (no paper row): config/ar_smoke.py's tiny GPT on the 32 VCQ
# codes of the 1D smoke tokenizer (config/smoke_1d.py's out-smoke-1d/ckpt.pt), 1D RoPE, CPU.
# Then: python sample.py --ckpt=out-ar-smoke-1d/ckpt.pt --num_samples=100 --batch_size=50 --device=cpu \
#     --cfg_schedule=codebook_size_aware --cfg_scale=2.0
exec(open('config/ar_smoke.py').read())
out_dir = 'out-ar-smoke-1d'
tokenizer_ckpt = 'out-smoke-1d/ckpt.pt'
