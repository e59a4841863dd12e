//! NF4 parity with bitsandbytes 0.50.2 (CPU backend), driven through
//! tests/oracles/nf4_oracle.py: packed nibbles, absmax, double quantization, dequantization,
//! the transformers/bitsandbytes checkpoint tensors, plus the fused small-batch matmul and the
//! CUDA-vs-CPU bit identity (skipped without a GPU).
mod common;

use qlora_cls::quant::nf4::{
    self, Absmax, Nf4Options, Nf4Tensor, DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4_CODE,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// One weight the oracle quantizes.
struct Case {
    name: &'static str,
    shape: &'static [i64],
    kind: Kind,
    blocksize: i64,
    double_quant: bool,
    /// Extra dequantization kinds (the weight's own kind is always checked).
    extra_kinds: &'static [Kind],
    pattern: Pattern,
}

#[derive(Clone, Copy)]
enum Pattern {
    /// N(0, 0.02²) with a few large outliers and one all-zero block.
    Gaussian,
    /// N(0, 0.02²) scaled by a factor (exercises absmax/offset far from 1).
    Scaled(f64),
    Zeros,
    /// N(0, 0.02²) whose last (partial) block is all zero.
    ZeroTail,
    /// Values exactly on, and one f32 ulp either side of, the NF4 midpoints.
    Ties,
}

const CASES: &[Case] = &[
    Case {
        name: "f32_256x512_bs64_dq",
        shape: &[256, 512],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[Kind::BFloat16, Kind::Half],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "bf16_300x200_bs64_dq",
        shape: &[300, 200],
        kind: Kind::BFloat16,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[Kind::Float, Kind::Half],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "f16_77x33_bs64_dq",
        shape: &[77, 33],
        kind: Kind::Half,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        // > 32768 blocks: torch's mean of the absmax runs multi-threaded.
        name: "bf16_2080x1024_bs64_dq",
        shape: &[2080, 1024],
        kind: Kind::BFloat16,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "f32_128x384_bs128_dq",
        shape: &[128, 384],
        kind: Kind::Float,
        blocksize: 128,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "bf16_64x768_bs256_single",
        shape: &[64, 768],
        kind: Kind::BFloat16,
        blocksize: 256,
        double_quant: false,
        extra_kinds: &[Kind::Float],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "f16_9000_bs4096_dq",
        shape: &[9000],
        kind: Kind::Half,
        blocksize: 4096,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "f16_40x64_bs2048_single",
        shape: &[40, 64],
        kind: Kind::Half,
        blocksize: 2048,
        double_quant: false,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        // Last dim a multiple of 16 but not of the blocksize (see docs/nf4.md).
        name: "f32_8x48_bs64_dq",
        shape: &[8, 48],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "bf16_33x64_zeros_dq",
        shape: &[33, 64],
        kind: Kind::BFloat16,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Zeros,
    },
    Case {
        name: "f32_1000_bs512_zero_tail_single",
        shape: &[1000],
        kind: Kind::Float,
        blocksize: 512,
        double_quant: false,
        extra_kinds: &[],
        pattern: Pattern::ZeroTail,
    },
    Case {
        name: "bf16_96x96_bs32_dq",
        shape: &[96, 96],
        kind: Kind::BFloat16,
        blocksize: 32,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Gaussian,
    },
    Case {
        name: "f32_ties_4x64_single",
        shape: &[4, 64],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: false,
        extra_kinds: &[],
        pattern: Pattern::Ties,
    },
    Case {
        // Ties in the partial last block (scaled by division there).
        name: "f32_ties_100_dq",
        shape: &[100],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Ties,
    },
    Case {
        name: "f32_tiny_64x64_dq",
        shape: &[64, 64],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Scaled(1e-6),
    },
    Case {
        name: "f32_huge_64x64_dq",
        shape: &[64, 64],
        kind: Kind::Float,
        blocksize: 64,
        double_quant: true,
        extra_kinds: &[],
        pattern: Pattern::Scaled(1e18),
    },
];

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        other => panic!("no name for {other:?}"),
    }
}

fn seed_for(name: &str) -> i64 {
    name.bytes()
        .fold(17i64, |h, b| h.wrapping_mul(31).wrapping_add(b as i64))
        & 0xffff_ffff
}

/// NF4 midpoints as torch computes them: (code[i] + code[i+1]) / 2 in f32.
fn nf4_bounds() -> Vec<f32> {
    (0..15)
        .map(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
        .collect()
}

fn make_weight(case: &Case) -> Tensor {
    tch::manual_seed(seed_for(case.name));
    let n: i64 = case.shape.iter().product();
    let w = match case.pattern {
        Pattern::Zeros => Tensor::zeros([n], (Kind::Float, Device::Cpu)),
        Pattern::Ties => {
            // Each block of 64 starts with its absmax a, the rest are fl(bound * a) and one
            // f32 ulp either side: scaled, they land on or next to the NF4 midpoints, under
            // both the reciprocal (full blocks) and the division (last partial block) rule.
            let scales = [1.0f32, -1.0, 0.7, -0.3];
            let bounds = nf4_bounds();
            let mut v = Vec::with_capacity(n as usize);
            let mut i = 0usize;
            while v.len() < n as usize {
                let a = scales[(v.len() / 64) % scales.len()];
                if v.len() % 64 == 0 {
                    v.push(a);
                    continue;
                }
                let t = bounds[i % 15] * a.abs();
                v.push(match (i / 15) % 3 {
                    0 => t,
                    1 => f32::from_bits(t.to_bits() + 1),
                    _ => f32::from_bits(t.to_bits() - 1),
                });
                i += 1;
            }
            Tensor::from_slice(&v)
        }
        _ => {
            let mut w = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.02;
            if n >= 4 * case.blocksize {
                let _ = w.narrow(0, case.blocksize, case.blocksize).fill_(0.0);
            }
            // Outliers.
            for (j, v) in [(3i64, 4.5f64), (n / 2 + 1, -7.25), (n - 2, 2.0)] {
                if j >= 0 && j < n && !matches!(case.pattern, Pattern::ZeroTail) {
                    let _ = w.narrow(0, j, 1).fill_(v);
                }
            }
            if let Pattern::Scaled(f) = case.pattern {
                w *= f;
            }
            if let Pattern::ZeroTail = case.pattern {
                let tail = n % case.blocksize;
                assert!(tail > 0);
                let _ = w.narrow(0, n - tail, tail).fill_(0.0);
            }
            w
        }
    };
    w.reshape(case.shape).to_kind(case.kind)
}

struct Oracle {
    dir: tempfile::TempDir,
    out: HashMap<String, Tensor>,
    bnb: HashMap<String, Tensor>,
    bnb_names: HashMap<String, Vec<String>>,
    inputs: HashMap<String, Tensor>,
}

// SAFETY: the tensors are built once and afterwards only read (shallow clones, copies to
// other tensors), which libtorch allows from several threads at once.
unsafe impl Sync for Oracle {}

fn read_map(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn q8_input() -> Tensor {
    tch::manual_seed(7);
    let x = Tensor::randn([1000], (Kind::Float, Device::Cpu)) * 0.3;
    let _ = x.narrow(0, 256, 256).fill_(0.0);
    let _ = x.narrow(0, 10, 1).fill_(1.0);
    x
}

fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let dir = common::tempdir();
        let mut inputs: Vec<(String, Tensor)> = CASES
            .iter()
            .map(|c| (c.name.to_string(), make_weight(c)))
            .collect();
        inputs.push(("q8.x".into(), q8_input()));
        Tensor::write_safetensors(&inputs, dir.path().join("inputs.safetensors"))
            .expect("write inputs");
        let cases: Vec<serde_json::Value> = CASES
            .iter()
            .map(|c| {
                let mut kinds = vec![kind_name(c.kind)];
                kinds.extend(c.extra_kinds.iter().map(|k| kind_name(*k)));
                serde_json::json!({
                    "name": c.name,
                    "blocksize": c.blocksize,
                    "double_quant": c.double_quant,
                    "dequant_kinds": kinds,
                })
            })
            .collect();
        qlora_cls::runio::write_json(&dir.path().join("cases.json"), &cases).expect("cases");
        let d = dir.path().to_string_lossy().into_owned();
        let t = std::time::Instant::now();
        common::oracle("nf4_oracle.py", &["quantize", &d]);
        eprintln!("nf4 oracle: {:.1}s", t.elapsed().as_secs_f64());
        let names: HashMap<String, Vec<String>> = serde_json::from_slice(
            &std::fs::read(dir.path().join("bnb_names.json")).expect("bnb_names.json"),
        )
        .expect("bnb_names.json");
        Oracle {
            out: read_map(&dir.path().join("outputs.safetensors")),
            bnb: read_map(&dir.path().join("bnb.safetensors")),
            bnb_names: names,
            inputs: inputs.into_iter().collect(),
            dir,
        }
    })
}

impl Oracle {
    fn get(&self, key: &str) -> &Tensor {
        self.out
            .get(key)
            .unwrap_or_else(|| panic!("oracle output {key} missing"))
    }
}

fn bit_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Float => Kind::Int,
        Kind::BFloat16 | Kind::Half => Kind::Int16,
        Kind::Uint8 => Kind::Uint8,
        other => panic!("no bit view for {other:?}"),
    }
}

/// Bit-for-bit equality (kind, shape and every bit pattern, so -0.0 != 0.0).
fn assert_bits_eq(ours: &Tensor, theirs: &Tensor, what: &str) {
    let ours = ours.to_device(Device::Cpu).contiguous();
    let theirs = theirs.to_device(Device::Cpu).contiguous();
    assert_eq!(ours.kind(), theirs.kind(), "{what}: kind");
    assert_eq!(ours.size(), theirs.size(), "{what}: shape");
    let bk = bit_kind(ours.kind());
    let a = ours.view_dtype(bk).flatten(0, -1);
    let b = theirs.view_dtype(bk).flatten(0, -1);
    let diff = a.ne_tensor(&b);
    let n_diff = diff.sum(Kind::Int64).int64_value(&[]);
    if n_diff > 0 {
        let first = diff.nonzero().int64_value(&[0, 0]);
        panic!(
            "{what}: {n_diff} of {} elements differ; first at flat index {first}: ours {} vs \
             bitsandbytes {}",
            a.numel(),
            ours.flatten(0, -1).double_value(&[first]),
            theirs.flatten(0, -1).double_value(&[first]),
        );
    }
}

fn opts(case: &Case) -> Nf4Options {
    Nf4Options {
        blocksize: case.blocksize,
        double_quant: case.double_quant,
    }
}

fn quantize_case(case: &Case) -> Nf4Tensor {
    let w = &oracle().inputs[case.name];
    nf4::quantize(w, &opts(case)).unwrap_or_else(|e| panic!("{}: {e:#}", case.name))
}

#[test]
fn codes_match_bitsandbytes() {
    let o = oracle();
    assert_bits_eq(
        &Tensor::from_slice(&NF4_CODE),
        o.get("nf4_code"),
        "NF4 code",
    );
    assert_bits_eq(
        &Tensor::from_slice(&DYNAMIC_MAP),
        o.get("dynamic_map"),
        "dynamic map",
    );
}

#[test]
fn quantize_matches_bitsandbytes() {
    let o = oracle();
    for case in CASES {
        let q = quantize_case(case);
        let n = case.name;
        assert_eq!(q.shape, case.shape, "{n}: shape");
        assert_eq!(q.dtype, case.kind, "{n}: dtype");
        assert_bits_eq(
            &q.packed,
            o.get(&format!("{n}.packed")),
            &format!("{n}: packed"),
        );
        match (&q.absmax, case.double_quant) {
            (Absmax::Plain(a), false) => {
                assert_bits_eq(a, o.get(&format!("{n}.absmax")), &format!("{n}: absmax"))
            }
            (
                Absmax::Nested {
                    quant,
                    offset,
                    nested_absmax,
                    nested_code,
                    nested_blocksize,
                },
                true,
            ) => {
                assert_bits_eq(
                    quant,
                    o.get(&format!("{n}.absmax")),
                    &format!("{n}: qabsmax"),
                );
                assert_bits_eq(
                    &Tensor::from_slice(&[*offset]),
                    o.get(&format!("{n}.offset")),
                    &format!("{n}: offset"),
                );
                assert_bits_eq(
                    nested_absmax,
                    o.get(&format!("{n}.nested_absmax")),
                    &format!("{n}: nested absmax"),
                );
                assert_bits_eq(
                    nested_code,
                    o.get(&format!("{n}.nested_code")),
                    &format!("{n}: nested code"),
                );
                assert_eq!(*nested_blocksize, NESTED_BLOCKSIZE);
            }
            _ => panic!("{n}: wrong absmax variant"),
        }
        assert_bits_eq(
            &q.absmax_f32().expect("absmax_f32"),
            o.get(&format!("{n}.absmax_f32")),
            &format!("{n}: dequantized absmax"),
        );
    }
}

#[test]
fn dequantize_matches_bitsandbytes() {
    let o = oracle();
    let mut api_checked = 0;
    for case in CASES {
        let q = quantize_case(case);
        let n = case.name;
        let last = *case.shape.last().expect("shape");
        // bitsandbytes' AVX-512 dequantizer (used when the last dim is even and a multiple of
        // 16, and blocksize < 2048) indexes absmax per row: that is the flat layout only when
        // the last dim is a multiple of the blocksize. Its torch backend, which every other
        // path uses, is the reference for the rest (docs/nf4.md).
        let api_is_flat = !(last % 16 == 0 && last % case.blocksize != 0 && case.blocksize < 2048);
        for kind in std::iter::once(&case.kind).chain(case.extra_kinds) {
            let k = kind_name(*kind);
            let ours = nf4::dequantize(&q, *kind).expect("dequantize");
            assert_bits_eq(
                &ours,
                o.get(&format!("{n}.dq_ref.{k}")),
                &format!("{n}: dequantize to {k} vs bitsandbytes torch backend"),
            );
            if api_is_flat {
                // Its native CPU kernel returns 1-D weights as [1, n]; values are what count.
                let api = o.get(&format!("{n}.dq_api.{k}")).reshape(case.shape);
                assert_bits_eq(
                    &ours,
                    &api,
                    &format!("{n}: dequantize to {k} vs bitsandbytes.functional.dequantize_4bit"),
                );
                api_checked += 1;
            }
        }
    }
    assert!(
        api_checked >= CASES.len(),
        "too few cases hit the public API"
    );
}

#[test]
fn dequantize_into_reuses_buffers() {
    let case = &CASES[1];
    let q = quantize_case(case);
    let expected = nf4::dequantize(&q, Kind::Float).expect("dequantize");
    // Contiguous buffer of another shape: written in place.
    let mut flat = Tensor::full([q.numel()], f64::NAN, (Kind::Float, Device::Cpu));
    let ptr = flat.data_ptr();
    nf4::dequantize_into(&q, &mut flat).expect("into flat");
    assert_eq!(flat.data_ptr(), ptr, "buffer must be reused");
    assert_bits_eq(
        &flat.view(q.shape.as_slice()),
        &expected,
        "dequantize_into flat f32",
    );
    // Non-contiguous and f64 buffers go through a temporary.
    let mut t = Tensor::zeros([case.shape[1], case.shape[0]], (Kind::Float, Device::Cpu)).t_();
    nf4::dequantize_into(&q, &mut t).expect("into transposed");
    assert_bits_eq(&t.contiguous(), &expected, "dequantize_into transposed");
    let mut d = Tensor::zeros(case.shape, (Kind::Double, Device::Cpu));
    nf4::dequantize_into(&q, &mut d).expect("into f64");
    assert_bits_eq(&d.to_kind(Kind::Float), &expected, "dequantize_into f64");
    let mut wrong = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    assert!(nf4::dequantize_into(&q, &mut wrong).is_err());
}

#[test]
fn blockwise_8bit_matches_bitsandbytes() {
    let o = oracle();
    let code = Tensor::from_slice(&DYNAMIC_MAP);
    let (q, absmax) =
        nf4::quantize_blockwise_8bit(&o.inputs["q8.x"], &code, 256).expect("quantize 8-bit");
    assert_bits_eq(&q, o.get("q8.q"), "8-bit codes");
    assert_bits_eq(&absmax, o.get("q8.absmax"), "8-bit absmax");
    let dq = nf4::dequantize_blockwise_8bit(&q, &absmax, o.get("q8.code"), 256).expect("dq");
    assert_bits_eq(&dq, o.get("q8.dq"), "8-bit dequantize");
}

fn bnb_lookup(map: &HashMap<String, Tensor>) -> impl Fn(&str) -> Option<Tensor> + '_ {
    move |k: &str| map.get(k).map(|t| t.shallow_clone())
}

#[test]
fn bnb_tensors_match_quant_state_as_dict() {
    let o = oracle();
    let mut ours_all: Vec<(String, Tensor)> = Vec::new();
    let mut prefixes = Vec::new();
    for case in CASES {
        let n = case.name;
        let prefix = format!("{n}.layer.");
        let q = quantize_case(case);
        let ours = q.to_bnb_tensors(&prefix).expect("to_bnb_tensors");
        let names: Vec<&String> = ours.iter().map(|(k, _)| k).collect();
        let expected: Vec<&String> = o.bnb_names[n].iter().collect();
        assert_eq!(names, expected, "{n}: tensor names and order");
        for (k, t) in &ours {
            assert_bits_eq(t, &o.bnb[k], &format!("{n}: {k}"));
        }
        // Load what bitsandbytes saved.
        let get = bnb_lookup(&o.bnb);
        let loaded = Nf4Tensor::from_bnb_tensors(&get, &prefix).expect("from_bnb_tensors");
        assert_eq!(loaded.shape, q.shape);
        assert_eq!(loaded.dtype, q.dtype);
        assert_eq!(loaded.blocksize, q.blocksize);
        assert_eq!(loaded.nbytes(), q.nbytes(), "{n}: nbytes");
        for ((ka, a), (_, b)) in loaded
            .to_bnb_tensors(&prefix)
            .expect("to_bnb_tensors")
            .iter()
            .zip(&ours)
        {
            assert_bits_eq(a, b, &format!("{n}: reloaded {ka}"));
        }
        assert_bits_eq(
            &nf4::dequantize(&loaded, case.kind).expect("dequantize"),
            &nf4::dequantize(&q, case.kind).expect("dequantize"),
            &format!("{n}: dequantize after load"),
        );
        prefixes.push(prefix);
        ours_all.extend(ours);
    }
    // And bitsandbytes loads what we save.
    let dir = &o.dir;
    let sub = dir.path().join("load");
    std::fs::create_dir_all(&sub).expect("mkdir");
    Tensor::write_safetensors(&ours_all, sub.join("ours.safetensors")).expect("write ours");
    qlora_cls::runio::write_json(&sub.join("load_cases.json"), &prefixes).expect("json");
    common::oracle("nf4_oracle.py", &["load", &sub.to_string_lossy()]);
    let loaded = read_map(&sub.join("loaded.safetensors"));
    for (case, prefix) in CASES.iter().zip(&prefixes) {
        let ours = nf4::dequantize(&quantize_case(case), case.kind).expect("dequantize");
        assert_bits_eq(
            &ours,
            &loaded[&format!("{prefix}reference")],
            &format!("{}: bitsandbytes' dequantization of our tensors", case.name),
        );
    }
}

#[test]
fn from_bnb_tensors_rejects_incomplete_sets() {
    let o = oracle();
    let prefix = format!("{}.layer.", CASES[0].name);
    let mut map: HashMap<String, Tensor> = o
        .bnb
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    map.remove(&format!("{prefix}weight.nested_quant_map"));
    let get = bnb_lookup(&map);
    let err = Nf4Tensor::from_bnb_tensors(&get, &prefix).expect_err("must fail");
    assert!(format!("{err:#}").contains("nested_quant_map"), "{err:#}");
    let empty = HashMap::new();
    let get = bnb_lookup(&empty);
    assert!(Nf4Tensor::from_bnb_tensors(&get, &prefix).is_err());
}

#[test]
fn rejects_bad_inputs() {
    let ints = Tensor::ones([64, 64], (Kind::Int, Device::Cpu));
    let err = nf4::quantize(&ints, &Nf4Options::default()).expect_err("int input");
    assert!(format!("{err}").contains("floating-point"), "{err}");
    let w = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
    for bs in [0, 48, 8192, -64] {
        let err = nf4::quantize(
            &w,
            &Nf4Options {
                blocksize: bs,
                double_quant: true,
            },
        )
        .expect_err("bad blocksize");
        assert!(format!("{err}").contains("blocksize"), "{err}");
    }
    let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
    assert!(nf4::quantize(&empty, &Nf4Options::default()).is_err());
    let q = nf4::quantize(&w, &Nf4Options::default()).expect("quantize");
    assert!(nf4::dequantize(&q, Kind::Int64).is_err());
    let x = Tensor::randn([2, 63], (Kind::Float, Device::Cpu));
    assert!(nf4::matmul_small(&x, &q).is_err(), "inner dim mismatch");
    let xi = Tensor::ones([2, 64], (Kind::Int, Device::Cpu));
    assert!(nf4::matmul_small(&xi, &q).is_err(), "integer x");
    let q1 = nf4::quantize(&w.flatten(0, -1), &Nf4Options::default()).expect("1-D");
    assert!(nf4::matmul_small(&x, &q1).is_err(), "1-D weight");
}

/// `x · Wᵀ` in f64 from the dequantized weight (in x's dtype), and the bound
/// 2^-p·|ref| + k·2^-24·Σ|x||w| on the kernel's error (p = 24/8/11 for f32/bf16/f16): one
/// rounding of the output plus f32 accumulation of k products.
fn check_matmul(x: &Tensor, q: &Nf4Tensor, what: &str) {
    let y = nf4::matmul_small(x, q).expect("matmul_small");
    let n_out = q.shape[0];
    let mut expect_shape = x.size();
    *expect_shape.last_mut().expect("dims") = n_out;
    assert_eq!(y.size(), expect_shape, "{what}: shape");
    assert_eq!(y.kind(), x.kind(), "{what}: kind");
    assert!(!y.requires_grad());
    let w = nf4::dequantize(q, x.kind())
        .expect("dequantize")
        .to_kind(Kind::Double);
    let xd = x.to_kind(Kind::Double);
    let reference = xd.matmul(&w.tr());
    let mag = xd.abs().matmul(&w.abs().tr());
    let k = q.shape[1] as f64;
    let p = match x.kind() {
        Kind::Float => 24,
        Kind::BFloat16 => 8,
        _ => 11,
    };
    let bound = reference.abs() * 2f64.powi(-p) + &mag * (k * 2f64.powi(-24)) + 1e-30;
    let err = (y.to_kind(Kind::Double) - &reference).abs();
    let worst = (&err / &bound).max().double_value(&[]);
    assert!(
        worst <= 1.0,
        "{what}: error reaches {worst:.3} of the bound"
    );
    // And typically far inside it: mean error below one output rounding of the magnitudes.
    let rel = (err.sum(Kind::Double) / mag.sum(Kind::Double)).double_value(&[]);
    let tol = 2f64.powi(-p);
    assert!(
        rel <= tol,
        "{what}: mean error {rel:e} of Σ|x||w| > {tol:e}"
    );
}

#[test]
fn matmul_small_matches_dequantized_matmul_cpu() {
    tch::manual_seed(11);
    for (shape, bs, dq) in [
        (&[96i64, 200][..], 64, true),
        (&[64, 512][..], 128, false),
        (&[33, 77][..], 64, true),
    ] {
        let w = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.05;
        let q = nf4::quantize(
            &w,
            &Nf4Options {
                blocksize: bs,
                double_quant: dq,
            },
        )
        .expect("quantize");
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for rows in [&[1i64][..], &[3], &[16], &[2, 5], &[20]] {
                let mut xs = rows.to_vec();
                xs.push(shape[1]);
                let x = Tensor::randn(xs.as_slice(), (Kind::Float, Device::Cpu)).to_kind(kind);
                check_matmul(&x, &q, &format!("W{shape:?} bs{bs} x{xs:?} {kind:?}"));
            }
        }
    }
}

fn cuda_device() -> Option<Device> {
    if cfg!(qlora_cuda) && tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        None
    }
}

#[test]
fn cuda_matches_cpu_bit_for_bit() {
    let Some(gpu) = cuda_device() else {
        eprintln!("cuda_matches_cpu_bit_for_bit: skipped, no CUDA device (or built without CUDA)");
        return;
    };
    for case in CASES {
        let n = case.name;
        let w = make_weight(case);
        let cpu = nf4::quantize(&w, &opts(case)).expect("cpu quantize");
        let cuda = nf4::quantize(&w.to_device(gpu), &opts(case)).expect("cuda quantize");
        assert_eq!(cuda.device(), gpu);
        let a = cpu.to_bnb_tensors("").expect("cpu tensors");
        let b = cuda.to_bnb_tensors("").expect("cuda tensors");
        assert_eq!(a.len(), b.len());
        for ((k, ta), (_, tb)) in a.iter().zip(&b) {
            assert_bits_eq(tb, ta, &format!("{n}: CUDA vs CPU {k}"));
        }
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            assert_bits_eq(
                &nf4::dequantize(&cuda, kind).expect("cuda dequantize"),
                &nf4::dequantize(&cpu, kind).expect("cpu dequantize"),
                &format!("{n}: CUDA vs CPU dequantize {kind:?}"),
            );
        }
        // The CPU weight moved to the GPU dequantizes identically too.
        assert_bits_eq(
            &nf4::dequantize(&cpu.to_device(gpu), case.kind).expect("moved"),
            &nf4::dequantize(&cpu, case.kind).expect("cpu"),
            &format!("{n}: moved weight"),
        );
        if case.shape.len() == 2 && case.shape[0] * case.shape[1] <= 1 << 20 {
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                for m in [1i64, 3, 16, 21] {
                    let x =
                        Tensor::randn([m, case.shape[1]], (Kind::Float, Device::Cpu)).to_kind(kind);
                    assert_bits_eq(
                        &nf4::matmul_small(&x.to_device(gpu), &cuda).expect("cuda matmul"),
                        &nf4::matmul_small(&x, &cpu).expect("cpu matmul"),
                        &format!("{n}: CUDA vs CPU matmul_small {kind:?} m={m}"),
                    );
                }
            }
        }
    }
    let o = oracle();
    let code = Tensor::from_slice(&DYNAMIC_MAP);
    let (q, a) = nf4::quantize_blockwise_8bit(&o.inputs["q8.x"].to_device(gpu), &code, 256)
        .expect("cuda 8-bit");
    assert_bits_eq(&q, o.get("q8.q"), "CUDA 8-bit codes");
    assert_bits_eq(&a, o.get("q8.absmax"), "CUDA 8-bit absmax");
}

/// More output features than the capped grid has warps (65535·32 blocks of 8 warps, about
/// 16.8M): the kernel's warp-stride loop must still write every row. On the GPU only; a
/// quarter-gigabyte weight of tiny rows keeps it cheap.
#[test]
fn cuda_matmul_small_writes_rows_past_the_grid_cap() {
    let Some(gpu) = cuda_device() else {
        eprintln!("cuda_matmul_small_writes_rows_past_the_grid_cap: skipped, no CUDA device (or built without CUDA)");
        return;
    };
    let n_out = 65535i64 * 32 * 8 + 4099;
    let k = 32i64;
    tch::manual_seed(5);
    let w = Tensor::randn([n_out, k], (Kind::Float, Device::Cpu)) * 0.05;
    let q = nf4::quantize(
        &w.to_device(gpu),
        &Nf4Options {
            blocksize: 64,
            double_quant: false,
        },
    )
    .expect("quantize");
    let x = Tensor::randn([2, k], (Kind::Float, Device::Cpu));
    let got = nf4::matmul_small(&x.to_device(gpu), &q)
        .expect("cuda matmul")
        .to_device(Device::Cpu);
    let want = x.matmul(
        &nf4::dequantize(&q, Kind::Float)
            .expect("dequantize")
            .to_device(Device::Cpu)
            .tr(),
    );
    let tail = n_out - 70_000;
    let d = (got.narrow(1, tail, 70_000) - want.narrow(1, tail, 70_000))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-4, "rows past the grid cap: max |Δ| {d:e}");
}
