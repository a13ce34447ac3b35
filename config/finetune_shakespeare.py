# fine-tune GPT-2 (124M) on tiny shakespeare in GPT-2's BPE tokens, as nanoGPT's finetune_shakespeare.py
# (which starts from gpt2-xl: set init_from below; its weights, gradients and AdamW state take ~25 GB):
#   python prepare.py shakespeare && python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# The weights download once from the Hugging Face Hub into $HF_HOME (default ~/.cache/huggingface).

out_dir = 'out-shakespeare'
init_from = 'gpt2'  # or gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name on the Hub
dataset = 'shakespeare'
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # only save when val improves: fine-tuning overfits within a few hundred steps

# 32 sequences of 1024 tokens per step; 20 steps see ~2 epochs of the 300k-token training split
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a small constant learning rate: adjust what the pretrained model knows, don't overwrite it
learning_rate = 3e-5
decay_lr = False
