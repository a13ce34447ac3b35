# GPT-2 (124M) on one node of 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# 12 batch * 1024 block * 5 micro-steps * 8 GPUs = 491,520 tokens per step; 600k steps is ~300B tokens.
# Data: python prepare.py fineweb10B --shards=103 (FineWeb, 10.3B GPT-2 tokens: 600k steps read it ~29 times),
# or your own: python prepare.py NAME --input=PATH, then --dataset=NAME.
dataset = 'fineweb10B'

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'
out_dir = 'out-gpt2'

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
compile = True
