# LoRA on GPT-2 (124M) on tiny shakespeare in BPE tokens: GPT-2's weights stay frozen, rank-8 adapters
# on every Linear of every block train instead (1.2M parameters, 0.95% of 124M: AdamW's state is 9 MiB
# instead of 945, and ckpt.pt holds the adapters, their AdamW state and the base's name: 14 MB, not 1.5 GB):
#   python prepare.py shakespeare && python train.py config/finetune_shakespeare_lora.py
#   python sample.py --out_dir=out-shakespeare-lora --start="ROMEO:"    # adapters merged into the weights
#   python eval.py --out_dir=out-shakespeare-lora                        # val loss, perplexity, bits per byte

out_dir = 'out-shakespeare-lora'
init_from = 'gpt2'
dataset = 'shakespeare'
eval_interval = 25
eval_iters = 40
log_interval = 5
always_save_checkpoint = False

lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = 'c_attn,c_proj,c_fc'

# 8 sequences of 256 tokens per step: shorter blocks make each step cheap enough for a CPU
batch_size = 4
gradient_accumulation_steps = 2
block_size = 256
max_iters = 200

# adapters start at zero and are few: they take a far larger learning rate than full fine-tuning
learning_rate = 1e-3
warmup_iters = 10
lr_decay_iters = 200
min_lr = 1e-4
weight_decay = 0.0
