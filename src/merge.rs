//! `qlora-cls merge`: folds a trained adapter into its base model and writes a Hugging Face
//! sequence-classification checkpoint (`AutoModelForSequenceClassification.from_pretrained`
//! loads it with no missing or unexpected keys), or with `--quantize nf4` a bitsandbytes 4-bit
//! one.
//!
//! The weights the adapter was trained against are the ones merged onto: a bitsandbytes
//! checkpoint is dequantised; a 16/32-bit base trained with `load_in_4bit` is quantised to NF4
//! and dequantised again, with the run's block size and double quantisation, since that is
//! what the LoRA pairs learnt to correct. Each `W + (α/r)·B·A` is computed in fp32 and cast
//! once to `--dtype` (casting the base first and merging in 16 bits loses the small updates).
//!
//! Names are mapped generically: every `…<module>.lora_A.weight` / `lora_B.weight` pair of the
//! adapter lands on `<module>.weight` of the checkpoint, every other adapter tensor (the
//! `score` head) replaces or joins the checkpoint's tensor of that name, `lm_head` is dropped
//! (a classifier has none). Output is streamed: the header of each shard is planned from the
//! shapes, then tensors are read, merged and written one at a time.
//!
//! Why one file: plan, fold and write are one streaming pass over the checkpoint, and the
//! drift report checks that pass's output; split, each part would re-derive the others' names.
use crate::adapter;
use crate::config::Config;
use crate::data::batch::{collate, Encoded, TextEncoder};
use crate::data::prompt;
use crate::labels::{self, LabelSpec};
use crate::lora::LoraInit;
use crate::model::checkpoint::{kind_of, Checkpoint, INDEX_FILE};
use crate::model::classifier::LlamaClassifier;
use crate::model::family::Family;
use crate::model::hf_config::dtype_config_name;
use crate::quant::nf4::{self, Nf4Options, Nf4Tensor};
use crate::quantize::{self, QuantizeOptions};
use crate::runio;
use crate::task::TaskLabels;
use crate::{loader, splits};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The tensors bitsandbytes stores beside a 4-bit `weight`.
const BNB_SUFFIXES: [&str; 6] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
];

#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// dtype of the written floating-point tensors.
    pub dtype: Kind,
    /// Write a bitsandbytes NF4 checkpoint of the merged weights instead.
    pub quantize_nf4: bool,
    pub max_shard_bytes: u64,
    /// Replace a non-empty `out`.
    pub force: bool,
    /// Rows scored for the NF4 drift report.
    pub sample: usize,
    /// Split the drift sample is read from (when `data_dir` is set).
    pub sample_split: String,
}

/// How far the re-quantised merge's predictions are from the unmerged model's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Drift {
    pub examples: usize,
    pub source: String,
    pub max_abs_score_diff: f64,
    pub mean_abs_score_diff: f64,
    pub max_abs_logit_diff: f64,
    /// Share of rows whose top label is unchanged.
    pub top_label_agreement: f64,
}

#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// Weights with a LoRA pair folded in.
    pub merged: usize,
    /// Tensors written as they are (cast to the output dtype).
    pub copied: usize,
    /// Checkpoint tensors a classifier does not have (`lm_head`).
    pub dropped: Vec<String>,
    pub shards: usize,
    pub bytes_out: u64,
    pub drift: Option<Drift>,
    /// The adapter's temperature (calibration.json), folded into the score head.
    pub temperature: Option<f64>,
}

/// The adapter's tensors under the merged model's names.
struct AdapterTensors {
    /// module path (`model.layers.0.self_attn.q_proj`) → (A `[r, in]`, B `[out, r]`, scale)
    pairs: BTreeMap<String, (Tensor, Tensor, f64)>,
    /// DoRA's magnitude `[out]` of each pair's module (PEFT's `lora_magnitude_vector`).
    magnitudes: BTreeMap<String, Tensor>,
    /// other tensors (`score.weight`, divided by the adapter's temperature if it has one)
    full: BTreeMap<String, Tensor>,
    /// The temperature of the adapter's calibration.json, folded into `score.weight`.
    temperature: Option<f64>,
    /// PiSSA / LoftQ: the pairs fold onto the residual base, read from the adapter's
    /// `residual_base.safetensors` or, without one, computed again as training did.
    init: LoraInit,
    residual: Option<Checkpoint>,
}

fn read_adapter(dir: &Path) -> Result<AdapterTensors> {
    let meta = adapter::read_meta(dir)?;
    // `read_meta` refused every option that changes what a pair computes but rsLoRA and the
    // rank / alpha patterns, which set each pair's scale as PEFT's `update_layer` does, and
    // DoRA, whose magnitudes rescale the folded rows.
    let lora = crate::lora::LoraConfig {
        r: meta.r,
        alpha: meta.lora_alpha,
        dropout: 0.0,
        target_modules: meta.target_modules.clone(),
        use_rslora: meta.use_rslora,
        layers: None,
        rank_pattern: meta.rank_pattern.clone().into_iter().collect(),
        alpha_pattern: meta.alpha_pattern.clone().into_iter().collect(),
        use_dora: meta.use_dora,
        init: meta.init,
    };
    let path = dir.join(adapter::WEIGHTS_FILE);
    let weights = adapter::read_safetensors(&path)?;
    let (mut a, mut b, mut full) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut magnitudes = BTreeMap::new();
    for (key, t) in weights {
        let name = key.strip_prefix("base_model.model.").unwrap_or(&key);
        if let Some(m) = name.strip_suffix(".lora_magnitude_vector") {
            ensure!(
                meta.use_dora,
                "{}: tensor {key} is DoRA's but adapter_config.json says use_dora false",
                path.display()
            );
            magnitudes.insert(m.to_string(), t);
        } else if let Some(m) = name.strip_suffix(".lora_A.weight") {
            a.insert(m.to_string(), t);
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            b.insert(m.to_string(), t);
        } else if name.contains("lora_") {
            bail!(
                "{}: tensor {key} is a LoRA kind merge does not support",
                path.display()
            );
        } else {
            full.insert(name.replace(".modules_to_save.default", ""), t);
        }
    }
    let mut pairs = BTreeMap::new();
    for (m, ta) in a {
        let tb = b
            .remove(&m)
            .with_context(|| format!("{}: {m} has lora_A but no lora_B", path.display()))?;
        let (sa, sb) = (ta.size(), tb.size());
        ensure!(
            sa.len() == 2 && sb.len() == 2 && sa[0] == sb[1],
            "{}: {m} has lora_A {sa:?} and lora_B {sb:?}, which do not multiply",
            path.display()
        );
        let module = m.rsplit('.').next().unwrap_or(&m);
        let layer = m
            .split('.')
            .skip_while(|p| *p != "layers")
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok())
            .unwrap_or(0);
        let (r, alpha) = lora
            .for_module(layer, &m, module)
            .unwrap_or((meta.r, meta.lora_alpha));
        ensure!(
            r == sa[0],
            "{}: {m} has rank {} but adapter_config.json gives it r {r}",
            path.display(),
            sa[0]
        );
        if meta.use_dora {
            let mag = magnitudes.get(&m).map(Tensor::size);
            ensure!(
                mag.as_deref() == Some(&[sb[0]][..]),
                "{}: {m} needs a lora_magnitude_vector of [{}] (use_dora), found {mag:?}",
                path.display(),
                sb[0]
            );
        }
        pairs.insert(m, (ta, tb, crate::lora::scale(alpha, r, meta.use_rslora)));
    }
    if let Some(m) = b.keys().next() {
        bail!("{}: {m} has lora_B but no lora_A", path.display());
    }
    // Temperature scaling folds into the head: score(h) / T is a head with weight W / T.
    let temperature = adapter::read_temperature(dir)?;
    if let Some(t) = temperature {
        let w = full.get_mut("score.weight").with_context(|| {
            format!(
                "{}: a temperature to fold but the adapter has no score head",
                dir.join(crate::calibration::FILE).display()
            )
        })?;
        *w = (w.to_kind(Kind::Float) / t).to_kind(w.kind());
    }
    if let Some(m) = magnitudes.keys().find(|m| !pairs.contains_key(*m)) {
        bail!(
            "{}: {m} has a lora_magnitude_vector but no LoRA pair",
            path.display()
        );
    }
    let residual = match adapter::residual_path(dir, meta.init)? {
        Some(p) => Some(Checkpoint::open_file(&p)?),
        None => None,
    };
    Ok(AdapterTensors {
        pairs,
        magnitudes,
        full,
        temperature,
        init: meta.init,
        residual,
    })
}

/// Where an output tensor comes from.
enum Source {
    /// A checkpoint tensor; `requantize`: a projection the run trained against in NF4.
    Checkpoint { name: String, requantize: bool },
    /// A bitsandbytes 4-bit weight (`name` is its packed `…weight`).
    Bnb { name: String },
    /// An adapter tensor (the head).
    Adapter { name: String },
}

struct Planned {
    out: String,
    source: Source,
    /// The LoRA pair folded in (its module path).
    lora: Option<String>,
    kind: Kind,
    shape: Vec<i64>,
}

impl Planned {
    fn bytes(&self) -> u64 {
        self.shape.iter().product::<i64>() as u64 * self.kind.elt_size_in_bytes() as u64
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double)
}

/// The original shape of a bitsandbytes 4-bit weight, from its quant state JSON.
fn bnb_shape(ck: &Checkpoint, name: &str) -> Result<Vec<i64>> {
    let qs = format!("{name}.quant_state.bitsandbytes__nf4");
    let bytes: Vec<u8> = Vec::try_from(&ck.tensor(&qs)?.flatten(0, -1))
        .with_context(|| format!("tensor {qs}: not bytes"))?;
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("tensor {qs}: the quant state is not JSON"))?;
    v["shape"]
        .as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .with_context(|| format!("tensor {qs}: the quant state has no shape"))
}

struct Merger<'a> {
    ck: Checkpoint,
    adapter: AdapterTensors,
    nf4: Nf4Options,
    model_dir: &'a Path,
}

impl Merger<'_> {
    /// Every tensor of the merged classifier, in transformers' module order.
    fn plan(&self, dtype: Kind, report: &mut MergeReport) -> Result<Vec<Planned>> {
        let ck = &self.ck;
        // A bare `LlamaModel` checkpoint (no `model.` prefix) gets the classifier's prefix.
        let bare = !ck.contains("model.embed_tokens.weight") && ck.contains("embed_tokens.weight");
        let mut names: Vec<&str> = ck.names().collect();
        names.sort();
        let mut plan = Vec::new();
        let mut used = Vec::new();
        for name in names {
            if BNB_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                continue;
            }
            if name.starts_with("lm_head.") {
                report.dropped.push(name.to_string());
                continue;
            }
            let out = if bare && !name.starts_with("score.") {
                format!("model.{name}")
            } else {
                name.to_string()
            };
            if self.adapter.full.contains_key(&out) {
                continue; // the adapter's trained copy replaces it
            }
            let (dt, shape) = ck.info(name)?;
            let bnb = ck.contains(&format!("{name}.quant_state.bitsandbytes__nf4"));
            let (source, kind, shape) = if bnb {
                let shape = bnb_shape(ck, name)?;
                (
                    Source::Bnb {
                        name: name.to_string(),
                    },
                    dtype,
                    shape,
                )
            } else {
                let kind = kind_of(dt).with_context(|| {
                    format!(
                        "tensor {name} in {} has unsupported dtype {dt:?}",
                        self.model_dir.display()
                    )
                })?;
                let requantize = quantize::projection(name).is_some();
                (
                    Source::Checkpoint {
                        name: name.to_string(),
                        requantize,
                    },
                    if is_float(kind) { dtype } else { kind },
                    shape,
                )
            };
            let module = out.strip_suffix(".weight").unwrap_or(&out);
            let lora = match self.adapter.pairs.get(module) {
                Some((a, b, _)) => {
                    let want = [b.size()[0], a.size()[1]];
                    ensure!(
                        shape == want,
                        "tensor {name} in {} has shape {shape:?}; the adapter's LoRA pair for \
                         {module} needs {want:?}",
                        self.model_dir.display()
                    );
                    used.push(module.to_string());
                    Some(module.to_string())
                }
                None => None,
            };
            plan.push(Planned {
                out,
                source,
                lora,
                kind,
                shape,
            });
        }
        if let Some(m) = self.adapter.pairs.keys().find(|m| !used.contains(m)) {
            bail!(
                "the adapter has a LoRA pair for {m}, but the checkpoint in {} has no {m}.weight \
                 (is this the base model the adapter was trained on?)",
                self.model_dir.display()
            );
        }
        for (name, t) in &self.adapter.full {
            plan.push(Planned {
                out: name.clone(),
                source: Source::Adapter { name: name.clone() },
                lora: None,
                kind: dtype,
                shape: t.size(),
            });
        }
        plan.sort_by(|a, b| quantize::module_order(&a.out, &b.out));
        Ok(plan)
    }

    /// The base a PiSSA / LoftQ pair `m` was trained against, in fp32: the adapter's saved
    /// residual, or the init applied again to the checkpoint's weight `name`.
    fn residual_base(&self, m: &str, name: &str, requantize: bool) -> Result<Tensor> {
        let wname = format!("{m}.weight");
        if let Some(res) = &self.adapter.residual {
            if res.contains(&format!("{wname}.absmax")) {
                let prefix = wname.strip_suffix("weight").unwrap_or(&wname);
                let q = Nf4Tensor::from_bnb_tensors(&|k| res.tensor(k).ok(), prefix)
                    .with_context(|| format!("cannot read the residual base {wname}"))?;
                return nf4::dequantize(&q, Kind::Float);
            }
            return Ok(res
                .tensor(&wname)
                .with_context(|| format!("the residual base lacks {wname}"))?
                .to_kind(Kind::Float));
        }
        let (a, _, scale) = &self.adapter.pairs[m];
        let t = self.ck.tensor(name)?;
        ensure!(
            is_float(t.kind()),
            "{name} is bitsandbytes 4-bit: init_lora_weights {} needs the original weights",
            self.adapter.init.peft_value()
        );
        let d = crate::lora_init::decompose(self.adapter.init, &t, a.size()[0], *scale)?;
        Ok(if requantize {
            nf4::dequantize(&nf4::quantize(&d.base, &self.nf4)?, Kind::Float)?
        } else {
            d.base.to_kind(Kind::Float)
        })
    }

    /// The merged tensor, in its output dtype, on the CPU.
    fn tensor(&self, p: &Planned, requantize_projections: bool) -> Result<Tensor> {
        let ck = &self.ck;
        let changed = self.adapter.init.changes_base();
        let w = match &p.source {
            Source::Checkpoint { name, requantize } if changed && p.lora.is_some() => {
                let m = p.lora.as_deref().unwrap_or_default();
                self.residual_base(m, name, *requantize && requantize_projections)?
            }
            Source::Bnb { name } if changed && p.lora.is_some() => {
                let m = p.lora.as_deref().unwrap_or_default();
                self.residual_base(m, name, false)?
            }
            Source::Checkpoint { name, requantize } => {
                let t = ck.tensor(name)?;
                if *requantize && requantize_projections {
                    let q = nf4::quantize(&t, &self.nf4)
                        .with_context(|| format!("cannot quantise tensor {name}"))?;
                    nf4::dequantize(&q, Kind::Float)?
                } else if is_float(t.kind()) {
                    t.to_kind(Kind::Float)
                } else {
                    t
                }
            }
            Source::Bnb { name } => {
                let prefix = name.strip_suffix("weight").unwrap_or(name);
                let q = Nf4Tensor::from_bnb_tensors(&|k| ck.tensor(k).ok(), prefix)
                    .with_context(|| format!("cannot read bitsandbytes 4-bit tensor {name}"))?;
                nf4::dequantize(&q, Kind::Float)?
            }
            Source::Adapter { name } => self.adapter.full[name].to_kind(Kind::Float),
        };
        let w = match &p.lora {
            Some(m) => {
                let (a, b, scale) = &self.adapter.pairs[m];
                match self.adapter.magnitudes.get(m) {
                    Some(mag) => crate::lora::fold_dora(&w, a, b, *scale, mag),
                    None => crate::lora::fold(&w, a, b, *scale),
                }
            }
            None => w,
        };
        Ok(if is_float(w.kind()) {
            w.to_kind(p.kind).contiguous()
        } else {
            w.contiguous()
        })
    }
}

/// Writes one shard: the header (planned from the shapes), then each tensor as it is made.
fn write_shard(path: &Path, merger: &Merger, units: &[&Planned], requantize: bool) -> Result<u64> {
    let entries: Vec<(String, &'static str, Vec<u64>, u64)> = units
        .iter()
        .map(|p| {
            Ok((
                p.out.clone(),
                quantize::kind_name(p.kind)?,
                p.shape.iter().map(|&d| d as u64).collect(),
                p.bytes(),
            ))
        })
        .collect::<Result<_>>()?;
    let mut header = quantize::header(&entries);
    header.push_str(&" ".repeat(header.len().next_multiple_of(8) - header.len()));
    let tmp = runio_tmp(path);
    let file =
        fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let io = |e: std::io::Error| anyhow!(e).context(format!("cannot write {}", tmp.display()));
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut written = 0u64;
    for p in units {
        let t = merger
            .tensor(p, requantize)
            .with_context(|| format!("cannot make tensor {}", p.out))?;
        let n = t.numel() * t.kind().elt_size_in_bytes();
        ensure!(
            n as u64 == p.bytes() && t.size() == p.shape,
            "internal: tensor {} came out {:?} {:?}, planned {:?}",
            p.out,
            t.kind(),
            t.size(),
            p.shape
        );
        // SAFETY: `t` is a contiguous CPU tensor of `n` bytes that outlives this borrow.
        let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
        w.write_all(bytes).map_err(io)?;
        written += n as u64;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(written)
}

fn runio_tmp(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// The base's config.json turned into the classifier's.
fn classifier_config(
    model_dir: &Path,
    labels: &LabelSpec,
    pad_id: i64,
    dtype: Kind,
) -> Result<Value> {
    let path = model_dir.join("config.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?;
    let obj = v
        .as_object_mut()
        .with_context(|| format!("{}: not a JSON object", path.display()))?;
    let model_type = obj
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    // The class the merged model is, whatever the base was saved as (a `ForCausalLM`, or
    // Gemma 3's multimodal class for a `gemma3_text` config).
    let arch =
        Family::from_model_type(&path.display().to_string(), &model_type)?.sequence_classifier();
    obj.remove("quantization_config");
    obj.remove("torch_dtype");
    obj.insert("architectures".into(), json!([arch]));
    obj.insert("dtype".into(), json!(dtype_config_name(dtype)));
    obj.insert("pad_token_id".into(), json!(pad_id));
    if let Value::Object(fields) = labels.config_fields() {
        obj.extend(fields);
    }
    Ok(v)
}

/// Copies the tokenizer and other non-weight files, and names the pad token in
/// `tokenizer_config.json` (the classifier pools at the last non-pad token; pipelines need it
/// to pad a batch).
fn copy_side_files(cfg: &Config, dir: &Path, encoder: &TextEncoder) -> Result<Vec<String>> {
    let mut copied = quantize::copy_model_files(cfg.model_dir()?, dir)?;
    let tok = cfg.tokenizer_dir()?;
    if tok != cfg.model_dir()? {
        for name in quantize::copy_model_files(tok, dir)? {
            if !copied.contains(&name) {
                copied.push(name);
            }
        }
    }
    let tc = dir.join("tokenizer_config.json");
    let mut v: Value = if tc.is_file() {
        serde_json::from_str(&fs::read_to_string(&tc)?)
            .with_context(|| format!("{}: malformed JSON", tc.display()))?
    } else {
        json!({"tokenizer_class": "PreTrainedTokenizerFast"})
    };
    if let Some(o) = v.as_object_mut() {
        if o.get("pad_token").is_none_or(Value::is_null) {
            o.insert("pad_token".into(), json!(encoder.eos_token()));
        }
        if o.get("eos_token").is_none_or(Value::is_null) {
            o.insert("eos_token".into(), json!(encoder.eos_token()));
        }
    }
    runio::write_json(&tc, &v)?;
    Ok(copied)
}

/// Writes the merged full-precision checkpoint into the empty folder `dir`.
fn write_merged(
    cfg: &Config,
    adapter_dir: &Path,
    dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let model_dir = cfg.model_dir()?;
    let mut encoder = TextEncoder::from_dir(cfg.tokenizer_dir()?, None)?;
    crate::loader::use_model_pad_token(model_dir, &mut encoder)?;
    let merger = Merger {
        ck: Checkpoint::open(model_dir)?,
        adapter: read_adapter(adapter_dir)?,
        nf4: Nf4Options {
            blocksize: cfg.bnb_4bit_blocksize,
            double_quant: cfg.bnb_4bit_use_double_quant,
        },
        model_dir,
    };
    let mut report = MergeReport::default();
    let plan = merger.plan(opts.dtype, &mut report)?;
    let num_labels = plan
        .iter()
        .find(|p| p.out == "score.weight")
        .map(|p| p.shape[0])
        .with_context(|| {
            format!(
                "neither the adapter {} nor the checkpoint {} has a score head",
                adapter_dir.display(),
                model_dir.display()
            )
        })?;
    let labels = crate::adapter::labels_for(adapter_dir, num_labels as usize)?;
    report.merged = plan.iter().filter(|p| p.lora.is_some()).count();
    report.temperature = merger.adapter.temperature;
    report.copied = plan.len() - report.merged;
    let shards = quantize::cut_shards(&plan, Planned::bytes, opts.max_shard_bytes);
    report.shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        report.bytes_out += write_shard(&dir.join(&file), &merger, shard, cfg.load_in_4bit)?;
        for p in shard {
            weight_map.insert(p.out.clone(), json!(file));
        }
    }
    runio::write_json(
        &dir.join(INDEX_FILE),
        &json!({"metadata": {"total_size": report.bytes_out}, "weight_map": weight_map}),
    )?;
    copy_side_files(cfg, dir, &encoder)?;
    runio::write_json(
        &dir.join("config.json"),
        &classifier_config(model_dir, &labels, encoder.pad_id(), opts.dtype)?,
    )?;
    Ok(report)
}

/// Merges the adapter in `adapter_dir` into `cfg.model_dir` and writes the result to `out`
/// (see the module comment). With `quantize_nf4` the merged weights are re-quantised and the
/// drift of the predictions from the unmerged model is measured on a sample.
pub fn merge(
    cfg: &Config,
    adapter_dir: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let _g = tch::no_grad_guard();
    let model_dir = cfg.model_dir()?;
    ensure!(opts.max_shard_bytes > 0, "the shard size must be positive");
    quantize::check_out(model_dir, out, opts.force)?;
    let tmp = quantize::sibling(out, "tmp");
    let full = quantize::sibling(out, "full");
    for d in [&tmp, &full] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
    }
    let build = || -> Result<MergeReport> {
        if !opts.quantize_nf4 {
            fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            return write_merged(cfg, adapter_dir, &tmp, opts);
        }
        fs::create_dir_all(&full).with_context(|| format!("cannot create {}", full.display()))?;
        let mut report = write_merged(cfg, adapter_dir, &full, opts)?;
        let q = QuantizeOptions {
            nf4: Nf4Options {
                blocksize: cfg.bnb_4bit_blocksize,
                double_quant: cfg.bnb_4bit_use_double_quant,
            },
            compute_dtype: dtype_config_name(opts.dtype).into(),
            max_shard_bytes: opts.max_shard_bytes,
            ..Default::default()
        };
        let r = quantize::quantize_checkpoint(&full, &tmp, &q)?;
        report.shards = r.shards;
        report.bytes_out = r.bytes_out;
        fs::remove_dir_all(&full).with_context(|| format!("cannot remove {}", full.display()))?;
        report.drift = Some(drift(cfg, adapter_dir, &tmp, opts)?);
        runio::write_json(&tmp.join("merge_drift.json"), &report.drift)?;
        Ok(report)
    };
    let report = match build() {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            let _ = fs::remove_dir_all(&full);
            return Err(e);
        }
    };
    quantize::swap_in(&tmp, out)?;
    Ok(report)
}

/// Up to `opts.sample` rows for the drift sample, rendered and encoded as the adapter's task
/// trained on them: the configured data's split (any format the task reads), or the demo's
/// validation texts.
fn sample_rows(
    cfg: &Config,
    labels: &TaskLabels,
    encoder: &TextEncoder,
    opts: &MergeOptions,
) -> Result<(Vec<Encoded>, String)> {
    let (mut rows, source) = match &cfg.data_dir {
        Some(d) => {
            let data_cfg = Config {
                task: labels.task.name.clone(),
                ..cfg.clone()
            };
            (
                splits::load_split(&data_cfg, labels, encoder, &opts.sample_split, false)?,
                format!("{} ({} split)", d.display(), opts.sample_split),
            )
        }
        None => {
            let text = prompt::resolve_prompt(&cfg.prompt)?;
            let texts: Vec<String> = crate::demo::demo_dataset()
                .1
                .iter()
                .take(opts.sample)
                .map(|ex| prompt::render(&text, ex))
                .collect();
            let rows = encoder
                .encode_many(texts)?
                .into_iter()
                .enumerate()
                .map(|(i, ids)| Encoded {
                    ids,
                    label: None,
                    idx: i as i64,
                    window: 0,
                    rejected: None,
                })
                .collect();
            (
                rows,
                "the demo's validation texts (pass --data_dir for your own)".to_string(),
            )
        }
    };
    rows.truncate(opts.sample);
    ensure!(!rows.is_empty(), "the drift sample from {source} is empty");
    Ok((rows, source))
}

/// Logits `[n, labels]` of `model` on `ids`, in batches of 16.
fn logits_of(model: &LlamaClassifier, ids: &[Encoded], pad: i64, device: Device) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in ids.chunks(16) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = collate(&refs, pad);
        parts.push(model.logits(
            &b.input_ids.to_device(device),
            &b.attention_mask.to_device(device),
        )?);
    }
    Ok(Tensor::cat(&parts, 0).to_device(Device::Cpu))
}

fn drift(cfg: &Config, adapter_dir: &Path, merged: &Path, opts: &MergeOptions) -> Result<Drift> {
    let (unmerged, labels) = loader::load_with_adapter(cfg, adapter_dir)?;
    let (ids, source) = sample_rows(cfg, &labels, &unmerged.encoder, opts)?;
    let pad = unmerged.encoder.pad_id();
    let before = logits_of(&unmerged.model, &ids, pad, unmerged.device)?;
    let mut mo = loader::model_options(cfg, unmerged.device, pad)?;
    drop(unmerged);
    mo.lora = None;
    mo.num_labels = before.size()[1];
    let model = LlamaClassifier::load(merged, &mo)
        .with_context(|| format!("cannot load the merged model {}", merged.display()))?;
    let after = logits_of(&model, &ids, pad, mo.device)?;
    let problem = labels.spec.problem_type;
    let (sb, sa) = (
        labels::scores(&before, problem),
        labels::scores(&after, problem),
    );
    let d = (&sb - &sa).abs();
    let agree = sb
        .argmax(-1, false)
        .eq_tensor(&sa.argmax(-1, false))
        .to_kind(Kind::Double)
        .mean(Kind::Double);
    Ok(Drift {
        examples: ids.len(),
        source,
        max_abs_score_diff: d.max().double_value(&[]),
        mean_abs_score_diff: d.mean(Kind::Double).double_value(&[]),
        max_abs_logit_diff: (&before - &after).abs().max().double_value(&[]),
        top_label_agreement: agree.double_value(&[]),
    })
}
