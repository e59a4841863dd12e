//! `qlora-cls quantize`: writes a bitsandbytes 4-bit (NF4) checkpoint from a 16/32-bit Hugging
//! Face decoder checkpoint (any family of `model::family`), in the form transformers' `save_pretrained` gives a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` (the `*-bnb-4bit`
//! checkpoints): every decoder projection becomes `weight` (packed u8) + `weight.absmax`,
//! `weight.quant_map`, [`weight.nested_absmax`, `weight.nested_quant_map`] and
//! `weight.quant_state.bitsandbytes__nf4`; everything else (embeddings, norms, `lm_head`, a
//! `score` head) is copied in its own dtype, as transformers keeps the output embedding and the
//! last module unquantised. config.json gains transformers' `quantization_config`; tokenizer
//! and generation files are copied.
//!
//! Memory: the output is streamed. Tensors are read one at a time from the memory-mapped input
//! (whose pages are released after each read), quantised, and appended to the open shard file
//! before the next one is read, so the process holds one projection weight and its quantised
//! form at a time; unquantised tensors (embeddings, lm_head) are copied from the mapping in
//! 64 MiB chunks without ever being held whole. A safetensors header must precede the data, but the exact length of each
//! quant-state JSON (it holds the absmax mean) is only known after quantising; the header is
//! therefore planned from upper bounds of every size, the data is written after that reserved
//! room, and the real header is written last, padded with spaces (which the safetensors format
//! allows) to the reserved length.
//!
//! Atomicity: the output folder is assembled under a temporary sibling name (each file itself
//! written to a temporary name, synced and renamed) and renamed into place at the end, so an
//! interrupted run leaves no half-written checkpoint at `out`.
//!
//! Why one file: one command that reads top to bottom (plan the shards, quantize tensor by
//! tensor, write, record transformers' `quantization_config`), as the reference does it.
use crate::model::checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::model::hf_config::{LlamaConfig, FUSED_LINEARS, SEPARATE_LINEARS};
use crate::quant::nf4::{self, Nf4Options, BLOCKSIZES, NESTED_BLOCKSIZE};
use crate::runio;
use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// transformers' `max_shard_size="2GB"` (decimal, as huggingface_hub parses it).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;

#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeOptions {
    /// Block size and double quantisation (`bnb_4bit_use_double_quant`).
    pub nf4: Nf4Options,
    /// `bnb_4bit_compute_dtype` recorded in config.json: float32, bfloat16 or float16.
    pub compute_dtype: String,
    /// `bnb_4bit_quant_storage`; only uint8 is written.
    pub quant_storage: String,
    /// Shards are cut so that none exceeds this many bytes (a single larger tensor gets a
    /// shard of its own, as in transformers).
    pub max_shard_bytes: u64,
    /// Replace a non-empty `out` folder.
    pub force: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            nf4: Nf4Options::default(),
            compute_dtype: "bfloat16".into(),
            quant_storage: "uint8".into(),
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            force: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizeReport {
    /// Linear weights written in 4 bits.
    pub quantized: usize,
    /// Tensors copied as they are.
    pub copied: usize,
    /// safetensors files written.
    pub shards: usize,
    /// Bytes of tensor data read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Other files copied from the model folder (tokenizer, generation config, ...).
    pub files_copied: Vec<String>,
}

/// transformers' `BitsAndBytesConfig.to_dict()` for this quantisation, as `save_pretrained`
/// writes it. The block size is not part of it: each weight's quant state records its own.
pub fn quantization_config(opts: &QuantizeOptions) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": opts.compute_dtype,
        "bnb_4bit_quant_storage": opts.quant_storage,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": opts.nf4.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn validate(opts: &QuantizeOptions) -> Result<()> {
    ensure!(
        BLOCKSIZES.contains(&opts.nf4.blocksize),
        "--bnb_4bit_blocksize {} is not one bitsandbytes supports ({BLOCKSIZES:?})",
        opts.nf4.blocksize
    );
    ensure!(
        ["float32", "bfloat16", "float16"].contains(&opts.compute_dtype.as_str()),
        "--bnb_4bit_compute_dtype {:?}: expected float32, bfloat16 or float16",
        opts.compute_dtype
    );
    ensure!(
        opts.quant_storage == "uint8",
        "--bnb_4bit_quant_storage {:?}: only uint8 is supported",
        opts.quant_storage
    );
    ensure!(opts.max_shard_bytes > 0, "the shard size must be positive");
    Ok(())
}

/// One output tensor as the header plans it: exact, or an upper bound for the quant state.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    bytes: u64,
}

/// One input tensor and what it becomes.
struct Unit {
    name: String,
    quantize: bool,
    entries: Vec<Entry>,
}

impl Unit {
    fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }
}

fn dtype_name(d: Dtype) -> Result<&'static str> {
    Ok(match d {
        Dtype::F32 => "F32",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
        Dtype::F64 => "F64",
        Dtype::U8 => "U8",
        Dtype::I8 => "I8",
        Dtype::I16 => "I16",
        Dtype::I32 => "I32",
        Dtype::I64 => "I64",
        Dtype::BOOL => "BOOL",
        d => bail!("dtype {d:?} is not supported"),
    })
}

pub(crate) fn kind_name(k: Kind) -> Result<&'static str> {
    Ok(match k {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Uint8 => "U8",
        Kind::Int8 => "I8",
        Kind::Int16 => "I16",
        Kind::Int => "I32",
        Kind::Int64 => "I64",
        Kind::Bool => "BOOL",
        k => bail!("cannot store a {k:?} tensor"),
    })
}

fn elt_size(d: Dtype) -> u64 {
    (d.bitsize() / 8) as u64
}

/// The decoder projection a tensor name belongs to (`q_proj`, ...), if any.
pub(crate) fn projection(name: &str) -> Option<&'static str> {
    if !name.contains("layers.") {
        return None;
    }
    SEPARATE_LINEARS
        .iter()
        .chain(&FUSED_LINEARS)
        .find(|(group, proj)| name.ends_with(&format!(".{group}.{proj}.weight")))
        .map(|(_, proj)| *proj)
}

/// transformers' module order: embeddings, layers by number, final norm, then the heads.
pub(crate) fn module_order(a: &str, b: &str) -> Ordering {
    let rank = |n: &str| u8::from(n.starts_with("lm_head") || n.starts_with("score"));
    rank(a).cmp(&rank(b)).then_with(|| {
        let mut x = a.split('.');
        let mut y = b.split('.');
        loop {
            match (x.next(), y.next()) {
                (None, None) => return Ordering::Equal,
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(p), Some(q)) => {
                    let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                        (Ok(i), Ok(j)) => i.cmp(&j),
                        _ => p.cmp(q),
                    };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
            }
        }
    })
}

/// Longest `repr()` of a Python float (e.g. `-1.1754943508222875e-38`), for the header bound.
const MAX_FLOAT_REPR: u64 = 24;

fn plan_unit(ck: &Checkpoint, cfg: &LlamaConfig, name: &str, opts: &Nf4Options) -> Result<Unit> {
    let (dtype, shape) = ck.info(name)?;
    let place = || match ck.file_of(name) {
        Some(p) => format!("tensor {name} in {}", p.display()),
        None => format!("tensor {name}"),
    };
    let Some(proj) = projection(name) else {
        let shape_u: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let bytes = shape_u.iter().product::<u64>() * elt_size(dtype);
        return Ok(Unit {
            name: name.to_string(),
            quantize: false,
            entries: vec![Entry {
                name: name.to_string(),
                dtype: dtype_name(dtype).with_context(place)?,
                shape: shape_u,
                bytes,
            }],
        });
    };
    ensure!(
        matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32),
        "{} has dtype {dtype:?}; only BF16, F16 and F32 weights can be quantised",
        place()
    );
    let (inp, out) = cfg.linear_shape(proj).ok_or_else(|| {
        anyhow!(
            "{} is a {proj}, which model_type {} does not have",
            place(),
            cfg.switches.family.model_type()
        )
    })?;
    ensure!(
        shape == [out, inp],
        "{} has shape {shape:?}, which does not fit config.json (expected {:?})",
        place(),
        [out, inp]
    );
    let n = (out * inp) as u64;
    let blocks = n.div_ceil(opts.blocksize as u64);
    let prefix = name
        .strip_suffix("weight")
        .expect("projection names end in weight");
    let e = |suffix: &str, dtype: &'static str, shape: Vec<u64>, bytes: u64| Entry {
        name: format!("{prefix}weight{suffix}"),
        dtype,
        shape,
        bytes,
    };
    let mut entries = vec![e("", "U8", vec![n.div_ceil(2), 1], n.div_ceil(2))];
    if opts.double_quant {
        let nested = blocks.div_ceil(NESTED_BLOCKSIZE as u64);
        entries.push(e(".absmax", "U8", vec![blocks], blocks));
        entries.push(e(".quant_map", "F32", vec![16], 64));
        entries.push(e(".nested_absmax", "F32", vec![nested], 4 * nested));
        entries.push(e(".nested_quant_map", "F32", vec![256], 1024));
    } else {
        entries.push(e(".absmax", "F32", vec![blocks], 4 * blocks));
        entries.push(e(".quant_map", "F32", vec![16], 64));
    }
    // The quant state JSON (see `Nf4Tensor::to_bnb_tensors`); only the offset's digits vary.
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut json_len = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]}}",
        opts.blocksize,
        match dtype {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            _ => "float32",
        },
        dims.join(", ")
    )
    .len() as u64;
    if opts.double_quant {
        json_len += format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \
             \"nested_offset\": "
        )
        .len() as u64
            + MAX_FLOAT_REPR;
    }
    entries.push(e(
        ".quant_state.bitsandbytes__nf4",
        "U8",
        vec![json_len],
        json_len,
    ));
    Ok(Unit {
        name: name.to_string(),
        quantize: true,
        entries,
    })
}

/// A safetensors header (`__metadata__` first, then the tensors in data order), without padding.
pub(crate) fn header(entries: &[(String, &'static str, Vec<u64>, u64)]) -> String {
    let mut h = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in entries {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            ",{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(name).expect("a string serialises"),
            dims.join(","),
            offset + bytes
        ));
        offset += bytes;
    }
    h.push('}');
    h
}

/// The input shards mapped once more, to copy unquantised tensors straight from the file in
/// chunks (whose pages are released as soon as they are written) instead of through a tensor:
/// an 8B model's embeddings and lm_head are 1 GB each.
#[derive(Default)]
struct RawShards {
    maps: HashMap<PathBuf, Mmap>,
}

impl RawShards {
    fn copy(&mut self, ck: &Checkpoint, name: &str, w: &mut impl Write) -> Result<u64> {
        let path = ck
            .file_of(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing from the checkpoint"))?;
        if !self.maps.contains_key(path) {
            let file =
                fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only mapping of a file we do not expect to change while we run
            // (the same assumption `Checkpoint` makes).
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            self.maps.insert(path.to_path_buf(), map);
        }
        let map = &self.maps[path];
        let st = SafeTensors::deserialize(map).map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
        let data = st
            .tensor(name)
            .map_err(|e| anyhow!("tensor {name} in {}: {e:?}", path.display()))?
            .data();
        const CHUNK: usize = 64 << 20;
        for chunk in data.chunks(CHUNK) {
            w.write_all(chunk)?;
            let offset = chunk.as_ptr() as usize - map.as_ptr() as usize;
            // SAFETY: DONTNEED on a read-only file mapping only drops our copy of the pages;
            // reading them again faults the same bytes back in from the file.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, chunk.len())
            };
        }
        Ok(data.len() as u64)
    }
}

/// Writes one shard: data after the header room planned from upper bounds, then the real
/// header. Returns (tensor name, bytes) of what was written, and the bytes read.
fn write_shard(
    path: &Path,
    ck: &Checkpoint,
    units: &[&Unit],
    opts: &Nf4Options,
) -> Result<(Vec<(String, u64)>, u64)> {
    let planned: Vec<_> = units
        .iter()
        .flat_map(|u| u.entries.iter())
        .map(|e| (e.name.clone(), e.dtype, e.shape.clone(), e.bytes))
        .collect();
    let room = (header(&planned).len() as u64).next_multiple_of(8);
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let file =
        fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| anyhow!(e).context(format!("cannot write {}", tmp.display()));
    w.seek(SeekFrom::Start(8 + room)).map_err(io)?;
    let mut written = Vec::new();
    let mut bytes_in = 0u64;
    let mut raw = RawShards::default();
    for unit in units {
        if !unit.quantize {
            let n = raw.copy(ck, &unit.name, &mut w).map_err(|e| {
                e.context(format!(
                    "cannot copy tensor {} to {}",
                    unit.name,
                    tmp.display()
                ))
            })?;
            let e = &unit.entries[0];
            ensure!(
                n == e.bytes,
                "internal: tensor {} has {n} bytes, {} planned",
                unit.name,
                e.bytes
            );
            bytes_in += n;
            written.push((e.name.clone(), e.dtype, e.shape.clone(), n));
            continue;
        }
        let src = ck.tensor(&unit.name)?;
        bytes_in += (src.numel() * src.kind().elt_size_in_bytes()) as u64;
        let prefix = unit.name.strip_suffix("weight").expect("checked in plan");
        let tensors = nf4::quantize(&src, opts)
            .and_then(|q| q.to_bnb_tensors(prefix))
            .with_context(|| format!("cannot quantise tensor {}", unit.name))?;
        drop(src);
        drop_check(&tensors, &unit.entries)?;
        for ((name, t), e) in tensors.iter().zip(&unit.entries) {
            let t = t.contiguous();
            let n = t.numel() * t.kind().elt_size_in_bytes();
            // SAFETY: `t` is a contiguous CPU tensor of `n` bytes that outlives this borrow.
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
            w.write_all(bytes).map_err(io)?;
            written.push((
                name.clone(),
                e.dtype,
                t.size().iter().map(|&d| d as u64).collect::<Vec<_>>(),
                n as u64,
            ));
        }
    }
    let mut h = header(&written);
    ensure!(
        h.len() as u64 <= room,
        "internal: safetensors header of {} outgrew its planned {room} bytes",
        path.display()
    );
    h.push_str(&" ".repeat(room as usize - h.len()));
    w.seek(SeekFrom::Start(0)).map_err(io)?;
    w.write_all(&room.to_le_bytes()).map_err(io)?;
    w.write_all(h.as_bytes()).map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    Ok((
        written.into_iter().map(|(n, _, _, b)| (n, b)).collect(),
        bytes_in,
    ))
}

/// The tensors made for a unit must be the planned ones, none larger than planned.
fn drop_check(tensors: &[(String, Tensor)], entries: &[Entry]) -> Result<()> {
    ensure!(
        tensors.len() == entries.len(),
        "internal: {} tensors made for {}, {} planned",
        tensors.len(),
        entries[0].name,
        entries.len()
    );
    for ((name, t), e) in tensors.iter().zip(entries) {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        ensure!(
            *name == e.name && kind_name(t.kind())? == e.dtype && bytes <= e.bytes,
            "internal: tensor {name} ({:?}, {bytes} bytes) does not fit the plan ({}, {}, {} bytes)",
            t.kind(),
            e.name,
            e.dtype,
            e.bytes
        );
    }
    Ok(())
}

/// Files that hold weights (ours replace them) or are not part of a model folder.
pub(crate) fn is_weight_file(name: &str) -> bool {
    name == "config.json"
        || name.starts_with('.')
        || [
            ".safetensors",
            ".safetensors.index.json",
            ".bin",
            ".bin.index.json",
            ".pt",
            ".pth",
            ".ckpt",
            ".h5",
            ".msgpack",
            ".gguf",
            ".onnx",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
}

pub(crate) fn check_out(model_dir: &Path, out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    ensure!(
        out.is_dir(),
        "{} exists and is not a folder; choose another --out",
        out.display()
    );
    let same = match (fs::canonicalize(model_dir), fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b || a.starts_with(&b),
        _ => false,
    };
    ensure!(
        !same,
        "--out {} would replace the model folder {} itself",
        out.display(),
        model_dir.display()
    );
    let non_empty = fs::read_dir(out)
        .with_context(|| format!("cannot list {}", out.display()))?
        .next()
        .is_some();
    if non_empty && !force {
        bail!(
            "output folder {} exists and is not empty; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

pub(crate) fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Writes a bitsandbytes 4-bit checkpoint of the bf16/fp16/fp32 Llama checkpoint in
/// `model_dir` to the folder `out` (see the module comment for the layout and memory use).
pub fn quantize_checkpoint(
    model_dir: &Path,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    let _g = tch::no_grad_guard();
    validate(opts)?;
    ensure!(
        model_dir.is_dir(),
        "model folder {} does not exist",
        model_dir.display()
    );
    let cfg_path = model_dir.join("config.json");
    ensure!(
        cfg_path.is_file(),
        "{} not found: {} is not a Hugging Face model folder",
        cfg_path.display(),
        model_dir.display()
    );
    let cfg = LlamaConfig::from_dir(model_dir)?;
    ensure!(
        cfg.quantization.is_none(),
        "{} already has a quantization_config: the checkpoint is quantised already",
        cfg_path.display()
    );
    let text = fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let mut config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", cfg_path.display()))?;
    check_out(model_dir, out, opts.force)?;

    let ck = Checkpoint::open(model_dir)?;
    let mut names: Vec<&str> = ck.names().collect();
    if let Some(n) = names
        .iter()
        .find(|n| n.ends_with(".absmax") || n.contains("SCB"))
    {
        bail!(
            "{} holds tensor {n}: the checkpoint is quantised already",
            model_dir.display()
        );
    }
    names.sort_by(|a, b| module_order(a, b));
    let units = names
        .iter()
        .map(|n| plan_unit(&ck, &cfg, n, &opts.nf4))
        .collect::<Result<Vec<_>>>()?;
    let quantized = units.iter().filter(|u| u.quantize).count();
    let per_layer = cfg.linear_modules().len() as i64;
    ensure!(
        quantized as i64 == per_layer * cfg.num_hidden_layers,
        "{} holds {quantized} decoder projections; config.json's {} layers need {}",
        model_dir.display(),
        cfg.num_hidden_layers,
        per_layer * cfg.num_hidden_layers
    );
    let shards = cut_shards(&units, Unit::bytes, opts.max_shard_bytes);

    let tmp = sibling(out, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut build = || -> Result<QuantizeReport> {
        let mut report = QuantizeReport {
            quantized,
            copied: units.len() - quantized,
            shards: shards.len(),
            ..Default::default()
        };
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = if shards.len() == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
            };
            let (written, read) = write_shard(&tmp.join(&file), &ck, shard, &opts.nf4)?;
            report.bytes_in += read;
            for (name, bytes) in written {
                report.bytes_out += bytes;
                weight_map.insert(name, Value::String(file.clone()));
            }
        }
        if shards.len() > 1 {
            runio::write_json(
                &tmp.join(INDEX_FILE),
                &json!({"metadata": {"total_size": report.bytes_out}, "weight_map": weight_map}),
            )?;
        }
        config
            .as_object_mut()
            .ok_or_else(|| anyhow!("{}: not a JSON object", cfg_path.display()))?
            .insert("quantization_config".into(), quantization_config(opts));
        runio::write_json(&tmp.join("config.json"), &config)?;
        report.files_copied = copy_model_files(model_dir, &tmp)?;
        Ok(report)
    };
    let report = match build() {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    swap_in(&tmp, out)?;
    Ok(report)
}

/// Swaps the finished folder `tmp` in at `out`; an existing (empty or --force) one is moved
/// aside first and removed once the new one is in place.
pub(crate) fn swap_in(tmp: &Path, out: &Path) -> Result<()> {
    let old = sibling(out, "old");
    let had_old = out.exists();
    if had_old {
        fs::rename(out, &old)
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
    }
    if let Err(e) = fs::rename(tmp, out) {
        if had_old {
            let _ = fs::rename(&old, out);
        }
        return Err(e).with_context(|| {
            format!(
                "cannot rename {} to {} (the result stays in the former)",
                tmp.display(),
                out.display()
            )
        });
    }
    if had_old {
        fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the replaced folder {}", old.display()))?;
    }
    Ok(())
}

/// huggingface_hub's rule: a new shard starts when the next tensor would overflow this one
/// (a tensor larger than `max_bytes` gets a shard of its own).
pub(crate) fn cut_shards<T>(
    items: &[T],
    bytes: impl Fn(&T) -> u64,
    max_bytes: u64,
) -> Vec<Vec<&T>> {
    let mut shards: Vec<Vec<&T>> = vec![Vec::new()];
    let mut size = 0u64;
    for item in items {
        let last = shards.last_mut().expect("one shard at least");
        if !last.is_empty() && size + bytes(item) > max_bytes {
            shards.push(vec![item]);
            size = bytes(item);
        } else {
            last.push(item);
            size += bytes(item);
        }
    }
    shards
}

/// Copies the files of a model folder that are neither weights nor config.json (tokenizer,
/// generation config, ...) into `dst`; returns their names.
pub(crate) fn copy_model_files(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("cannot list {}", src.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", src.display()))?;
    entries.sort_by_key(|e| e.file_name());
    let mut copied = Vec::new();
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().is_file() || is_weight_file(&name) {
            continue;
        }
        let bytes =
            fs::read(e.path()).with_context(|| format!("cannot read {}", e.path().display()))?;
        runio::write_atomic(&dst.join(&name), &bytes)?;
        copied.push(name);
    }
    Ok(copied)
}
