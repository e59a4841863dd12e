"""Oracle for tests/quantize.rs: a tiny bf16 Llama checkpoint, what transformers +
bitsandbytes make of it in 4 bits, and checks of the checkpoint `quantize_checkpoint` wrote.

usage: quantize_oracle.py make DIR
         DIR/orig/         bf16 LlamaForCausalLM (GQA, untied lm_head), sharded, + tokenizer
         DIR/ref/          that model loaded by transformers in 4 bits (nf4, double quant,
                           compute float32) and saved with save_pretrained
         DIR/inputs.safetensors   ids, mask (left and right padding), score (2 x hidden)
       quantize_oracle.py check DIR OUT
         loads OUT with transformers, compares it with the self-quantized model (logits,
         loading info) and with DIR/ref (every tensor, byte for byte); writes DIR/check.json
"""
import json
import os
import sys

import torch

from bnb_reference import pin_fp32

PAD = 0
NUM_LABELS = 2


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def make(d):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=PAD, initializer_range=0.05,
    )
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321)
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    lm = lm.to(torch.bfloat16)
    orig = os.path.join(d, "orig")
    lm.save_pretrained(orig, max_shard_size="60KB")
    shards = [f for f in os.listdir(orig) if f.endswith(".safetensors")]
    assert len(shards) >= 2, shards

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, cfg.vocab_size):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(orig)

    ref = AutoModelForCausalLM.from_pretrained(orig, quantization_config=bnb_config(),
                                               device_map="cpu")
    ref.save_pretrained(os.path.join(d, "ref"))

    ids = torch.randint(4, cfg.vocab_size, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    for row, (side, real) in enumerate([("none", 11), ("right", 6), ("left", 8), ("left", 1)]):
        if side == "right":
            ids[row, real:] = PAD
            mask[row, real:] = 0
        elif side == "left":
            ids[row, :11 - real] = PAD
            mask[row, :11 - real] = 0
    score = torch.randn(NUM_LABELS, cfg.hidden_size, generator=gen) * 0.3
    save_file({"ids": ids, "mask": mask, "score": score.contiguous()},
              os.path.join(d, "inputs.safetensors"))
    print("ok")


def all_tensors(folder):
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as s:
                for k in s.keys():
                    assert k not in out, f"{k} twice in {folder}"
                    out[k] = (s.get_tensor(k), f)
    return out


def loading_info(info):
    return {k: sorted(str(x) for x in info.get(k, [])) for k in
            ["missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"]}


def check(d, out):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    orig = os.path.join(d, "orig")
    inputs = load_file(os.path.join(d, "inputs.safetensors"))
    ids, mask = inputs["ids"], inputs["mask"]
    res = {}

    # 1. Causal LM: ours as a pre-quantized checkpoint vs transformers quantizing the original.
    ours, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                      output_loading_info=True)
    theirs, info_t = AutoModelForCausalLM.from_pretrained(
        orig, quantization_config=bnb_config(), device_map="cpu", output_loading_info=True)
    res["causal_info"] = loading_info(info)
    res["causal_info_ref"] = loading_info(info_t)
    res["linear4bit_modules"] = pin_fp32(ours)
    pin_fp32(theirs)
    res["ours_is_4bit"] = bool(getattr(ours, "is_loaded_in_4bit", False)
                               or getattr(ours, "is_quantized", False))
    res["ours_compute_dtype"] = str(ours.config.quantization_config.bnb_4bit_compute_dtype)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits.float()
        b = theirs(input_ids=ids, attention_mask=mask).logits.float()
    res["causal_max_abs_diff"] = (a - b).abs().max().item()
    res["causal_max_abs"] = b.abs().max().item()

    # 2. Sequence classification from the same files, the same score head on both sides.
    def seq(path, **kw):
        m, inf = LlamaForSequenceClassification.from_pretrained(
            path, num_labels=NUM_LABELS, device_map="cpu", output_loading_info=True, **kw)
        with torch.no_grad():
            m.score.weight.copy_(inputs["score"].to(m.score.weight.dtype))
        pin_fp32(m)
        m.eval()
        return m, loading_info(inf)

    s_ours, res["seq_info"] = seq(out)
    s_theirs, res["seq_info_ref"] = seq(orig, quantization_config=bnb_config())
    with torch.no_grad():
        a = s_ours(input_ids=ids, attention_mask=mask).logits.float()
        b = s_theirs(input_ids=ids, attention_mask=mask).logits.float()
    res["seq_max_abs_diff"] = (a - b).abs().max().item()
    res["seq_max_abs"] = b.abs().max().item()

    # 3. Byte for byte against what save_pretrained wrote for the self-quantized model.
    mine, ref = all_tensors(out), all_tensors(os.path.join(d, "ref"))
    res["only_in_ours"] = sorted(set(mine) - set(ref))
    res["only_in_ref"] = sorted(set(ref) - set(mine))
    differ, same = [], 0
    for k in sorted(set(mine) & set(ref)):
        x, y = mine[k][0], ref[k][0]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            differ.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        else:
            same += 1
    res["tensors_identical"] = same
    res["tensors_differ"] = differ
    res["weight_suffixes"] = sorted({k.split("proj.")[1] for k in mine if "proj." in k})

    # 4. The files around the tensors.
    files = sorted(os.listdir(out))
    res["files"] = files
    shards = [f for f in files if f.endswith(".safetensors")]
    res["shards"] = len(shards)
    index_path = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        res["index_ok"] = (index["weight_map"] == {k: v[1] for k, v in mine.items()}
                           and index["metadata"]["total_size"]
                           == sum(v[0].numel() * v[0].element_size() for v in mine.values()))
    with open(os.path.join(out, "config.json")) as f:
        cfg_ours = json.load(f)
    with open(os.path.join(d, "ref", "config.json")) as f:
        cfg_ref = json.load(f)
    res["config_diff"] = sorted(k for k in set(cfg_ours) | set(cfg_ref)
                                if cfg_ours.get(k) != cfg_ref.get(k))
    res["config_quant_equal"] = cfg_ours.get("quantization_config") == cfg_ref.get(
        "quantization_config")
    t_ours, t_orig = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(orig)
    text = "w5 w17 w40 unknown w95"
    res["tokenizer_same"] = t_ours(text)["input_ids"] == t_orig(text)["input_ids"]
    with open(os.path.join(d, "check.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
