//! `qlora-cls`: QLoRA fine-tuning of Llama sequence classifiers.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qlora_cls::config::{self, Config, Override};
use qlora_cls::data::examples;
use qlora_cls::model::hf_config::{peft_param_counts_for, peft_param_line, LlamaConfig};
use qlora_cls::task::TaskLabels;
use qlora_cls::{calibration, demo, eval, loader, plot, runio, scored, splits, train};
use std::collections::BTreeMap;
use std::path::PathBuf;

const CONFIG_HELP: &str = "Configuration: `--config FILE` picks a YAML file (configs/mrpc.yaml); \
every key of it is also a flag of the same name (`--batch_size 16`, `--batch-size 16`, \
`--load_in_4bit false`); flags win over the file. See README.md for every key.";

#[derive(Parser)]
#[command(
    name = "qlora-cls",
    version,
    about = "QLoRA fine-tuning of Llama sequence classifiers on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune (LoRA + head on the 4-bit model), evaluating every epoch.
    /// Options: --config FILE, --resume [auto|DIR], and any configuration key as a flag.
    #[command(after_help = CONFIG_HELP)]
    Train {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// The task's metrics of a trained adapter on a split (the reference's eval.py).
    /// Options: --adapter DIR (required), --split S (default test) or --input FILE,
    /// --dense_weights auto|true|false (auto: dequantise the NF4 weights once, LoRA folded in
    /// fp32, when that takes at most half the free memory), --config FILE, config flags. The
    /// task and labels come with the adapter.
    #[command(after_help = CONFIG_HELP)]
    Eval {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Predictions for any split or file, labelled or not, as CSV (index,prediction,prob_0,...).
    /// Options: --adapter DIR and --out FILE (required), --split S (default test) or
    /// --input FILE (CSV, TSV, JSONL, parquet), --dense_weights (as `eval`), --errors FILE
    /// (the misclassified rows of a labelled split, with their text), --windows FILE (with
    /// `long_text: chunk`, every window's logits), --config FILE, config flags.
    #[command(after_help = CONFIG_HELP)]
    Predict {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Reads a model's config.json and prints its architecture and PEFT's parameter line.
    /// Options: --model_dir DIR, --config FILE, config flags (r, target_modules, num_classes).
    Inspect {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Writes a bitsandbytes 4-bit (NF4) checkpoint of a bf16/fp16/fp32 decoder checkpoint, as
    /// transformers saves a model loaded in 4 bits. Options: --model_dir DIR and --out DIR
    /// (required), --bnb_4bit_use_double_quant (true), --bnb_4bit_blocksize (64),
    /// --bnb_4bit_compute_dtype (bfloat16), --bnb_4bit_quant_storage (uint8),
    /// --max_shard_size (2GB), --force (replace a non-empty --out).
    Quantize {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Folds a trained adapter into its base model: a Hugging Face sequence-classification
    /// checkpoint (sharded safetensors, config with labels, tokenizer files). Options:
    /// --adapter DIR and --out DIR (required), --dtype bfloat16|float16|float32 (bfloat16),
    /// --quantize nf4 (a bitsandbytes 4-bit checkpoint, with a drift report on --sample rows of
    /// --sample_split), --max_shard_size (2GB), --force, --config FILE, config flags
    /// (model_dir, load_in_4bit, bnb_4bit_blocksize, ... as the adapter was trained).
    #[command(after_help = CONFIG_HELP)]
    Merge {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Serves the classifier over HTTP (text-embeddings-inference's /predict, /health, /info,
    /// /metrics, and a page at /). Options: --adapter DIR (required), --host (127.0.0.1),
    /// --port (8080; 0 picks a free one), --max_batch_tokens (16384), --max_batch_requests
    /// (64), --max_wait_ms (2), --max_queue (2048 inputs, then 429), --max_client_batch_size
    /// (64), --max_input_length (max_length or the model's positions), --dense_weights
    /// (auto: dequantise the NF4 weights once when that takes at most half the free memory;
    /// true, false), --config FILE, config
    /// flags (model_dir, prompt, device, ... as the adapter was trained).
    #[command(after_help = CONFIG_HELP)]
    Serve {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        flags: Vec<String>,
    },
    /// Checks what this binary can do on this machine, one line per item: what was compiled
    /// in (CUDA kernels and their archs, NCCL, Gloo), libtorch, each device, each kernel's
    /// self-check, a one-rank all-reduce per backend, and one training step of the demo's
    /// tiny model per device. Exits 0 only when every check passes; otherwise non-zero,
    /// naming the first failure. `--device auto` (every usable device), `cpu`, `cuda` (every
    /// GPU; none is a failure) or `cuda:N`.
    Doctor {
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Writes the embedded demo: a tiny Llama checkpoint, its tokenizer and a synthetic
    /// paraphrase data set in GLUE TSV layout.
    DemoAssets {
        #[arg(long)]
        out: PathBuf,
    },
    /// Draws the loss and per-epoch accuracy of every run folder below `--runs` (PNG + SVG)
    /// and writes a Markdown table of the final accuracy/F1. With `--scaling FILE` (the
    /// bench's scaling.csv) it draws tokens/s and peak memory against the sequence length and
    /// tokens/s against the batch size instead.
    Plot {
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A scaling CSV (impl, seq, batch, tokens_per_s, peak_rss_bytes, ...)
        #[arg(long, value_name = "FILE")]
        scaling: Option<PathBuf>,
    },
}

/// A subcommand's own options (`--config`, `--adapter`, ...) and the configuration flags,
/// in any order.
struct Args {
    config: Option<PathBuf>,
    own: BTreeMap<String, String>,
    overrides: Vec<Override>,
}

impl Args {
    fn parse(flags: &[String], own_keys: &[&str]) -> Result<Args> {
        let mut config = None;
        let mut own = BTreeMap::new();
        let mut overrides = Vec::new();
        for o in config::parse_flags(flags)? {
            if o.key == "config" {
                config = Some(PathBuf::from(o.value));
            } else if own_keys.contains(&o.key.as_str()) {
                own.insert(o.key, o.value);
            } else {
                overrides.push(o);
            }
        }
        Ok(Args {
            config,
            own,
            overrides,
        })
    }

    fn required(&self, key: &str) -> Result<String> {
        self.own
            .get(key)
            .cloned()
            .with_context(|| format!("missing --{key}"))
    }

    fn config(&self) -> Result<Config> {
        Ok(Config::load(self.config.as_deref(), &self.overrides)?.0)
    }
}

/// A split (or `--input FILE`) scored by a trained adapter.
struct Scored {
    adapter: PathBuf,
    split: String,
    n: usize,
    /// Wall time of the forward passes alone (the model loaded, the data encoded).
    seconds: f64,
    r: eval::EvalResult,
    labels: TaskLabels,
    metrics: Vec<String>,
    /// The adapter's temperature (calibration.json), applied to `r`.
    temperature: Option<f64>,
    /// How `r`'s labels were decided (threshold.json or `threshold`).
    decision: qlora_cls::threshold::Decision,
    /// With `--errors`: each row's text as the model read it (its tokens decoded), in `r`'s order.
    texts: Option<Vec<String>>,
}

/// `--dense_weights auto|true|false` (`serve`, `eval`, `predict`): `None` for auto.
fn dense_weights_flag(args: &Args) -> Result<Option<bool>> {
    Ok(match args.own.get("dense_weights").map(String::as_str) {
        None | Some("auto") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => anyhow::bail!("--dense_weights {v:?}: expected auto, true or false"),
    })
}

/// `eval` and `predict`: the model with `--adapter` loaded (its task and labels with it),
/// scored on `--input FILE` or `--split` (default test). `require_labels`: `eval`.
fn score_split(args: &Args, require_labels: bool) -> Result<Scored> {
    let cfg = args.config()?;
    let adapter = PathBuf::from(args.required("adapter")?);
    let split = args
        .own
        .get("split")
        .cloned()
        .unwrap_or_else(|| "test".into());
    let (mut loaded, labels) = loader::load_with_adapter(&cfg, &adapter)?;
    loader::for_inference(&mut loaded.model, loaded.device, dense_weights_flag(args)?)?;
    let (split, data) = match args.own.get("input") {
        Some(file) => {
            let path = PathBuf::from(file);
            let raw = examples::read_file(&path, &labels.task, require_labels, 0)?;
            if raw.is_empty() {
                anyhow::bail!("{}: no rows", path.display());
            }
            let name = path
                .file_stem()
                .map_or("input".into(), |s| s.to_string_lossy().into_owned());
            let rows = splits::encode_raw(&labels, &loaded.encoder, &raw, &name)?;
            (name, rows)
        }
        None => {
            let data_cfg = Config {
                task: labels.task.name.clone(),
                ..cfg.clone()
            };
            (
                split.clone(),
                splits::load_split(&data_cfg, &labels, &loaded.encoder, &split, require_labels)?,
            )
        }
    };
    let mut scoring = eval::Scoring::for_task(&labels, &cfg)?;
    scoring.decision = loader::decision(&cfg, &adapter, &labels.spec)?;
    let started = std::time::Instant::now();
    let r = eval::evaluate(
        &loaded.model,
        &data,
        &scoring,
        cfg.eval_batch_size,
        loaded.encoder.pad_id(),
        loaded.device,
        None,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let temperature = Some(loaded.model.temperature()).filter(|&t| t != 1.0);
    let texts = match args.own.get("errors") {
        Some(_) => Some(
            // A chunked document is shown by its first window.
            data.iter()
                .filter(|e| e.window == 0)
                .map(|e| {
                    let ids: Vec<u32> = e.ids.iter().map(|&i| i as u32).collect();
                    loaded
                        .encoder
                        .tokenizer()
                        .decode(&ids, true)
                        .map_err(|err| anyhow::anyhow!("cannot decode row {}: {err}", e.idx))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    Ok(Scored {
        texts,
        temperature,
        adapter,
        split,
        n: data.len(),
        seconds,
        r,
        labels,
        metrics: scoring.metrics,
        decision: scoring.decision,
    })
}

/// `scored N rows in S s (R rows/s)`: the forward passes alone, loading excluded (the
/// benchmark reads this line).
fn throughput_line(s: &Scored) -> String {
    format!(
        "scored {} rows in {:.3} s ({:.2} rows/s)",
        s.n,
        s.seconds,
        s.n as f64 / s.seconds.max(1e-9)
    )
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train { flags } => {
            // `--resume` alone means `--resume auto` (parse_flags reads a bare flag as true).
            let cfg = Args::parse(&flags, &[])?.config()?;
            train::train(&cfg)?;
        }
        Cmd::Eval { flags } => {
            let args = Args::parse(&flags, &["adapter", "split", "input", "dense_weights"])?;
            let s = score_split(&args, true)?;
            if s.r.metrics.is_empty() {
                anyhow::bail!("split `{}` has no labels: use `predict`", s.split);
            }
            let shown: Vec<String> =
                s.r.metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect();
            println!("{}: {} ({} examples)", s.split, shown.join(" "), s.n);
            println!("{}", throughput_line(&s));
            let out = s.adapter.join(format!("eval-{}.json", s.split));
            let mut json = serde_json::json!({"split": s.split, "loss": s.r.loss, "examples": s.n,
                "problem_type": s.labels.spec.problem_type.as_str(), "metrics": s.metrics,
                "scoring_s": s.seconds});
            if let Some(c) = s.r.calibration {
                json["calibration"] = serde_json::json!(c);
                let shown = |c: &calibration::Calibration| {
                    format!("nll {:.4} brier {:.4} ece {:.4}", c.nll, c.brier, c.ece)
                };
                match s.temperature {
                    // The model divided its logits by t: times t is what it says unscaled.
                    Some(t) => {
                        let raw = calibration::measure(
                            &calibration::scaled(&s.r.logits, 1.0 / t),
                            &s.r.gold,
                        )?;
                        println!(
                            "calibration: {} (temperature {t:.4}); without it {}",
                            shown(&c),
                            shown(&raw)
                        );
                        json["temperature"] = serde_json::json!(t);
                        json["uncalibrated"] = serde_json::json!(raw);
                    }
                    None => println!("calibration: {}", shown(&c)),
                }
            }
            for (k, v) in &s.r.metrics {
                json[k.as_str()] = serde_json::json!(v);
            }
            if !s.r.gold.is_empty() {
                scored::error_analysis(&s.adapter, &s.split, &s.labels.spec, &s.r, &mut json)?;
            }
            runio::write_json(&out, &json)?;
            println!("wrote {}", out.display());
        }
        Cmd::Predict { flags } => {
            let args = Args::parse(
                &flags,
                &[
                    "adapter",
                    "split",
                    "out",
                    "input",
                    "dense_weights",
                    "errors",
                    "windows",
                ],
            )?;
            let out = PathBuf::from(args.required("out")?);
            let s = score_split(&args, false)?;
            // Checked before anything is written: an unlabelled split has no errors to keep.
            let errors = match (args.own.get("errors"), &s.texts) {
                (Some(file), Some(texts)) => {
                    let spec = &s.labels.spec;
                    let csv = scored::errors_csv(spec, &s.decision, &s.r, texts, &s.split)?;
                    Some((PathBuf::from(file), csv))
                }
                _ => None,
            };
            let windows = match args.own.get("windows") {
                Some(f) => Some((PathBuf::from(f), scored::windows_csv(&s.r)?)),
                None => None,
            };
            runio::write_text(
                &out,
                &scored::predictions_csv(&s.labels.spec, &s.decision, &s.r),
            )?;
            println!("{}", throughput_line(&s));
            println!("wrote {} predictions to {}", s.r.pred.len(), out.display());
            if let Some((file, (csv, n))) = errors {
                runio::write_text(&file, &csv)?;
                println!("wrote {n} misclassified rows to {}", file.display());
            }
            if let Some((file, csv)) = windows {
                runio::write_text(&file, &csv)?;
            }
        }
        Cmd::Inspect { flags } => {
            // Unset, `target_modules` is PEFT's default for the family (Config::load).
            let cfg = Args::parse(&flags, &[])?.config()?;
            let dir = cfg.model_dir()?;
            let hf = LlamaConfig::from_dir(dir)?;
            let family = hf.switches.family;
            let targets = &cfg.target_modules;
            println!(
                "{}: {}, hidden {}, intermediate {}, {} layers, {} heads ({} KV heads, head_dim {}), \
                 vocab {}, {} embeddings, rope_theta {}",
                dir.join("config.json").display(),
                family.model_type(),
                hf.hidden_size,
                hf.intermediate_size,
                hf.num_hidden_layers,
                hf.num_attention_heads,
                hf.num_key_value_heads,
                hf.head_dim,
                hf.vocab_size,
                if hf.tie_word_embeddings { "tied" } else { "untied" },
                hf.rope_theta
            );
            for m in targets {
                if hf.linear_shape(m).is_none() {
                    anyhow::bail!(
                        "LoRA target module {m:?} is not a projection of model_type {}",
                        family.model_type()
                    );
                }
            }
            let lora = qlora_cls::loader::model_options(&cfg, tch::Device::Cpu, 0)?
                .lora
                .context("inspect: LoRA options")?;
            let (t, a) = peft_param_counts_for(&hf, cfg.num_classes, &lora);
            println!("{}", peft_param_line(t, a));
        }
        Cmd::Quantize { flags } => quantize_cmd(&flags)?,
        Cmd::Merge { flags } => merge_cmd(&flags)?,
        Cmd::Serve { flags } => serve_cmd(&flags)?,
        Cmd::Doctor { device } => {
            let work =
                std::env::temp_dir().join(format!("qlora-cls-doctor-{}", std::process::id()));
            let report = qlora_cls::doctor::run(&device, &work);
            let _ = std::fs::remove_dir_all(&work);
            match report.first_failure() {
                Some(item) => anyhow::bail!("doctor: `{}` failed: {}", item.name, item.detail),
                None => println!("doctor: every check passed"),
            }
        }
        Cmd::DemoAssets { out } => {
            demo::write_demo_assets(&out)?;
            println!("wrote the demo model and data to {}", out.display());
        }
        Cmd::Plot { runs, out, scaling } => {
            let written = match scaling {
                Some(csv) => plot::plot_scaling(&csv, &out)?,
                None => plot::plot(&runs, &out)?,
            };
            for p in written {
                println!("wrote {}", p.display());
            }
        }
    }
    Ok(())
}

fn quantize_cmd(flags: &[String]) -> Result<()> {
    use qlora_cls::quantize::{self, QuantizeOptions};
    let keys = [
        "model_dir",
        "out",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_blocksize",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
        "max_shard_size",
        "force",
    ];
    let args = Args::parse(flags, &keys)?;
    if args.config.is_some() {
        anyhow::bail!("quantize takes no --config");
    }
    if let Some(o) = args.overrides.first() {
        anyhow::bail!(
            "quantize: unknown option --{} (options: --{})",
            o.key,
            keys.join(", --")
        );
    }
    let flag = |key: &str| -> Result<Option<bool>> {
        args.own
            .get(key)
            .map(|v| {
                v.parse::<bool>()
                    .with_context(|| format!("--{key} {v:?}: expected true or false"))
            })
            .transpose()
    };
    let mut opts = QuantizeOptions::default();
    if let Some(v) = flag("bnb_4bit_use_double_quant")? {
        opts.nf4.double_quant = v;
    }
    if let Some(v) = args.own.get("bnb_4bit_blocksize") {
        opts.nf4.blocksize = v
            .parse()
            .with_context(|| format!("--bnb_4bit_blocksize {v:?}: expected an integer"))?;
    }
    if let Some(v) = args.own.get("bnb_4bit_compute_dtype") {
        opts.compute_dtype = v.clone();
    }
    if let Some(v) = args.own.get("bnb_4bit_quant_storage") {
        opts.quant_storage = v.clone();
    }
    if let Some(v) = args.own.get("max_shard_size") {
        opts.max_shard_bytes = qlora_cls::units::parse_size(v)?;
    }
    opts.force = flag("force")?.unwrap_or(false);
    let model_dir = PathBuf::from(args.required("model_dir")?);
    let out = PathBuf::from(args.required("out")?);
    let r = quantize::quantize_checkpoint(&model_dir, &out, &opts)?;
    println!(
        "wrote {}: {} weights in 4 bits, {} tensors copied, {} shard(s), {:.1} MB -> {:.1} MB; copied {}",
        out.display(),
        r.quantized,
        r.copied,
        r.shards,
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6,
        if r.files_copied.is_empty() { "no other files".to_string() } else { r.files_copied.join(", ") }
    );
    Ok(())
}

fn merge_cmd(flags: &[String]) -> Result<()> {
    use qlora_cls::merge::{self, MergeOptions};
    let args = Args::parse(
        flags,
        &[
            "adapter",
            "out",
            "dtype",
            "quantize",
            "max_shard_size",
            "force",
            "sample",
            "sample_split",
        ],
    )?;
    let cfg = args.config()?;
    let adapter = PathBuf::from(args.required("adapter")?);
    let out = PathBuf::from(args.required("out")?);
    let quantize_nf4 = match args.own.get("quantize").map(String::as_str) {
        None | Some("none") => false,
        Some("nf4") => true,
        Some(q) => anyhow::bail!("--quantize {q:?}: expected nf4 (or none)"),
    };
    let opts = MergeOptions {
        dtype: qlora_cls::model::hf_config::parse_dtype(
            args.own.get("dtype").map_or("bfloat16", String::as_str),
        )?,
        quantize_nf4,
        max_shard_bytes: match args.own.get("max_shard_size") {
            Some(v) => qlora_cls::units::parse_size(v)?,
            None => qlora_cls::quantize::DEFAULT_MAX_SHARD_BYTES,
        },
        force: match args.own.get("force") {
            Some(v) => v
                .parse()
                .with_context(|| format!("--force {v:?}: expected true or false"))?,
            None => false,
        },
        sample: match args.own.get("sample") {
            Some(v) => v
                .parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .with_context(|| format!("--sample {v:?}: expected a positive integer"))?,
            None => 64,
        },
        sample_split: args
            .own
            .get("sample_split")
            .cloned()
            .unwrap_or_else(|| cfg.eval_split.clone()),
    };
    let r = merge::merge(&cfg, &adapter, &out, &opts)?;
    println!(
        "wrote {}: {} weights merged, {} tensors copied, {} shard(s), {:.1} MB{}",
        out.display(),
        r.merged,
        r.copied,
        r.shards,
        r.bytes_out as f64 / 1e6,
        if r.dropped.is_empty() {
            String::new()
        } else {
            format!("; dropped {}", r.dropped.join(", "))
        }
    );
    if let Some(t) = r.temperature {
        println!("calibration: the temperature {t:.4} folded into score.weight (the merged model's logits are calibrated)");
    }
    if let Some(d) = &r.drift {
        println!(
            "nf4 drift vs the unmerged model on {} rows of {}: max |score diff| {:.3e}, mean {:.3e}, \
             max |logit diff| {:.3e}, top label unchanged on {:.1}% (merge_drift.json)",
            d.examples,
            d.source,
            d.max_abs_score_diff,
            d.mean_abs_score_diff,
            d.max_abs_logit_diff,
            100.0 * d.top_label_agreement
        );
    }
    Ok(())
}

fn serve_cmd(flags: &[String]) -> Result<()> {
    use qlora_cls::serve::{self, ServeOptions};
    let keys = [
        "adapter",
        "host",
        "port",
        "max_batch_tokens",
        "max_batch_requests",
        "max_wait_ms",
        "max_queue",
        "max_client_batch_size",
        "max_input_length",
        "dense_weights",
    ];
    let args = Args::parse(flags, &keys)?;
    let cfg = args.config()?;
    let adapter = PathBuf::from(args.required("adapter")?);
    fn num<T: std::str::FromStr>(args: &Args, key: &str, default: T) -> Result<T> {
        match args.own.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .ok()
                .with_context(|| format!("--{key} {v:?}: expected a non-negative integer")),
        }
    }
    let d = ServeOptions::default();
    let opts = ServeOptions {
        host: args.own.get("host").cloned().unwrap_or(d.host),
        port: num(&args, "port", d.port)?,
        max_batch_tokens: num(&args, "max_batch_tokens", d.max_batch_tokens)?,
        max_batch_requests: num(&args, "max_batch_requests", d.max_batch_requests)?,
        max_wait_ms: num(&args, "max_wait_ms", d.max_wait_ms)?,
        max_queue: num(&args, "max_queue", d.max_queue)?,
        max_client_batch_size: num(&args, "max_client_batch_size", d.max_client_batch_size)?,
        max_input_length: match args.own.get("max_input_length") {
            None => None,
            Some(_) => Some(num(&args, "max_input_length", 0usize)?),
        },
        dense_weights: dense_weights_flag(&args)?,
    };
    serve::serve(&cfg, &adapter, &opts)
}

/// The text of a panic payload (tch panics with libtorch's error message, e.g. on CUDA OOM).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn main() {
    // Many tch calls panic on a libtorch error instead of returning it. Those we can explain
    // (out of memory) go through the same message-and-hint path as other errors; any other
    // panic keeps Rust's report, which is a bug to fix.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if train::error_hint(&panic_text(info.payload())).is_none() {
            default_hook(info);
        }
    }));
    let result = match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_text(payload.as_ref());
            if train::error_hint(&msg).is_none() {
                std::process::exit(101);
            }
            Err(anyhow::anyhow!(msg))
        }
    };
    if let Err(e) = result {
        // A run stopped by a signal saved its checkpoint: say how to go on, exit as
        // interrupted (128 + SIGINT) so launchers and schedulers see it did not finish.
        if let Some(i) = e.downcast_ref::<train::Interrupted>() {
            eprintln!("{i}");
            std::process::exit(130);
        }
        let msg = format!("{e:#}");
        eprintln!("error: {msg}");
        if let Some(h) = train::error_hint(&msg) {
            eprintln!("hint: {h}");
        }
        std::process::exit(1);
    }
}
