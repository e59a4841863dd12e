"""A reward model as TRL trains one, made with transformers + PEFT on the demo model: a
one-output `LlamaForSequenceClassification` (num_labels=1, no problem_type) with LoRA on
q_proj/v_proj and the head in modules_to_save, both drawn random so they matter.

  reward_adapter MODEL_DIR ADAPTER_DIR TEXTS.jsonl OUT.json
      saves the adapter as PEFT does, and writes {"rewards": [...]}: the model's logit for
      each row's `text` (one row per forward, so no padding is involved)
"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForSequenceClassification


def reward_adapter(model_dir, adapter_dir, texts_path, out_path):
    torch.manual_seed(7)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, torch_dtype=torch.float32)
    model.config.pad_token_id = tok.convert_tokens_to_ids(tok.eos_token)
    cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    pm.eval()
    pm.save_pretrained(adapter_dir)
    with open(texts_path) as f:
        texts = [json.loads(l)["text"] for l in f if l.strip()]
    rewards = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            rewards.append(float(pm(**enc).logits[0, 0]))
    with open(out_path, "w") as f:
        json.dump({"rewards": rewards}, f)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "reward_adapter":
        reward_adapter(*args)
    else:
        sys.exit(f"unknown command {cmd}")
