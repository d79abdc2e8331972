"""From nothing to a model that answers, on a CPU (about 3 CPU-minutes; longer where the cores are shared):

1. pretrain a small GPT on TinyStories (configs/tinystories-cpu.yaml, shortened);
2. teach it the question-and-answer format with LoRA on GSM8K's grade-school math problems (Alpaca form);
3. ask it something, through the chat template it was fine-tuned with.

    python examples/finetune_chat.py [OUT_FOLDER]

The same steps as commands:

    tinylm train configs/tinystories-cpu.yaml --out out/example/base --train.max-steps 300
    tinylm finetune --base out/example/base --data gsm8k --max-examples 2000 --max-length 128 --lora-r 16 \
        --train.max-steps 200 --train.learning-rate 3e-3 --out out/example/lora --merge

A 3.4M-parameter story model does not learn arithmetic in three minutes: what it learns is the shape of an answer (the
held-out loss on GSM8K's answers falls by about a third). Point --base at a real model (smollm2-135m-instruct,
distilgpt2, ...) for answers worth reading.
"""

import sys
from pathlib import Path

import tinylm
from tinylm.config import FinetuneConfig, finetune_train_defaults
from tinylm import finetune

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/example")
config = tinylm.load_config(
    "configs/tinystories-cpu.yaml", {"train.max_steps": 300, "train.eval_interval": 100, "out": str(out / "base")}
)
base = tinylm.train(config, overwrite=True)
print(f"pretrained: best val loss {base.best_val_loss:.3f}; it writes: {base.sample[:200]!r}\n")

train = finetune_train_defaults()
train.max_steps, train.learning_rate, train.eval_interval = 200, 3e-3, 100
tuned = finetune(
    FinetuneConfig(
        base=str(base.run_dir),
        data="gsm8k",
        out=str(out / "lora"),
        lora_r=16,
        lora_alpha=32,
        max_examples=2000,
        max_length=128,
        merge=True,
        train=train,
    ),
    overwrite=True,
)
print(f"held-out loss {tuned.held_out_loss_before:.3f} -> {tuned.held_out_loss_after:.3f}\n")

run = tinylm.load(out / "lora")  # base + adapter (merged too: out/lora/model is a tinylm run); `tinylm chat` works too
question = "Tom has 3 apples and buys 5 more. How many apples does he have?"
print(f"User: {question}\nAssistant: ", end="", flush=True)
for piece in run.stream_reply([{"role": "user", "content": question}], max_new_tokens=80, temperature=0.0):
    print(piece, end="", flush=True)
print()
