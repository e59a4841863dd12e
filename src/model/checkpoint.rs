//! Hugging Face safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped. Tensors are read one at a time; each frozen
//! linear weight is moved to the target device and quantised there before the next one is
//! read, so neither the host nor the device ever holds the whole model in 16 or 32 bits.
//! `lm_head` is never read. bitsandbytes 4-bit checkpoints (weight + absmax + quant state)
//! are accepted as they are.
use crate::lora::{LoraConfig, LoraInit};
use crate::lora_init;
use crate::model::hf_config::LlamaConfig;
use crate::quant::nf4::{self, Nf4Options, Nf4Tensor};
use crate::quant::qlinear::FrozenWeight;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// The tensors of a checkpoint folder, memory-mapped.
pub struct Checkpoint {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the file is opened read-only and is not expected to change while mapped;
    // a checkpoint rewritten under a running job is outside what we can defend against.
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))
}

/// The libtorch kind of a safetensors dtype (None for the ones libtorch lacks).
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`, and
    /// validates every shard's header against its file size.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: key `weight_map` is missing", index_path.display()))?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map entry {name} is not a file name",
                        index_path.display()
                    )
                })?;
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .push(name.clone());
            }
            for (file, names) in by_file {
                let path = dir.join(&file);
                if !path.exists() {
                    bail!(
                        "shard {} listed in {} is missing (it holds {} tensors, e.g. {})",
                        path.display(),
                        index_path.display(),
                        names.len(),
                        names[0]
                    );
                }
                let shard = Self::open_shard(&path)?;
                let st = SafeTensors::deserialize(&shard.map).expect("validated in open_shard");
                for name in names {
                    if st.tensor(&name).is_err() {
                        bail!(
                            "tensor {name} is listed in {} but missing from shard {}",
                            index_path.display(),
                            path.display()
                        );
                    }
                    index.insert(name, shards.len());
                }
                shards.push(shard);
            }
        } else if single.exists() {
            let shard = Self::open_shard(&single)?;
            let st = SafeTensors::deserialize(&shard.map).expect("validated in open_shard");
            for name in st.names() {
                index.insert(name.to_string(), 0);
            }
            shards.push(shard);
        } else {
            bail!(
                "no checkpoint in {}: neither {SINGLE_FILE} nor {INDEX_FILE} exists",
                dir.display()
            );
        }
        Ok(Checkpoint { shards, index })
    }

    /// Opens one safetensors file (an adapter's residual base).
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = Self::open_shard(path)?;
        let st = SafeTensors::deserialize(&shard.map).expect("validated in open_shard");
        let index = st.names().into_iter().map(|n| (n.to_string(), 0)).collect();
        Ok(Checkpoint {
            shards: vec![shard],
            index,
        })
    }

    fn open_shard(path: &Path) -> Result<Shard> {
        let map = map_file(path)?;
        SafeTensors::deserialize(&map).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file ({e:?}); truncated or corrupt?",
                path.display()
            )
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].path.as_path())
    }

    /// (dtype, shape) from the header, without reading the data.
    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<i64>)> {
        let (st, _) = self.view(name)?;
        let t = st
            .tensor(name)
            .map_err(|e| anyhow!("tensor {name}: {e:?}"))?;
        Ok((t.dtype(), t.shape().iter().map(|&d| d as i64).collect()))
    }

    fn view(&self, name: &str) -> Result<(SafeTensors<'_>, &Path)> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing from the checkpoint"))?;
        let shard = &self.shards[i];
        let st = SafeTensors::deserialize(&shard.map)
            .map_err(|e| anyhow!("{}: {e:?}", shard.path.display()))?;
        Ok((st, shard.path.as_path()))
    }

    /// Copies one tensor out of the mapping into a CPU tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (st, path) = self.view(name)?;
        let view = st
            .tensor(name)
            .map_err(|e| anyhow!("tensor {name} in {}: {e:?}", path.display()))?;
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            anyhow!(
                "tensor {name} in {} has unsupported dtype {:?}",
                path.display(),
                view.dtype()
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("cannot read tensor {name} from {}", path.display()))?;
        // The bytes are copied: hand the mapped pages back, or every tensor read stays
        // resident and loading an 8B model costs its whole 16 GB of RAM.
        let map = &self.shards[self.index[name]].map;
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        let len = view.data().len();
        // SAFETY: DONTNEED on a read-only file mapping only drops this process's copy of the
        // pages; a later read faults them in again from the file with the same bytes.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
        Ok(t)
    }
}

/// The frozen weights of one decoder layer.
pub struct LayerWeights {
    /// Norm weights by module path (`input_layernorm`, `self_attn.q_norm`, ...).
    pub norms: Vec<(&'static str, Tensor)>,
    /// Projections by name (`q_proj`, ... or Phi-3's `qkv_proj`, ...), with their biases
    /// and, under PiSSA or LoftQ, the adapter's starting A, B (the weight is then the
    /// residual).
    pub linears: Vec<Linear>,
}

pub struct Linear {
    pub name: &'static str,
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub init: Option<(Tensor, Tensor)>,
}

pub struct BaseWeights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `score.weight` when the checkpoint is already a sequence classifier with this many labels.
    pub score: Option<Tensor>,
}

/// A layer's norms (module path, length) for `cfg`'s family.
pub fn norm_names(cfg: &LlamaConfig) -> Vec<(&'static str, i64)> {
    let h = cfg.hidden_size;
    let sw = &cfg.switches;
    let mut v = vec![("input_layernorm", h), ("post_attention_layernorm", h)];
    if sw.sandwich_norms {
        v.push(("pre_feedforward_layernorm", h));
        v.push(("post_feedforward_layernorm", h));
    }
    if sw.qk_norm {
        v.push(("self_attn.q_norm", cfg.head_dim));
        v.push(("self_attn.k_norm", cfg.head_dim));
    }
    v
}

/// Whether the projection `name` carries a bias in `cfg`'s family.
pub fn has_bias(cfg: &LlamaConfig, name: &str) -> bool {
    let sw = &cfg.switches;
    match name {
        "q_proj" | "k_proj" | "v_proj" | "qkv_proj" => sw.qkv_bias,
        "o_proj" => sw.o_bias,
        _ => false,
    }
}

pub struct LoadOptions {
    pub device: Device,
    pub compute_dtype: Kind,
    pub quant: Option<Nf4Options>,
    pub num_labels: i64,
    /// The LoRA options: a base-changing init (PiSSA, LoftQ) is applied to each adapted
    /// weight as it is read, before quantisation.
    pub lora: Option<LoraConfig>,
    /// A trained adapter's residual base (`residual_base.safetensors`): the adapted
    /// modules' weights are read from it instead of being computed again.
    pub residual: Option<PathBuf>,
}

struct Loader<'a> {
    ck: &'a Checkpoint,
    cfg: &'a LlamaConfig,
    opts: &'a LoadOptions,
    prefix: &'static str,
    bnb: bool,
}

impl Loader<'_> {
    fn where_(&self, name: &str) -> String {
        match self.ck.file_of(name) {
            Some(p) => format!("tensor {name} in {}", p.display()),
            None => format!("tensor {name}"),
        }
    }

    /// A float tensor of the expected shape, still on the host in its file dtype.
    fn float(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let (dtype, got) = self
            .ck
            .info(name)
            .with_context(|| format!("checkpoint lacks tensor {name} needed by config.json"))?;
        if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            bail!(
                "{} has dtype {dtype:?}; expected F32, BF16 or F16",
                self.where_(name)
            );
        }
        if got != shape {
            bail!(
                "{} has shape {got:?}, which does not fit config.json (expected {shape:?})",
                self.where_(name)
            );
        }
        self.ck.tensor(name)
    }

    fn dense(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        Ok(self
            .float(name, shape)?
            .to_device(self.opts.device)
            .to_kind(self.opts.compute_dtype))
    }

    fn linear(&self, name: &str, out: i64, inp: i64) -> Result<FrozenWeight> {
        if self.bnb {
            let get = |k: &str| -> Option<Tensor> {
                self.ck
                    .tensor(k)
                    .ok()
                    .map(|t| t.to_device(self.opts.device))
            };
            // bitsandbytes' tensors sit beside the weight: `<module>.weight`, `<module>.weight.absmax`, ...
            let prefix = name.strip_suffix("weight").unwrap_or(name);
            let q = Nf4Tensor::from_bnb_tensors(&get, prefix)
                .with_context(|| format!("cannot read bitsandbytes 4-bit {}", self.where_(name)))?;
            if q.shape != [out, inp] {
                bail!(
                    "{} has shape {:?}, which does not fit config.json (expected {:?})",
                    self.where_(name),
                    q.shape,
                    [out, inp]
                );
            }
            return Ok(match self.opts.quant {
                Some(_) => FrozenWeight::Nf4(q),
                None => FrozenWeight::Dense(nf4::dequantize(&q, self.opts.compute_dtype)?),
            });
        }
        let w = self.float(name, &[out, inp])?.to_device(self.opts.device);
        self.frozen(w, name)
    }

    /// `w` (file dtype, on the device) as the frozen weight: NF4 or the compute dtype.
    fn frozen(&self, w: Tensor, name: &str) -> Result<FrozenWeight> {
        Ok(match &self.opts.quant {
            Some(q) => FrozenWeight::Nf4(
                nf4::quantize(&w, q)
                    .with_context(|| format!("cannot quantise {}", self.where_(name)))?,
            ),
            None => FrozenWeight::Dense(w.to_kind(self.opts.compute_dtype)),
        })
    }

    /// PiSSA / LoftQ on the checkpoint's weight `name`: the residual as the frozen weight,
    /// and the adapter's starting A, B.
    fn decomposed(
        &self,
        name: &str,
        out: i64,
        inp: i64,
        (init, r, scale): (LoraInit, i64, f64),
    ) -> Result<(FrozenWeight, (Tensor, Tensor))> {
        if self.bnb {
            bail!(
                "init_lora_weights {} needs the 16/32-bit weights, but {} is bitsandbytes \
                 4-bit (PEFT refuses it too); point model_dir at the original checkpoint",
                init.peft_value(),
                self.where_(name)
            );
        }
        let w = self.float(name, &[out, inp])?.to_device(self.opts.device);
        let d = lora_init::decompose(init, &w, r, scale).with_context(|| {
            format!(
                "init_lora_weights {} on {}",
                init.peft_value(),
                self.where_(name)
            )
        })?;
        Ok((self.frozen(d.base, name)?, (d.a, d.b)))
    }
}

/// Loads the frozen base model (no `lm_head`) for `cfg` from `dir`.
pub fn load_base(dir: &Path, cfg: &LlamaConfig, opts: &LoadOptions) -> Result<BaseWeights> {
    let _g = tch::no_grad_guard();
    let ck = Checkpoint::open(dir)?;
    let prefix = if ck.contains("model.embed_tokens.weight") {
        "model."
    } else if ck.contains("embed_tokens.weight") {
        ""
    } else {
        bail!(
            "checkpoint in {} lacks tensor model.embed_tokens.weight",
            dir.display()
        );
    };
    let (first_group, first_name) = cfg.linear_modules()[0];
    let bnb = cfg.quantization.is_some()
        || ck.contains(&format!(
            "{prefix}layers.0.{first_group}.{first_name}.weight.absmax"
        ));
    let l = Loader {
        ck: &ck,
        cfg,
        opts,
        prefix,
        bnb,
    };
    let residual_ck = match &opts.residual {
        Some(p) => Some(Checkpoint::open_file(p)?),
        None => None,
    };
    let residual = residual_ck.as_ref().map(|rck| Loader {
        ck: rck,
        cfg,
        opts,
        prefix: "model.",
        bnb: rck.names().any(|n| n.ends_with(".weight.absmax")),
    });
    // Modules whose frozen weight the init changes, with their (init, r, scale).
    let changed = |i: i64, group: &str, name: &str| {
        let lora = opts.lora.as_ref().filter(|l| l.init.changes_base())?;
        let key = format!("model.layers.{i}.{group}.{name}");
        let (r, alpha) = lora.for_module(i as usize, &key, name)?;
        Some((lora.init, r, crate::lora::scale(alpha, r, lora.use_rslora)))
    };
    let h = cfg.hidden_size;
    let embed_tokens = l.dense(
        &format!("{prefix}embed_tokens.weight"),
        &[cfg.vocab_size, h],
    )?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("{}layers.{i}", l.prefix);
        let mut linears = Vec::with_capacity(7);
        for &(group, name) in l.cfg.linear_modules() {
            let (inp, out) = l.cfg.linear_shape(name).expect("known projection");
            let file_name = format!("{p}.{group}.{name}.weight");
            let (w, init) = match (changed(i, group, name), &residual) {
                (Some(_), Some(res)) => (
                    res.linear(&format!("model.layers.{i}.{group}.{name}.weight"), out, inp)?,
                    None,
                ),
                (Some(how), None) => {
                    let (w, ab) = l.decomposed(&file_name, out, inp, how)?;
                    (w, Some(ab))
                }
                (None, _) => (l.linear(&file_name, out, inp)?, None),
            };
            let bias = if has_bias(cfg, name) {
                Some(l.dense(&format!("{p}.{group}.{name}.bias"), &[out])?)
            } else {
                None
            };
            linears.push(Linear {
                name,
                weight: w,
                bias,
                init,
            });
        }
        let norms = norm_names(cfg)
            .into_iter()
            .map(|(name, n)| Ok((name, l.dense(&format!("{p}.{name}.weight"), &[n])?)))
            .collect::<Result<Vec<_>>>()?;
        layers.push(LayerWeights { norms, linears });
    }
    let norm = l.dense(&format!("{prefix}norm.weight"), &[h])?;
    let score = if ck.contains("score.weight") {
        Some(
            l.float("score.weight", &[opts.num_labels, h])?
                .to_kind(Kind::Float)
                .to_device(opts.device),
        )
    } else {
        None
    };
    Ok(BaseWeights {
        embed_tokens,
        layers,
        norm,
        score,
    })
}
