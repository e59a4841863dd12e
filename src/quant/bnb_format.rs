//! bitsandbytes' on-disk form of an NF4 weight, as transformers saves a 4-bit checkpoint:
//! `weight` (packed), `weight.absmax`, the nested `weight.nested_absmax` /
//! `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4` (the JSON of the
//! quant state), read and written byte for byte.
use super::format::{check_blocksize, Absmax, Nf4Tensor, NF4_CODE};
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        other => bail!("no bitsandbytes dtype name for {other:?}"),
    })
}

fn dtype_from_name(name: &str) -> Result<Kind> {
    Ok(match name {
        "float32" => Kind::Float,
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        "float64" => Kind::Double,
        other => bail!("unsupported bitsandbytes dtype {other:?}"),
    })
}

/// `repr(float)` of Python, which `json.dumps` uses: shortest round-trip digits, positional
/// for exponents in [-4, 16), else `d.ddde±XX`.
fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits, e.g. "-2.5e-7".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

impl Nf4Tensor {
    /// The JSON bitsandbytes packs into `weight.quant_state.bitsandbytes__nf4`
    /// (`json.dumps` of the non-tensor items of `QuantState.as_dict()`).
    fn quant_state_json(&self) -> Result<String> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.blocksize,
            dtype_name(self.dtype)?,
            shape.join(", ")
        );
        if let Absmax::Nested {
            offset,
            nested_blocksize,
            ..
        } = &self.absmax
        {
            s.push_str(&format!(
                ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \
                 \"nested_offset\": {}",
                python_float_repr(f64::from(*offset))
            ));
        }
        s.push('}');
        Ok(s)
    }

    /// The tensors transformers writes for a bitsandbytes 4-bit `Linear4bit` weight
    /// (`Params4bit` data plus `QuantState.as_dict(packed=True)`), in that order:
    /// `<prefix>weight` (u8 `[(n+1)/2, 1]`), `<prefix>weight.absmax` (u8 when nested, else
    /// f32), `<prefix>weight.quant_map` (f32 `[16]`), with double quantization
    /// `<prefix>weight.nested_absmax` and `<prefix>weight.nested_quant_map` (f32 `[256]`),
    /// and `<prefix>weight.quant_state.bitsandbytes__nf4` (u8 JSON bytes, on the CPU).
    pub fn to_bnb_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.validate()?;
        self.scales()?;
        let device = self.device();
        let name = |suffix: &str| format!("{prefix}weight{suffix}");
        let code = Tensor::from_slice(&NF4_CODE).to_device(device);
        let mut out = vec![(name(""), self.packed.shallow_clone())];
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push((name(".absmax"), a.shallow_clone()));
                out.push((name(".quant_map"), code));
            }
            Absmax::Nested {
                quant,
                nested_absmax,
                nested_code,
                ..
            } => {
                out.push((name(".absmax"), quant.shallow_clone()));
                out.push((name(".quant_map"), code));
                out.push((name(".nested_absmax"), nested_absmax.shallow_clone()));
                // A copy, as bitsandbytes (`state2.code.clone()`): safetensors refuses shared storage.
                out.push((name(".nested_quant_map"), nested_code.copy()));
            }
        }
        let json = self.quant_state_json()?;
        out.push((
            name(".quant_state.bitsandbytes__nf4"),
            Tensor::from_slice(json.as_bytes()),
        ));
        Ok(out)
    }

    /// Rebuilds a weight from the tensors [`Nf4Tensor::to_bnb_tensors`] names (as found in a
    /// transformers 4-bit checkpoint); `get` looks a full tensor name up. Everything is moved
    /// to the device of `<prefix>weight`.
    pub fn from_bnb_tensors(
        get: &dyn Fn(&str) -> Option<Tensor>,
        prefix: &str,
    ) -> Result<Nf4Tensor> {
        let name = |suffix: &str| format!("{prefix}weight{suffix}");
        let fetch = |suffix: &str| -> Result<Tensor> {
            get(&name(suffix)).with_context(|| format!("missing tensor {}", name(suffix)))
        };
        let packed = fetch("")?;
        let device = packed.device();
        let qs = match get(&name(".quant_state.bitsandbytes__nf4")) {
            Some(t) => t,
            None if get(&name(".quant_state.bitsandbytes__fp4")).is_some() => {
                bail!("{}: FP4 weights are not supported, only NF4", name(""))
            }
            None => bail!(
                "missing tensor {} (not a bitsandbytes 4-bit weight?)",
                name(".quant_state.bitsandbytes__nf4")
            ),
        };
        let bytes: Vec<u8> = Vec::try_from(
            &qs.to_device(Device::Cpu)
                .to_kind(Kind::Uint8)
                .flatten(0, -1),
        )
        .context("reading the packed quant_state")?;
        let meta: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: quant_state is not JSON",
                name(".quant_state.bitsandbytes__nf4")
            )
        })?;
        let field = |key: &str| {
            meta.get(key)
                .with_context(|| format!("{}: quant_state lacks {key:?}", name("")))
        };
        let as_i64 = |key: &str| -> Result<i64> {
            field(key)?
                .as_i64()
                .with_context(|| format!("{}: quant_state {key:?} is not an integer", name("")))
        };
        let quant_type = field("quant_type")?.as_str().unwrap_or_default();
        ensure!(
            quant_type == "nf4",
            "{}: quant_type {quant_type:?} is not supported, only nf4",
            name("")
        );
        let blocksize = as_i64("blocksize")?;
        check_blocksize(blocksize)?;
        let dtype = dtype_from_name(field("dtype")?.as_str().unwrap_or_default())
            .with_context(|| format!("{}: quant_state dtype", name("")))?;
        let shape: Vec<i64> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_i64()).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{}: quant_state shape is not a list of ints", name("")))?;
        // Checkpoints saved with a non-u8 quant_storage keep the same bytes in another dtype.
        let packed = if packed.kind() == Kind::Uint8 {
            packed.contiguous()
        } else {
            packed.contiguous().view_dtype(Kind::Uint8)
        }
        .reshape([-1, 1]);
        if let Some(map) = get(&name(".quant_map")) {
            let map: Vec<f32> = Vec::try_from(&map.to_device(Device::Cpu).to_kind(Kind::Float))
                .context("reading quant_map")?;
            ensure!(
                map.len() == 16
                    && map
                        .iter()
                        .zip(NF4_CODE.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: quant_map is not bitsandbytes' NF4 code",
                name("")
            );
        }
        let absmax_t = fetch(".absmax")?.to_device(device).contiguous();
        let absmax = match get(&name(".nested_absmax")) {
            Some(nested_absmax) => {
                let offset = field("nested_offset")?.as_f64().with_context(|| {
                    format!("{}: quant_state nested_offset is not a number", name(""))
                })? as f32;
                let nested_dtype = field("nested_dtype")?.as_str().unwrap_or_default();
                ensure!(
                    nested_dtype == "float32",
                    "{}: nested_dtype {nested_dtype:?} is not supported",
                    name("")
                );
                Absmax::Nested {
                    quant: absmax_t,
                    offset,
                    nested_absmax: nested_absmax
                        .to_device(device)
                        .to_kind(Kind::Float)
                        .contiguous(),
                    nested_code: fetch(".nested_quant_map")?
                        .to_device(device)
                        .to_kind(Kind::Float)
                        .contiguous(),
                    nested_blocksize: as_i64("nested_blocksize")?,
                }
            }
            None => Absmax::Plain(absmax_t.to_kind(Kind::Float)),
        };
        let q = Nf4Tensor {
            packed,
            absmax,
            shape,
            dtype,
            blocksize,
        };
        q.validate()
            .and_then(|_| q.scales().map(|_| ()))
            .with_context(|| format!("{}: inconsistent bitsandbytes tensors", name("")))?;
        Ok(q)
    }
}
