# the lowest val loss on shakespeare_char we found for 10 minutes of a 2-core CPU: the speedrun's options
# and Muon on a deeper model (6 layers, 4 heads, 256 wide, block 128; 4.8M parameters), bfloat16 on a Xeon
# with AMX (dtype auto; on a CPU where bf16 is not faster it trains in float32, and 10 minutes get fewer steps)

out_dir = 'out-shakespeare-char-10min'
eval_interval = 350
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 6
n_head = 4
n_embd = 256
dropout = 0.0  # ~5 passes over the data, not yet overfitting; dropout would cost a third of the speed
bias = False
rope = True
norm = 'layernorm'  # RMSNorm trains as well, but PyTorch's CPU kernel for it is 2-3x slower
qk_norm = True
activation = 'relu2'
tie_embeddings = False
logit_softcap = 15.0
zero_init = True

optimizer = 'muon'
muon_lr = 0.02  # the blocks' matrices
learning_rate = 6e-3  # AdamW: embeddings, head, norms
weight_decay = 0.0
beta2 = 0.95
lr_schedule = 'wsd'
cooldown_frac = 0.5
max_iters = 1400  # ~8.5 minutes of training at the 11.4k tokens/s measured here (ablate.py's speed check)
lr_decay_iters = 1400
warmup_iters = 20
min_lr = 0.0

device = 'cpu'
compile = False
