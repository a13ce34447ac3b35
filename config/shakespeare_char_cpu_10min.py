# the lowest val loss on shakespeare_char we found for 10 minutes of a 2-core CPU: the baby GPT
# (6 layers, 6 heads, 384 wide, block 256) with the speedrun options and Muon, bfloat16

out_dir = 'out-shakespeare-char-10min'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.1  # ~6 passes over the data: enough to start overfitting without it
bias = False
rope = True
norm = 'rmsnorm'
qk_norm = True
activation = 'relu2'
tie_embeddings = False
logit_softcap = 15.0
zero_init = True

optimizer = 'muon'
muon_lr = 0.03
learning_rate = 4e-3
weight_decay = 0.0
beta2 = 0.95
lr_schedule = 'wsd'
cooldown_frac = 0.5
max_iters = 1500  # about 9.5 minutes of training at the speed measured here; set from bench.py's tok/s
lr_decay_iters = 1500
warmup_iters = 20
min_lr = 0.0

device = 'cpu'
compile = False
