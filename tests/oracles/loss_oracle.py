"""Oracle for tests/loss.rs.

usage: loss_oracle.py DIR

Reads DIR/cases.json ([{"name": n, "problem_type": p, "num_labels": k, "weighted": bool}, ...])
and DIR/input.safetensors (n.logits, n.targets and, when weighted, n.weights), and writes
DIR/expected.safetensors with n.loss and n.grad (d loss / d logits) for each case.

Unweighted cases go through the loss of a tiny random LlamaForSequenceClassification with that
num_labels and problem_type, called as its forward calls it (model.loss_function(logits=...,
labels=..., pooled_logits=..., config=...)); the script first checks, on a forward pass of that
model with labels=, that this call gives the forward's own loss. Weighted cases use what a
Trainer subclass would: torch.nn.CrossEntropyLoss(weight=) on the same view for single-label,
BCEWithLogitsLoss(pos_weight=) for multi-label.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForSequenceClassification
from transformers.loss.loss_utils import ForSequenceClassificationLoss

PAD = 0


def tiny_model(num_labels, problem_type):
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        pad_token_id=PAD, num_labels=num_labels, problem_type=problem_type,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


def check_forward_uses_loss_function(model, targets):
    """The forward's loss equals model.loss_function called on its pooled logits."""
    fn = model.loss_function
    assert fn is ForSequenceClassificationLoss, fn
    ids = torch.randint(1, 32, (targets.shape[0], 5))
    with torch.no_grad():
        out = model(input_ids=ids, labels=targets)
        again = fn(logits=out.logits, labels=targets, pooled_logits=out.logits, config=model.config)
    assert torch.equal(out.loss, again), (out.loss, again)


def main():
    d = sys.argv[1]
    with open(f"{d}/cases.json") as f:
        cases = json.load(f)
    inp = load_file(f"{d}/input.safetensors")
    out = {}
    for case in cases:
        n, k, problem = case["name"], case["num_labels"], case["problem_type"]
        logits = inp[f"{n}.logits"].clone().requires_grad_(True)
        targets = inp[f"{n}.targets"]
        if case["weighted"]:
            w = inp[f"{n}.weights"]
            if problem == "single_label_classification":
                loss = torch.nn.CrossEntropyLoss(weight=w)(logits.view(-1, k), targets.view(-1))
            elif problem == "multi_label_classification":
                loss = torch.nn.BCEWithLogitsLoss(pos_weight=w)(logits, targets)
            else:
                raise SystemExit(f"no weighted {problem}")
        else:
            model = tiny_model(k, problem)
            check_forward_uses_loss_function(model, targets)
            loss = model.loss_function(logits=logits, labels=targets, pooled_logits=logits, config=model.config)
            assert model.config.problem_type == problem
        loss.backward()
        out[f"{n}.loss"] = loss.detach().reshape(())
        out[f"{n}.grad"] = logits.grad
    save_file(out, f"{d}/expected.safetensors")


if __name__ == "__main__":
    main()
