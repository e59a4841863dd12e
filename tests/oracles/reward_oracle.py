"""A reward model as TRL trains one, made with transformers + PEFT on the demo model: a
one-output `LlamaForSequenceClassification` (num_labels=1, no problem_type) with LoRA on
q_proj/v_proj and the head in modules_to_save, both drawn random so they matter.

  reward_adapter MODEL_DIR ADAPTER_DIR TEXTS.jsonl OUT.json
      saves the adapter as PEFT does, and writes {"rewards": [...]}: the model's logit for
      each row's `text` (one row per forward, so no padding is involved)
  trl_train MODEL_DIR INIT_ADAPTER DATA_DIR OUT_DIR LR STEPS BATCH CENTER
      TRL's RewardTrainer (PEFT, fp32, dropout off, AdamW without weight decay or clipping,
      the linear schedule, pairs in file order) trains STEPS steps from INIT_ADAPTER on
      DATA_DIR/train.jsonl (CENTER: its center_rewards_coefficient, or `none`), evaluates on
      DATA_DIR/validation.jsonl, and writes OUT_DIR/adapter/ (PEFT's save_pretrained) and
      OUT_DIR/eval.json (evaluate()'s metrics)
  trl_tokenize MODEL_DIR DATA_DIR OUT.json
      the `chosen_ids` and `rejected_ids` RewardTrainer prepares from DATA_DIR/train.jsonl
      (plain or conversational, rendered through the tokenizer's chat template)
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
        model_dir, num_labels=1, dtype=torch.float32)
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


def trl_train(model_dir, init_adapter, data_dir, out_dir, lr, steps, batch, center):
    import os
    import tempfile

    from datasets import Dataset
    from peft import PeftModel
    from torch.utils.data import SequentialSampler
    from trl import RewardConfig, RewardTrainer

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def rows(split):
        with open(os.path.join(data_dir, f"{split}.jsonl")) as f:
            return Dataset.from_list([json.loads(l) for l in f if l.strip()])

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = LlamaForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    train, evaluation = rows("train"), rows("validation")
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(), learning_rate=float(lr), max_steps=int(steps),
        per_device_train_batch_size=int(batch), per_device_eval_batch_size=len(evaluation),
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[],
        center_rewards_coefficient=None if center == "none" else float(center),
        max_length=None, disable_dropout=True, use_cpu=True, seed=42, bf16=False, fp16=False,
        dataloader_drop_last=False)
    trainer = InOrder(model=pm, args=args, processing_class=tok, train_dataset=train,
                      eval_dataset=evaluation)
    trainer.train()
    metrics = trainer.evaluate()
    pm.save_pretrained(os.path.join(out_dir, "adapter"))
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(metrics, f)


def trl_tokenize(model_dir, data_dir, out_path):
    import os
    import tempfile

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    with open(os.path.join(data_dir, "train.jsonl")) as f:
        train = Dataset.from_list([json.loads(l) for l in f if l.strip()])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32)
    args = RewardConfig(output_dir=tempfile.mkdtemp(), max_length=None, report_to=[],
                        use_cpu=True, bf16=False, fp16=False)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=train)
    ds = trainer.train_dataset
    with open(out_path, "w") as f:
        json.dump({"chosen_ids": list(map(list, ds["chosen_ids"])),
                   "rejected_ids": list(map(list, ds["rejected_ids"]))}, f)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "reward_adapter":
        reward_adapter(*args)
    elif cmd == "trl_train":
        trl_train(*args)
    elif cmd == "trl_tokenize":
        trl_tokenize(*args)
    else:
        sys.exit(f"unknown command {cmd}")
