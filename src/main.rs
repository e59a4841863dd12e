//! `qlora-cls`: QLoRA fine-tuning of Llama sequence classifiers.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qlora_cls::config::{self, Config};
use qlora_cls::model::hf_config::{peft_param_counts, peft_param_line, LlamaConfig};
use qlora_cls::{demo, eval, plot, runio, train};
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
    #[command(after_help = CONFIG_HELP)]
    Train {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue from a checkpoint: `auto` (the run folder's newest) or a folder.
        #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
        resume: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        flags: Vec<String>,
    },
    /// Accuracy and F1 of a trained adapter on a split (the reference's eval.py).
    #[command(after_help = CONFIG_HELP)]
    Eval {
        #[arg(long)]
        config: Option<PathBuf>,
        /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        flags: Vec<String>,
    },
    /// Predictions for any split, labelled or not, as CSV (index,prediction,prob_0,...).
    #[command(after_help = CONFIG_HELP)]
    Predict {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        flags: Vec<String>,
    },
    /// Reads a model's config.json and prints its architecture and PEFT's parameter line.
    Inspect {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        flags: Vec<String>,
    },
    /// Writes the embedded demo: a tiny Llama checkpoint, its tokenizer and a synthetic
    /// paraphrase data set in GLUE TSV layout.
    DemoAssets {
        #[arg(long)]
        out: PathBuf,
    },
    /// Draws the loss and per-epoch accuracy of every run folder below `--runs` (PNG + SVG)
    /// and writes a Markdown table of the final accuracy/F1.
    Plot {
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn load_config(file: &Option<PathBuf>, flags: &[String]) -> Result<Config> {
    let overrides = config::parse_flags(flags)?;
    Ok(Config::load(file.as_deref(), &overrides)?.0)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train {
            config,
            resume,
            flags,
        } => {
            let mut cfg = load_config(&config, &flags)?;
            if resume.is_some() {
                cfg.resume = resume;
            }
            train::train(&cfg)?;
        }
        Cmd::Eval {
            config,
            adapter,
            split,
            flags,
        } => {
            let cfg = load_config(&config, &flags)?;
            let loaded = train::load_with_adapter(&cfg, &adapter)?;
            let data = train::load_split(&cfg, &loaded.encoder, &split)?;
            let r = eval::evaluate(
                &loaded.model,
                &data,
                cfg.eval_batch_size,
                loaded.encoder.pad_id(),
                loaded.device,
                None,
            )?;
            let (acc, f1) = (
                r.accuracy
                    .context(format!("split `{split}` has no labels: use `predict`"))?,
                r.f1.unwrap_or(0.0),
            );
            println!(
                "{split}: accuracy {acc:.4} f1 {f1:.4} ({} examples)",
                data.len()
            );
            let out = adapter.join(format!("eval-{split}.json"));
            runio::write_json(
                &out,
                &serde_json::json!({"split": split, "accuracy": acc, "f1": f1, "loss": r.loss, "examples": data.len()}),
            )?;
            println!("wrote {}", out.display());
        }
        Cmd::Predict {
            config,
            adapter,
            split,
            out,
            flags,
        } => {
            let cfg = load_config(&config, &flags)?;
            let loaded = train::load_with_adapter(&cfg, &adapter)?;
            let data = train::load_split(&cfg, &loaded.encoder, &split)?;
            let r = eval::evaluate(
                &loaded.model,
                &data,
                cfg.eval_batch_size,
                loaded.encoder.pad_id(),
                loaded.device,
                None,
            )?;
            let mut text = String::from("index,prediction");
            for c in 0..cfg.num_classes {
                text.push_str(&format!(",prob_{c}"));
            }
            text.push('\n');
            for ((idx, pred), probs) in r.idx.iter().zip(&r.pred).zip(&r.probs) {
                text.push_str(&format!("{idx},{pred}"));
                for p in probs {
                    text.push_str(&format!(",{p:.6}"));
                }
                text.push('\n');
            }
            runio::write_text(&out, &text)?;
            println!("wrote {} predictions to {}", r.pred.len(), out.display());
        }
        Cmd::Inspect { config, flags } => {
            let cfg = load_config(&config, &flags)?;
            let dir = cfg.model_dir()?;
            let hf = LlamaConfig::from_dir(dir)?;
            println!(
                "{}: Llama, hidden {}, intermediate {}, {} layers, {} heads ({} KV heads, head_dim {}), \
                 vocab {}, {} embeddings, rope_theta {}",
                dir.join("config.json").display(),
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
            let (t, a) = peft_param_counts(&hf, cfg.num_classes, cfg.r, &cfg.target_modules);
            println!("{}", peft_param_line(t, a));
        }
        Cmd::DemoAssets { out } => {
            demo::write_demo_assets(&out)?;
            println!("wrote the demo model and data to {}", out.display());
        }
        Cmd::Plot { runs, out } => {
            for p in plot::plot(&runs, &out)? {
                println!("wrote {}", p.display());
            }
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
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
