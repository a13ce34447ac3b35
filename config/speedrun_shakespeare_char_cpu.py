# the CPU recipe's character model, sped up with the NanoGPT speedrun's options and the Muon optimizer:
# val loss <= 1.88 on shakespeare_char in a third of the time train_shakespeare_char_cpu.py takes

out_dir = 'out-speedrun-char'
eval_interval = 100  # evaluate at the start and the end only: evals cost training time
eval_iters = 20
log_interval = 25
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0
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
max_iters = 100
lr_decay_iters = 100
warmup_iters = 10
min_lr = 0.0

device = 'cpu'
compile = False
