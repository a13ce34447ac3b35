# the CPU recipe's model on tiny shakespeare in a BPE of its own, the base model that config/sft_instructions.py
# fine-tunes into an assistant:
#   python prepare.py shakespeare_bpe --vocab_size=2048      # a BPE trained on tiny shakespeare's train split
#   python train.py config/train_shakespeare_bpe_cpu.py
# (4 layers, 4 heads, 256 wide, block 256 BPE tokens, about 870 characters)

out_dir = 'out-shakespeare-bpe-cpu'
eval_interval = 100
eval_iters = 20
log_interval = 20
always_save_checkpoint = False

dataset = 'shakespeare_bpe'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256  # what the chat fine-tuning may use: a model's context can shrink, not grow

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.1  # 600 steps of 4,096 tokens go ~8 times over tiny shakespeare's ~300k training tokens

learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 50

device = 'cpu'
compile = False
