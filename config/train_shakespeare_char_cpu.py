# a character-level GPT that writes passable Shakespeare after 2 to 4 minutes on a 2-core laptop CPU
# (4 layers, 4 heads, 256 wide, block 128: 3.2M parameters, large enough for bfloat16 matmuls to pay off
# where dtype auto picks them: 2 minutes on a Xeon with AMX, 4 in float32 on one without)

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 100
eval_iters = 20
log_interval = 20
always_save_checkpoint = False

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.0  # too few steps to overfit

learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 50

device = 'cpu'
compile = False  # on a CPU, compiling costs more time than it saves in a run this short
