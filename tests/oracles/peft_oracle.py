"""Oracle for tests/peft_parity.rs: the reference training stack (transformers
LlamaForSequenceClassification + PEFT LoRA + bitsandbytes AdamW8bit + transformers' linear
warmup schedule, optionally on a bitsandbytes 4-bit NF4 base) on a tiny random Llama, and
PEFT loading the adapters we write.

usage: peft_oracle.py setup OUT_DIR [FAMILY [options|dora]]
       peft_oracle.py load OUT_DIR ADAPTER_DIR
       peft_oracle.py all_linear OUT_DIR
       peft_oracle.py patterns OUT_DIR
       peft_oracle.py inits OUT_DIR

FAMILY (default llama; mistral, qwen2, qwen3, phi3, gemma2, gemma3_text) picks the decoder:
the same sizes, the family's own switches and a sliding window shorter than the batches
(model_oracle.family_classes), LoRA on PEFT's default targets (`qkv_proj` for phi3).
`options` trains LoRA with the options of OPTIONS instead (all-linear, rsLoRA, a rank and an
alpha pattern), `dora` the same with DoRA, `pissa` and `loftq` from those inits (the 4-bit run
on the residual model, PEFT's recipe); facts.json's `lora` says which.

setup writes under OUT_DIR:
  base/                   tiny random Llama (fp32 LlamaForCausalLM.save_pretrained) with a
                          word-level tokenizer.json whose eos (= pad) token `</s>` has id PAD
  inputs.safetensors      b{k}_ids, b{k}_mask, b{k}_labels (k < STEPS; right padding with PAD),
                          eval_ids, eval_mask, eval_labels
  init.safetensors        the initial LoRA A, B (B non-zero) and score head, PEFT key names
  ref_{fp32,nf4}.safetensors   per step s: s{s}.loss, s{s}.lr (f64), s{s}.logits,
                          s{s}.grad.<key> (before the update), s{s}.param.<key>, s{s}.m.<key>,
                          s{s}.v.<key> (after it; the 8-bit states dequantized by bitsandbytes),
                          for the 8-bit tensors also bitsandbytes' raw s{s}.state1.<key>,
                          state2 (uint8 codes), absmax1, absmax2; eval_logits (after 2 steps)
  peft_adapter_{fp32,nf4}/  model.save_pretrained after 2 steps (PEFT's own adapter layout)
  facts.json              lr, warmup, total, steps, PEFT's trainable-parameter line (4-bit),
                          LoraConfig's field names
load reads ADAPTER_DIR (what our trainer saved), loads it with
`PeftModel.from_pretrained(fp32 base, ADAPTER_DIR)` and writes OUT_DIR/load.json (warnings,
those that loading PEFT's own adapter gives, key sets, the config PEFT parsed) and OUT_DIR/load.safetensors (eval_logits).
all_linear wraps OUT_DIR/base in `LoraConfig(task_type="SEQ_CLS", r=8,
target_modules="all-linear")` and writes OUT_DIR/all_linear.json: the module names PEFT chose
and its trainable / all parameter counts; the adapter (B drawn non-zero) as PEFT saves it in
OUT_DIR/all_linear_adapter/ and its eval_logits in OUT_DIR/all_linear.safetensors.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

from bnb_reference import pin_fp32
from model_oracle import bnb_config, family_classes, peft_key, peft_line, randomize

PAD = 2
NUM_LABELS = 2
STEPS = 3
TOTAL = 4
WARMUP_RATIO = 0.06
LR = 2e-3
R, ALPHA = 8, 16
TARGETS = ["q_proj", "v_proj"]


def classes(family):
    """(causal LM class, sequence classifier class) of the family."""
    if family == "llama":
        from transformers import LlamaForCausalLM, LlamaForSequenceClassification

        return LlamaForCausalLM, LlamaForSequenceClassification
    _, lm, cls, _ = family_classes(family)
    return lm, cls


def family_of(out):
    with open(os.path.join(out, "base", "config.json")) as f:
        return json.load(f)["model_type"]


def targets(family):
    return ["qkv_proj"] if family == "phi3" else TARGETS


def tiny_config(family="llama"):
    from transformers import LlamaConfig

    if family != "llama":
        cfg_cls, _, _, kw = family_classes(family)
        kw = dict(kw)
        for k in ("head_dim", "query_pre_attn_scalar"):
            if k in kw:
                kw[k] = 64
        rope = kw.get("rope_parameters")
        if rope and rope.get("rope_type") == "longrope":
            # One factor per frequency of this config's head_dim (512 / 8 heads = 64).
            half = 512 // 8 // 2
            kw["rope_parameters"] = dict(
                rope, short_factor=[1.0 + 0.05 * i for i in range(half)],
                long_factor=[1.5 + 0.1 * i for i in range(half)])
        return cfg_cls(
            vocab_size=128, hidden_size=512, intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=PAD, pad_token_id=PAD,
            initializer_range=0.02, **kw)

    # hidden 512 and r = 8: lora_A of q/v and lora_B of q_proj have 8 * 512 = 4096 elements,
    # bitsandbytes' min_8bit_size, so they take the 8-bit blockwise path; v's lora_B
    # ([256, 8]) and the score head ([2, 512]) take the 32-bit one.
    return LlamaConfig(
        vocab_size=128, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=PAD, initializer_range=0.02,
    )


def write_tokenizer(d):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": PAD, "<sep>": 3}
    vocab.update({f"w{i}": i for i in range(4, 128)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}, f)


def padded(gen, lengths, t, vocab):
    ids = torch.full((len(lengths), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(4, vocab, (n,), generator=gen)
        mask[r, :n] = 1
    return ids, mask


def make_inputs(gen, vocab):
    out = {}
    shapes = [[11, 6, 11, 3], [9, 9, 2, 7], [12, 5, 8, 10]]
    labels = [[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]]
    for k in range(STEPS):
        lens = shapes[k]
        out[f"b{k}_ids"], out[f"b{k}_mask"] = padded(gen, lens, max(lens), vocab)
        out[f"b{k}_labels"] = torch.tensor(labels[k])
    lens = [10, 4, 1, 7, 10, 6]
    out["eval_ids"], out["eval_mask"] = padded(gen, lens, max(lens), vocab)
    out["eval_labels"] = torch.tensor([1, 0, 1, 1, 0, 0])
    return out


# The LoRA options of `setup OUT FAMILY options` (written to facts.json's `lora`).
OPTIONS = dict(target_modules="all-linear", use_rslora=True,
               rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32})


VARIANTS = {"options": OPTIONS, "dora": dict(OPTIONS, use_dora=True),
            # Inits that change the base: PiSSA (QPiSSA on the 4-bit run) and LoftQ (two
            # alternations), with an alpha pattern so that the scale differs per module.
            "pissa": dict(init_lora_weights="pissa", alpha_pattern={"v_proj": 32}),
            "loftq": dict(init_lora_weights="loftq",
                          loftq_config={"loftq_bits": 4, "loftq_iter": 2})}


def changes_base(out):
    init = lora_options(out).get("init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init == "loftq")


def cpu_loftq():
    """PEFT's own `loftq_init`, its compute device (CUDA or XPU only) set to the CPU: the
    source with that one line changed, so the algorithm is PEFT's as released."""
    import inspect

    import peft.tuners.lora.layer as layer
    import peft.utils.loftq_utils as lu

    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    src = inspect.getsource(lu.loftq_init)
    assert line in src, "PEFT's loftq_init changed; update the oracle"
    ns = dict(lu.__dict__)
    exec(src.replace(line, 'compute_device = "cpu"'), ns)
    layer.loftq_init = ns["loftq_init"]
    return ns["loftq_init"]


def residual_dir(out):
    """The base model a PiSSA / LoftQ init leaves (PEFT's recipe for a 4-bit run: initialise
    on the 16/32-bit model, save the residual, load that in 4 bits), written once."""
    from peft import get_peft_model

    d = os.path.join(out, "residual")
    if not os.path.exists(d):
        torch.manual_seed(0)
        lm = classes(family_of(out))[0].from_pretrained(os.path.join(out, "base"),
                                                        dtype=torch.float32)
        pm = get_peft_model(lm, lora_config(family_of(out), out, task_type=None))
        pm.unload().save_pretrained(d)
        write_tokenizer(d)
    return d


def lora_options(out):
    path = os.path.join(out, "lora_options.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def lora_config(family, out=None, task_type="SEQ_CLS", **over):
    from peft import LoraConfig

    kw = dict(target_modules=targets(family))
    kw.update(lora_options(out) if out else {})
    kw.update(over)
    extra = dict(modules_to_save=["score"]) if task_type == "SEQ_CLS" else {}
    return LoraConfig(task_type=task_type, r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                      **extra, **kw)


def base_model(out, nf4, residual=False):
    _, seq_cls = classes(family_of(out))
    kw = dict(num_labels=NUM_LABELS, pad_token_id=PAD, dtype=torch.float32)
    if nf4:
        kw.update(quantization_config=bnb_config(), device_map="cpu")
    torch.manual_seed(0)
    m = seq_cls.from_pretrained(residual_dir(out) if residual else os.path.join(out, "base"), **kw)
    if nf4:
        # bitsandbytes' portable dequantisation + an fp32 matmul, as on CUDA, on every CPU.
        pin_fp32(m)
    return m


def eval_logits(pm, inputs):
    was_training = pm.training
    pm.eval()
    with torch.no_grad():
        lg = pm(input_ids=inputs["eval_ids"], attention_mask=inputs["eval_mask"]).logits
    pm.train(was_training)
    return lg.float().contiguous()


def reference(out, tag, nf4, init, inputs, warmup):
    """STEPS optimizer steps of the reference stack from `init`, on the batches b0..b{STEPS-1}."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    if nf4 and changes_base(out):
        # PiSSA and LoftQ refuse a 4-bit weight: the residual model, quantised, with a plain
        # LoRA on top (its A, B are set from `init` below, as in every variant).
        pm = get_peft_model(base_model(out, True, residual=True),
                            lora_config(family_of(out), out, init_lora_weights=True,
                                        loftq_config={}))
    else:
        pm = get_peft_model(base_model(out, nf4), lora_config(family_of(out), out))
    named = [(peft_key(n), p) for n, p in pm.named_parameters() if p.requires_grad]
    assert sorted(k for k, _ in named) == sorted(init), "trainable keys differ from init"
    with torch.no_grad():
        for k, p in named:
            p.copy_(init[k])
    params = [p for _, p in named]
    opt = bnb.optim.AdamW8bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, warmup, TOTAL)
    pm.train()
    res = {}
    for s in range(STEPS):
        o = pm(input_ids=inputs[f"b{s}_ids"], attention_mask=inputs[f"b{s}_mask"],
               labels=inputs[f"b{s}_labels"])
        o.loss.backward()
        res[f"s{s}.loss"] = torch.tensor([o.loss.item()], dtype=torch.float64)
        res[f"s{s}.lr"] = torch.tensor([opt.param_groups[0]["lr"]], dtype=torch.float64)
        res[f"s{s}.logits"] = o.logits.detach().float().contiguous()
        for k, p in named:
            res[f"s{s}.grad.{k}"] = p.grad.detach().clone().contiguous()
        opt.step()
        sched.step()
        opt.zero_grad()
        for k, p in named:
            res[f"s{s}.param.{k}"] = p.detach().clone().contiguous()
            st = opt.state[p]
            if "absmax1" in st:
                res[f"s{s}.m.{k}"] = F.dequantize_blockwise(
                    st["state1"], absmax=st["absmax1"], code=st["qmap1"], blocksize=256).contiguous()
                res[f"s{s}.v.{k}"] = F.dequantize_blockwise(
                    st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=256).contiguous()
                for raw in ("state1", "state2", "absmax1", "absmax2"):
                    res[f"s{s}.{raw}.{k}"] = st[raw].clone().contiguous()
            else:
                res[f"s{s}.m.{k}"] = st["state1"].clone().contiguous()
                res[f"s{s}.v.{k}"] = st["state2"].clone().contiguous()
        if s == 1:
            pm.save_pretrained(os.path.join(out, f"peft_adapter_{tag}"))
            res["eval_logits"] = eval_logits(pm, inputs)
    save_file(res, os.path.join(out, f"ref_{tag}.safetensors"))
    return pm


def setup(out, family="llama", variant=None):
    from peft import LoraConfig, get_peft_model

    if variant is not None:
        assert variant in VARIANTS, f"unknown setup variant {variant}"
        with open(os.path.join(out, "lora_options.json"), "w") as f:
            json.dump(VARIANTS[variant], f)

    if variant == "loftq":
        cpu_loftq()
    gen = torch.Generator().manual_seed(4321)
    cfg = tiny_config(family)
    torch.manual_seed(0)
    lm = classes(family)[0](cfg)
    randomize(lm, gen)
    base = os.path.join(out, "base")
    lm.save_pretrained(base)
    write_tokenizer(base)
    inputs = make_inputs(gen, cfg.vocab_size)
    save_file(inputs, os.path.join(out, "inputs.safetensors"))

    # Initial trainable tensors: B non-zero so that A's gradients are too; DoRA's magnitudes
    # near their initial row norms (a few percent off, so that they matter).
    fresh = {peft_key(n): p.detach().clone() for n, p in
             get_peft_model(base_model(out, False), lora_config(family, out)).named_parameters()
             if p.requires_grad}
    init = {}
    for k, p in sorted(fresh.items()):
        noise = torch.randn(p.shape, generator=gen)
        init[k] = (p * (1 + 0.05 * noise) if k.endswith("lora_magnitude_vector")
                   else noise * 0.05).contiguous()
    save_file(init, os.path.join(out, "init.safetensors"))

    warmup = math.ceil(TOTAL * WARMUP_RATIO)  # TrainingArguments.get_warmup_steps
    reference(out, "fp32", False, init, inputs, warmup)
    # bitsandbytes as it runs on this CPU, the nested absmax included: our NF4 kernels
    # reproduce its native CPU quantize_blockwise rule (docs/nf4.md), so the dequantized
    # weights are bit-identical. (model_oracle's CUDA-like patch is deliberately not applied.)
    pm4 = reference(out, "nf4", True, init, inputs, warmup)
    facts = {
        "lr": LR, "warmup": warmup, "total": TOTAL, "steps": STEPS, "warmup_ratio": WARMUP_RATIO,
        "num_labels": NUM_LABELS, "pad": PAD, "r": R, "lora_alpha": ALPHA,
        "targets": sorted({t.rsplit(".", 1)[-1] for t in pm4.peft_config["default"].target_modules}),
        "family": family,
        "lora": {k: v for k, v in lora_options(out).items() if k != "target_modules"},
        "peft_line_nf4": peft_line(pm4),
        "lora_config_fields": sorted(f.name for f in dataclasses.fields(LoraConfig)),
    }
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=1)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def all_warnings():
    """Every Python warning and every WARNING+ log record of transformers/peft inside."""
    import transformers

    handler = Collect()
    loggers = [logging.getLogger("transformers"), logging.getLogger("peft")]
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.records, caught
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            transformers.logging.set_verbosity(old)


def load(out, adapter):
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    inputs = load_file(os.path.join(out, "inputs.safetensors"))

    def peft_load(path):
        base = base_model(out, False)
        with all_warnings() as (records, caught):
            config = PeftConfig.from_pretrained(path)
            pm = PeftModel.from_pretrained(base, path)
        return config, pm, records + [f"{w.category.__name__}: {w.message}" for w in caught]

    # What loading PEFT's own adapter says (library deprecation notices and the like) is the
    # baseline; loading ours must say nothing more.
    _, _, baseline = peft_load(os.path.join(out, "peft_adapter_fp32"))
    config, pm, msgs = peft_load(adapter)
    ours = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(pm)
    worst = max((state[k].float() - ours[k].float()).abs().max().item()
                for k in ours if k in state) if ours else float("inf")
    loaded = config.to_dict()
    report = {
        "warnings": msgs,
        "baseline_warnings": baseline,
        "file_keys_not_in_model": sorted(set(ours) - set(state)),
        "model_keys_not_in_file": sorted(set(state) - set(ours)),
        "max_abs_loaded_minus_file": worst,
        "parsed_config": {k: (sorted(v) if isinstance(v, (set, list)) else v)
                          for k, v in loaded.items()
                          if k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                   "target_modules", "modules_to_save", "bias", "use_rslora",
                                   "use_dora", "fan_in_fan_out", "inference_mode")},
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "task_type": str(getattr(config.task_type, "value", config.task_type)),
    }
    save_file({"eval_logits": eval_logits(pm, inputs)}, os.path.join(out, "load.safetensors"))
    with open(os.path.join(out, "load.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)


def all_linear(out):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(base_model(out, False),
                        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                   target_modules="all-linear"))
    trainable, total = pm.get_nb_trainable_parameters()
    # A trained-looking adapter (B non-zero), saved as PEFT saves it, and its logits.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(os.path.join(out, "all_linear_adapter"))
    inputs = load_file(os.path.join(out, "inputs.safetensors"))
    save_file({"eval_logits": eval_logits(pm, inputs)},
              os.path.join(out, "all_linear.safetensors"))
    with open(os.path.join(out, "all_linear.json"), "w") as f:
        json.dump({"target_modules": sorted(pm.peft_config["default"].target_modules),
                   "trainable": trainable, "all": total}, f)


# Per-module ranks and alphas (a short name, a full name, a regex) and a layer choice with
# rsLoRA: the options that make one module's adapter differ from another's.
PATTERN_CONFIGS = {
    "patterns": dict(target_modules=["q_proj", "v_proj", "o_proj"],
                     rank_pattern={"q_proj": 4, "model.layers.1.self_attn.v_proj": 2},
                     alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.o_.*": 4}),
    "layers": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                   use_rslora=True),
    # DoRA with rsLoRA and a rank pattern, magnitudes moved off their initial norms: what
    # merge_and_unload folds (m / ||W + s·B·A|| row by row).
    "dora": dict(target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True, use_rslora=True,
                 rank_pattern={"o_proj": 4}),
}


def patterns(out):
    from peft import LoraConfig, get_peft_model
    inputs = load_file(os.path.join(out, "inputs.safetensors"))
    facts = {}
    for tag, kw in PATTERN_CONFIGS.items():
        pm = get_peft_model(base_model(out, False),
                            LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, **kw))
        trainable, total = pm.get_nb_trainable_parameters()
        torch.manual_seed(2)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
        pm.save_pretrained(os.path.join(out, f"{tag}_adapter"))
        save_file({"eval_logits": eval_logits(pm, inputs)},
                  os.path.join(out, f"{tag}.safetensors"))
        ranks = {n: m.r["default"] for n, m in pm.named_modules() if hasattr(m, "lora_A")}
        scales = {n: m.scaling["default"] for n, m in pm.named_modules() if hasattr(m, "lora_A")}
        facts[tag] = {"trainable": trainable, "all": total, "ranks": ranks, "scales": scales}
        merged = pm.merge_and_unload()
        save_file({n: p.detach().contiguous() for n, p in merged.state_dict().items()
                   if n.endswith("_proj.weight")},
                  os.path.join(out, f"{tag}_merged.safetensors"))
    with open(os.path.join(out, "patterns.json"), "w") as f:
        json.dump(facts, f, indent=1)


# PEFT's base-changing inits on one weight: (init_lora_weights, loftq_config).
INIT_CASES = {"pissa": ("pissa", {}), "pissa_niter_2": ("pissa_niter_2", {}),
              "loftq_1": ("loftq", {"loftq_bits": 4, "loftq_iter": 1}),
              "loftq_3": ("loftq", {"loftq_bits": 4, "loftq_iter": 3})}
INIT_WEIGHTS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
INIT_SEED = 17


def inits(out):
    """PEFT's `pissa_init` and `loftq_init` methods, called on a LoRA layer wrapping each of
    INIT_WEIGHTS (r=R, alpha=ALPHA), the generator seeded with INIT_SEED right before (what
    `pissa_niter_N` draws from). Writes OUT/inits.safetensors: `<case>.<weight>.{A,B,base}`."""
    from peft import LoraConfig, get_peft_model

    st = load_file(os.path.join(out, "base", "model.safetensors"))
    res = {}
    for wname in INIT_WEIGHTS:
        w = st[wname]
        for tag, (init, loftq) in INIT_CASES.items():
            holder = torch.nn.Module()
            holder.x = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                holder.x.weight.copy_(w)
            cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["x"],
                             init_lora_weights=True)
            layer = get_peft_model(holder, cfg).base_model.model.x
            torch.manual_seed(INIT_SEED)
            if init == "loftq":
                layer.loftq_init("default", LoraConfig(r=R, lora_alpha=ALPHA,
                                                       target_modules=["x"],
                                                       init_lora_weights="loftq",
                                                       loftq_config=loftq))
            else:
                layer.pissa_init("default", init)
            res[f"{tag}.{wname}.A"] = layer.lora_A["default"].weight.detach().contiguous()
            res[f"{tag}.{wname}.B"] = layer.lora_B["default"].weight.detach().contiguous()
            res[f"{tag}.{wname}.base"] = layer.get_base_layer().weight.detach().contiguous()
    save_file(res, os.path.join(out, "inits.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    cpu_loftq()
    if len(sys.argv) == 3 and sys.argv[1] == "inits":
        inits(sys.argv[2])
        print("ok")
        sys.exit(0)
    if len(sys.argv) in (3, 4, 5) and sys.argv[1] == "setup":
        setup(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "all_linear":
        all_linear(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "patterns":
        patterns(sys.argv[2])
    else:
        sys.exit(__doc__)
    print("ok")
