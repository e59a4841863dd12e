"""Oracle for tests/model.rs: tiny random Llama checkpoints and what transformers, PEFT and
bitsandbytes compute on them.

usage: model_oracle.py fixtures OUT_DIR
       model_oracle.py family FAMILY OUT_DIR
       model_oracle.py family_ckpt FAMILY OUT_DIR VOCAB

`family_ckpt` writes only the tiny random checkpoint of `family` (as `family` does, with a
vocabulary of VOCAB tokens so that a real tokenizer fits it) into OUT_DIR.

`family` (mistral, qwen2, qwen3, phi3, gemma2, gemma3_text) writes under OUT_DIR a tiny random
checkpoint of that family (`ckpt/`, written by `<Family>ForCausalLM`; every sequence of the
inputs is longer than its small `sliding_window`), `bnb/` (it in bitsandbytes 4-bit), and
inputs/score/expected/peft_adapter/peft_grads/facts as below (expected with
logits_bf16_{pad,full} too, from score_bf16), computed with `<Family>ForSequenceClassification`, plus `default/config.json` (the family's default
transformers config) and facts.peft_line_default, PEFT's line for it (r 8, PEFT's default
targets; `qkv_proj` for phi3, which PEFT has no default for).

`fixtures` writes under OUT_DIR:
  gqa/            Llama-3-style: GQA, llama3 rope scaling, untied, one model.safetensors
  tied/           tied embeddings, MHA, head_dim != hidden/heads, sharded (index.json)
  bnb/            `gqa` loaded in bitsandbytes 4-bit (nf4, double quant) and saved again
  inputs.safetensors        batch_pad_{ids,mask}, batch_full_{ids,mask}, labels_pad, labels_full
  score.safetensors         base_model.model.score.weight used for every forward below
  score_bf16.safetensors    the same rounded to bf16 (for the bf16 forward)
  expected.safetensors      logits_{gqa,tied}_{pad,full}, logits_nf4_{pad,full},
                            logits_bf16_{pad,full}, nf4_dequant_down1, inv_freq_{gqa,llama31}
  peft_adapter/adapter_model.safetensors   initial LoRA (B non-zero) + score for the gradient check
  peft_grads.safetensors    gradients after one backward, PEFT key names
  facts.json                loss, PEFT's trainable-parameter line, config attributes
"""
import contextlib
import io
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from bnb_reference import pin_fp32

PAD = 2
NUM_LABELS = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA31 = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def tiny_configs():
    from transformers import LlamaConfig

    gqa = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=[PAD, 3],
        initializer_range=0.05,
    )
    tied = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=PAD, initializer_range=0.05,
    )
    return gqa, tied


def randomize(model, gen):
    """Weights of a useful size everywhere (norms too), so every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5) * 2.0)


def make_inputs(gen, vocab):
    t = 12
    def toks(n):
        x = torch.randint(4, vocab, (n,), generator=gen)
        return x
    rows, masks = [], []
    # no padding / right padding / left padding / one real token (right) / one real token (left)
    for kind, real in [("none", t), ("right", 7), ("left", 9), ("right", 1), ("left", 1)]:
        ids = torch.full((t,), PAD, dtype=torch.long)
        mask = torch.zeros(t, dtype=torch.long)
        if kind in ("none", "right"):
            ids[:real] = toks(real)
            mask[:real] = 1
        else:
            ids[t - real:] = toks(real)
            mask[t - real:] = 1
        rows.append(ids)
        masks.append(mask)
    pad_ids, pad_mask = torch.stack(rows), torch.stack(masks)
    full_ids = torch.randint(4, vocab, (3, 10), generator=gen)
    full_mask = torch.ones_like(full_ids)
    return {
        "batch_pad_ids": pad_ids, "batch_pad_mask": pad_mask,
        "batch_full_ids": full_ids, "batch_full_mask": full_mask,
        "labels_pad": torch.tensor([0, 2, 1, 1, 0]), "labels_full": torch.tensor([2, 0, 1]),
    }


def seq_cls(path, score, dtype=torch.float32, cls=None, **kw):
    from transformers import LlamaForSequenceClassification

    cls = cls or LlamaForSequenceClassification
    m = cls.from_pretrained(
        path, num_labels=NUM_LABELS, pad_token_id=PAD, dtype=dtype, **kw
    )
    with torch.no_grad():
        m.score.weight.copy_(score)
    m.eval()
    return m


def logits(m, inputs, which):
    with torch.no_grad():
        return m(input_ids=inputs[f"batch_{which}_ids"],
                 attention_mask=inputs[f"batch_{which}_mask"]).logits.float().contiguous()


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def peft_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def peft_key(name):
    # As PEFT saves them (get_peft_model_state_dict): DoRA's magnitude without `.weight`.
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    name = name.replace(".modules_to_save.default", "").replace(".default", "")
    return name


def peft_gradients(base, targets, gen, inputs, out, expected, facts):
    """LoRA (r 4) on `targets` with random non-zero A, B and head, saved as peft_adapter/;
    PEFT's loss, logits and gradients of one backward on the padded batch."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                    modules_to_save=["score"], task_type="SEQ_CLS")
    pm = get_peft_model(base, lc)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(os.path.join(out, "peft_adapter"))
    pm.train()
    res = pm(input_ids=inputs["batch_pad_ids"], attention_mask=inputs["batch_pad_mask"],
             labels=inputs["labels_pad"])
    res.loss.backward()
    grads = {peft_key(n): p.grad.detach().float().contiguous()
             for n, p in pm.named_parameters() if p.requires_grad}
    save_file(grads, os.path.join(out, "peft_grads.safetensors"))
    facts["loss_pad"] = res.loss.item()
    expected["logits_peft_pad"] = res.logits.detach().float().contiguous()


def fixtures(out):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    gen = torch.Generator().manual_seed(1234)
    gqa_cfg, tied_cfg = tiny_configs()
    expected, facts = {}, {}

    for name, cfg, shard in [("gqa", gqa_cfg, None), ("tied", tied_cfg, "100KB")]:
        torch.manual_seed(0)
        lm = LlamaForCausalLM(cfg)
        randomize(lm, gen)
        kw = {"max_shard_size": shard} if shard else {}
        lm.save_pretrained(os.path.join(out, name), **kw)
    inputs = make_inputs(gen, min(gqa_cfg.vocab_size, tied_cfg.vocab_size))
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    score = torch.randn(NUM_LABELS, 64, generator=gen) * 0.3
    save_file({"base_model.model.score.weight": score}, os.path.join(out, "score.safetensors"))

    for name in ["gqa", "tied"]:
        m = seq_cls(os.path.join(out, name), score)
        for which in ["pad", "full"]:
            expected[f"logits_{name}_{which}"] = logits(m, inputs, which)
        inv, _ = ROPE_INIT_FUNCTIONS["llama3"](m.config) if name == "gqa" else (None, None)
        if inv is not None:
            expected["inv_freq_gqa"] = inv.float().contiguous()
        facts[f"config_{name}"] = {
            k: getattr(m.config, k) for k in [
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
                "max_position_embeddings"]
        }
        facts[f"config_{name}"]["rope_parameters"] = dict(m.config.rope_parameters)

    # bf16 end to end (the score head rounded to bf16 so both sides hold the same values).
    score16 = score.to(torch.bfloat16)
    save_file({"base_model.model.score.weight": score16.float()},
              os.path.join(out, "score_bf16.safetensors"))
    mb = seq_cls(os.path.join(out, "gqa"), score16, dtype=torch.bfloat16)
    for which in ["pad", "full"]:
        expected[f"logits_bf16_{which}"] = logits(mb, inputs, which)

    c31 = LlamaConfig(**LLAMA31)
    inv31, _ = ROPE_INIT_FUNCTIONS["llama3"](c31)
    expected["inv_freq_llama31"] = inv31.float().contiguous()

    # bitsandbytes 4-bit NF4 (double quant), fp32 compute.
    m4 = seq_cls(os.path.join(out, "gqa"), score, quantization_config=bnb_config(), device_map="cpu")
    pin_fp32(m4)
    import bitsandbytes as bnb

    for which in ["pad", "full"]:
        expected[f"logits_nf4_{which}"] = logits(m4, inputs, which)
    w = m4.model.layers[1].mlp.down_proj.weight
    expected["nf4_dequant_down1"] = bnb.functional.dequantize_4bit(w.data, w.quant_state).contiguous()
    m4.save_pretrained(os.path.join(out, "bnb"))
    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                    modules_to_save=["score"], task_type="SEQ_CLS")
    facts["peft_line_tiny"] = peft_line(get_peft_model(m4, lc))

    # Gradients of LoRA and the head after one backward (fp32, no dropout).
    peft_gradients(seq_cls(os.path.join(out, "gqa"), score), TARGETS, gen, inputs, out,
                   expected, facts)

    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)
    print("ok")


WINDOW = 5
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=PAD, pad_token_id=PAD,
              initializer_range=0.05)


def family_classes(family):
    """(config class, causal LM class, sequence classifier class, tiny config kwargs)."""
    import transformers as tf

    if family == "mistral":
        return (tf.MistralConfig, tf.MistralForCausalLM, tf.MistralForSequenceClassification,
                dict(num_hidden_layers=2, sliding_window=WINDOW, rope_theta=10000.0))
    if family == "qwen2":
        # Layer 0 full, layers 1-2 sliding (max_window_layers); biased q/k/v.
        return (tf.Qwen2Config, tf.Qwen2ForCausalLM, tf.Qwen2ForSequenceClassification,
                dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                     max_window_layers=1, rope_theta=1000000.0))
    if family == "qwen3":
        # head_dim 32 != hidden / heads; q/k norms.
        return (tf.Qwen3Config, tf.Qwen3ForCausalLM, tf.Qwen3ForSequenceClassification,
                dict(num_hidden_layers=3, head_dim=32, use_sliding_window=True,
                     sliding_window=WINDOW, max_window_layers=2, rope_theta=1000000.0))
    if family == "phi3":
        # LongRoPE as Phi-3-128k has it, with an original context (11) between the two batches'
        # lengths (10 and 12): the full batch takes the short factors, the padded one the long.
        half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
        return (tf.Phi3Config, tf.Phi3ForCausalLM, tf.Phi3ForSequenceClassification,
                dict(num_hidden_layers=2, sliding_window=WINDOW,
                     original_max_position_embeddings=11,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "short_factor": [1.0 + 0.25 * i for i in range(half)],
                                      "long_factor": [1.5 + 0.75 * i for i in range(half)],
                                      "original_max_position_embeddings": 11}))
    if family == "gemma2":
        # A small soft-cap so that it bites; query_pre_attn_scalar != head_dim.
        return (tf.Gemma2Config, tf.Gemma2ForCausalLM, tf.Gemma2ForSequenceClassification,
                dict(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=24,
                     attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                     sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh"))
    if family == "gemma3_text":
        # Local and global layers with their own rotary tables (linear scaling globally).
        return (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, tf.Gemma3TextForSequenceClassification,
                dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                     sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     rope_parameters={
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}))
    raise SystemExit(f"unknown family {family}")


def family_targets(family):
    if family == "phi3":
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return TARGETS


def default_peft_line(family, out):
    """PEFT's line for the family's default config (on the meta device, r 8)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model

    cfg_cls, _, cls, _ = family_classes(family)
    cfg = cfg_cls(num_labels=2)
    os.makedirs(os.path.join(out, "default"), exist_ok=True)
    cfg.save_pretrained(os.path.join(out, "default"))
    with init_empty_weights():
        m = cls(cfg)
    targets = ["qkv_proj"] if family == "phi3" else None
    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                    modules_to_save=["score"], task_type="SEQ_CLS")
    return peft_line(get_peft_model(m, lc))


def family_ckpt(family, out, vocab):
    cfg_cls, lm_cls, _, kw = family_classes(family)
    gen = torch.Generator().manual_seed(2025)
    cfg = cfg_cls(**{**COMMON, "vocab_size": vocab}, **kw)
    torch.manual_seed(0)
    lm = lm_cls(cfg)
    randomize(lm, gen)
    lm.save_pretrained(out)
    print("ok")


def family_fixtures(family, out):
    from peft import LoraConfig, get_peft_model

    cfg_cls, lm_cls, cls, kw = family_classes(family)
    gen = torch.Generator().manual_seed(2024)
    cfg = cfg_cls(**COMMON, **kw)
    torch.manual_seed(0)
    lm = lm_cls(cfg)
    randomize(lm, gen)
    lm.save_pretrained(os.path.join(out, "ckpt"))
    inputs = make_inputs(gen, cfg.vocab_size)
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    score = torch.randn(NUM_LABELS, cfg.hidden_size, generator=gen) * 0.3
    save_file({"base_model.model.score.weight": score}, os.path.join(out, "score.safetensors"))
    expected, facts = {}, {}
    ckpt = os.path.join(out, "ckpt")

    m = seq_cls(ckpt, score, cls=cls)
    facts["attn_implementation"] = m.config._attn_implementation
    for which in ["pad", "full"]:
        expected[f"logits_{which}"] = logits(m, inputs, which)

    # bf16 end to end (the score head rounded to bf16 so both sides hold the same values).
    score16 = score.to(torch.bfloat16)
    save_file({"base_model.model.score.weight": score16.float()},
              os.path.join(out, "score_bf16.safetensors"))
    mb = seq_cls(ckpt, score16, dtype=torch.bfloat16, cls=cls)
    for which in ["pad", "full"]:
        expected[f"logits_bf16_{which}"] = logits(mb, inputs, which).float()

    m4 = seq_cls(ckpt, score, cls=cls, quantization_config=bnb_config(), device_map="cpu")
    pin_fp32(m4)
    for which in ["pad", "full"]:
        expected[f"logits_nf4_{which}"] = logits(m4, inputs, which)
    m4.save_pretrained(os.path.join(out, "bnb"))
    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=family_targets(family)[:1],
                    modules_to_save=["score"], task_type="SEQ_CLS")
    facts["peft_line_tiny"] = peft_line(get_peft_model(m4, lc))
    facts["peft_line_tiny_targets"] = family_targets(family)[:1]

    peft_gradients(seq_cls(ckpt, score, cls=cls), family_targets(family), gen, inputs, out,
                   expected, facts)
    facts["targets"] = family_targets(family)
    facts["peft_line_default"] = default_peft_line(family, out)

    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)
    print("ok")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "fixtures":
        fixtures(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "family":
        family_fixtures(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "family_ckpt":
        family_ckpt(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
