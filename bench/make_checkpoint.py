#!/usr/bin/env python3
"""Random-weight Llama checkpoints (Hugging Face layout) and a tokenizer for the benchmarks.

    make_checkpoint.py --shape smol --out bench/cache/smol     # SmolLM2-135M-shaped, ~270 MB
    make_checkpoint.py --shape 8b   --out bench/cache/llama8b  # Llama-3-8B-shaped, ~16 GB

`smol` builds the model with transformers (LlamaForCausalLM, bf16, seed 0) and saves it with
`save_pretrained`. `8b` never holds the model in memory: it writes the safetensors shards
by hand, header first and then tensor by tensor in small chunks, so the writer's resident
memory stays at a few hundred MB whatever the shard size. Its values are tiled from a pool
of 32 Mi normal samples (x 0.02) at a different offset per tensor: loading and quantizing
cost the same for any values, and generating 8 G fresh normals would take minutes on 2 cores.

Both get a tokenizer: a byte-level BPE trained with `tokenizers` on the MRPC train sentences
(Llama-3's pre-tokenizer regex, `<|begin_of_text|>` prepended by the post-processor,
`<|end_of_text|>` as eos = pad). Its vocabulary is smaller than the model's (MRPC has few
distinct words), which is harmless: every id is a valid embedding row.

A folder that already holds a complete checkpoint of the same shape (a `.complete` stamp
with the same description) is left as it is, so `make bench` pays for it once.
"""
import argparse
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

SHAPES = {
    "smol": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3's pre-tokenizer pattern (tiktoken cl100k-like).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
STAMP = ".complete"


def default_mrpc() -> Path:
    root = Path(__file__).resolve().parent.parent
    shared = Path(os.environ.get("QLORA_SHARED", root.parent / "shared"))
    return shared / "data" / "mrpc"


def mrpc_sentences(mrpc_dir: Path):
    path = mrpc_dir / "train.tsv"
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) >= 5:
            yield cols[3]
            yield cols[4]


def write_tokenizer(out: Path, mrpc_dir: Path, vocab_size: int, model_max_length: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompt = "Does sentence 1 mean the same as sentence 2? Sentence 1: Sentence 2:"
    corpus = [prompt] + list(mrpc_sentences(mrpc_dir))
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                # Plain fast tokenizer: transformers must not rebuild it from a Llama template.
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "add_bos_token": True,
                "model_max_length": model_max_length,
                "padding_side": "right",
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2)
    )
    return bos_id, tok.token_to_id(EOS), tok.get_vocab_size()


def config_dict(shape: str, bos_id: int, eos_id: int) -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **s,
    }


def make_smol(out: Path, cfg: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"smol: {n:,} parameters written to {out}")


def tensor_shapes_8b(s: dict):
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not s["tie_word_embeddings"]:
        yield "lm_head.weight", (v, h)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def make_8b(out: Path, cfg: dict, shards: int):
    """Streams the shards: the header is known from the shapes, the data is written in chunks."""
    import torch

    tensors = list(tensor_shapes_8b(SHAPES["8b"]))
    total = sum(numel(s) * 2 for _, s in tensors)
    # Contiguous split into `shards` groups of about equal bytes, tensors never split.
    groups, cur, cur_bytes = [], [], 0
    target = total / shards
    for name, shape in tensors:
        b = numel(shape) * 2
        if cur and cur_bytes + b / 2 > target and len(groups) < shards - 1:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += b
    groups.append(cur)

    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(32 << 20, generator=gen) * 0.02).to(torch.bfloat16)
    pool_bytes = pool.view(torch.uint8).numpy().tobytes()
    pool_n = pool.numel()
    ones = torch.ones(SHAPES["8b"]["hidden_size"], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()

    weight_map = {}
    t0 = time.time()
    written = 0
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {}, 0
        for name, shape in group:
            b = numel(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
            off += b
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        hjson = json.dumps(header, separators=(",", ":")).encode()
        hjson += b" " * ((8 - len(hjson) % 8) % 8)
        tmp = out / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hjson)))
            f.write(hjson)
            for k, (name, shape) in enumerate(group):
                n = numel(shape)
                if name.endswith("norm.weight"):
                    f.write(ones)
                    continue
                # Tiled pool, offset per tensor so that no two tensors are identical.
                start = (zlib.crc32(name.encode()) % pool_n) & ~63
                left = n
                while left > 0:
                    take = min(left, pool_n - start)
                    f.write(pool_bytes[start * 2 : (start + take) * 2])
                    left -= take
                    start = 0
                written += n * 2
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / fname)
        print(
            f"8b: shard {si + 1}/{len(groups)} written ({written / 1e9:.1f}/{total / 1e9:.1f} GB, "
            f"{time.time() - t0:.0f} s)",
            flush=True,
        )
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mrpc_dir", type=Path, default=default_mrpc())
    ap.add_argument("--tokenizer_vocab", type=int, default=16384)
    ap.add_argument("--shards", type=int, default=4, help="8b only")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()

    out = a.out
    desc = json.dumps({"shape": a.shape, "dims": SHAPES[a.shape], "shards": a.shards, "v": 1}, sort_keys=True)
    if not a.force and (out / STAMP).is_file() and (out / STAMP).read_text() == desc:
        print(f"{out}: up to date")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    if a.shape == "8b":
        import shutil

        free = shutil.disk_usage(out).free
        need = 16.1e9
        if free < need * 1.1:
            sys.exit(f"{out}: only {free / 1e9:.1f} GB free, the 8B checkpoint needs {need / 1e9:.1f} GB")
    if not (a.mrpc_dir / "train.tsv").is_file():
        sys.exit(f"MRPC train.tsv not found in {a.mrpc_dir} (set --mrpc_dir or QLORA_SHARED)")
    bos_id, eos_id, tv = write_tokenizer(out, a.mrpc_dir, a.tokenizer_vocab, SHAPES[a.shape]["max_position_embeddings"])
    print(f"tokenizer: {tv} tokens (model vocabulary {SHAPES[a.shape]['vocab_size']})")
    cfg = config_dict(a.shape, bos_id, eos_id)
    if a.shape == "smol":
        make_smol(out, cfg)
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        make_8b(out, cfg, a.shards)
    (out / STAMP).write_text(desc)


if __name__ == "__main__":
    main()
