# chat fine-tuning on the 1,100 instructions of chapter 7 of Raschka's "Build a Large Language Model (From Scratch)"
# (instruction-data.json: https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/
# instruction-data.json), here from the small model of config/train_shakespeare_bpe_cpu.py, on a CPU:
#   python prepare.py instructions --input=instruction-data.json --tokenizer=data/shakespeare_bpe
#   python train.py config/sft_instructions.py
#   python eval.py --out_dir=out-sft-instructions --show=3     # the loss on the answers, and the stop rate
#   python sample.py --out_dir=out-sft-instructions --chat
# The book's recipe starts from GPT-2 medium (355M), on a GPU:
#   python prepare.py instructions_gpt2 --input=instruction-data.json --tokenizer=gpt2
#   python train.py config/sft_instructions.py --init_from=gpt2-medium --dataset=instructions_gpt2 \
#       --out_dir=out-sft-gpt2-medium --learning_rate=5e-5 --decay_lr=False --dropout=0.0 --block_size=1024 \
#       --batch_size=1 --max_iters=60 --eval_interval=10 --device=auto

init_from = 'out-shakespeare-bpe-cpu'
out_dir = 'out-sft-instructions'
dataset = 'instructions'
eval_interval = 100
eval_iters = 10
log_interval = 10
always_save_checkpoint = False  # keep the best val loss: a model this small overfits 990 conversations

# a micro-batch holds about batch_size * block_size tokens of whole conversations: ~20 of them here,
# so ~50 steps go over the 990 training conversations once, and 600 steps ~12 times
batch_size = 4
block_size = 256
gradient_accumulation_steps = 1
max_iters = 600

learning_rate = 1e-3
warmup_iters = 10
lr_decay_iters = 600
min_lr = 5e-5
dropout = 0.1

device = 'cpu'
compile = False
