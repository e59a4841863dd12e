//! Bad input never loses a run: every broken model, tokenizer, data set, configuration or
//! run folder, given to the real binary (`qlora-cls train`), ends with a non-zero exit and a
//! message that names the file (and line, key or tensor), never with a panic. A full disk
//! while saving a checkpoint leaves the previous checkpoint intact; a non-finite loss stops
//! the run naming the step, the batch's examples and the last good checkpoint.
mod common;
use qlora_cls::data::batch::epoch_batches;
use qlora_cls::{resume, runio};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Rows of the small training split (3 batches of 8) and the small evaluation split.
const TRAIN_ROWS: usize = 24;
const DEV_ROWS: usize = 32;

/// `qlora-cls demo-assets`, once per test process, plus a small copy of its data (the
/// cases below need a few steps, not an epoch of 1600 examples).
fn assets() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults_assets");
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(common::bin())
            .args(["demo-assets", "--out"])
            .arg(&dir)
            .output()
            .expect("run demo-assets");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let small = dir.join("small");
        std::fs::create_dir_all(&small).unwrap();
        for (file, rows) in [("train.tsv", TRAIN_ROWS), ("dev.tsv", DEV_ROWS)] {
            let text = std::fs::read_to_string(dir.join("data").join(file)).unwrap();
            let head: Vec<&str> = text.lines().take(rows + 1).collect();
            std::fs::write(small.join(file), head.join("\n") + "\n").unwrap();
        }
        dir
    })
}

fn model() -> PathBuf {
    assets().join("model")
}

fn small_data() -> PathBuf {
    assets().join("small")
}

/// `qlora-cls train` on the demo recipe, two steps, no baseline evaluation.
fn train(model_dir: &Path, data_dir: &Path, run: &Path, extra: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("train")
        .arg("--config")
        .arg(common::root().join("configs/demo.yaml"))
        .arg("--model_dir")
        .arg(model_dir)
        .arg("--data_dir")
        .arg(data_dir)
        .arg("--results_path")
        .arg(run)
        .args(["--max_steps", "2", "--eval_before_training", "false"])
        .args(extra)
        .output()
        .expect("run qlora-cls train")
}

/// The run failed cleanly: exit 1, an `error:` line, no panic. Returns stderr.
fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn succeeded(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from:\n{msg}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ─── 1. config.json ─────────────────────────────────────────────────────────────────────

#[test]
fn model_config_json_missing_or_malformed() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let data = small_data();

    let m = t.join("no_config");
    copy_dir(&model(), &m);
    std::fs::remove_file(m.join("config.json")).unwrap();
    let e = failed(&train(&m, &data, &t.join("r1"), &[]));
    has_all(&e, &[&s(&m.join("config.json")), "No such file"]);

    let m = t.join("malformed");
    copy_dir(&model(), &m);
    std::fs::write(m.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = failed(&train(&m, &data, &t.join("r2"), &[]));
    has_all(
        &e,
        &[&s(&m.join("config.json")), "malformed JSON", "line 1"],
    );

    let m = t.join("wrong_type");
    copy_dir(&model(), &m);
    edit_json(&m.join("config.json"), |v| {
        v["num_attention_heads"] = serde_json::json!("four")
    });
    let e = failed(&train(&m, &data, &t.join("r3"), &[]));
    has_all(&e, &[&s(&m.join("config.json")), "`num_attention_heads`"]);

    let m = t.join("missing_key");
    copy_dir(&model(), &m);
    edit_json(&m.join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = failed(&train(&m, &data, &t.join("r4"), &[]));
    has_all(
        &e,
        &[&s(&m.join("config.json")), "`num_hidden_layers`", "missing"],
    );
}

// ─── 2. safetensors ─────────────────────────────────────────────────────────────────────

#[test]
fn safetensors_truncated_or_lying_header() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let data = small_data();

    let m = t.join("truncated");
    copy_dir(&model(), &m);
    let f = m.join("model.safetensors");
    common::truncate_by(&f, 100);
    let e = failed(&train(&m, &data, &t.join("r1"), &[]));
    has_all(&e, &[&s(&f), "truncated or corrupt"]);

    // A header length far beyond the file (1 TiB).
    let m = t.join("lying");
    copy_dir(&model(), &m);
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let e = failed(&train(&m, &data, &t.join("r2"), &[]));
    has_all(&e, &[&s(&f), "not a valid safetensors file"]);

    // A header length one byte short of the real header: JSON cut mid-way.
    let m = t.join("short_header");
    copy_dir(&model(), &m);
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes[..8].copy_from_slice(&(n - 1).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let e = failed(&train(&m, &data, &t.join("r3"), &[]));
    has_all(&e, &[&s(&f), "not a valid safetensors file"]);
}

/// Splits the demo's model.safetensors into two shards and an index, as HF writes them.
fn shard_model(to: &Path) -> Vec<(String, Vec<String>)> {
    copy_dir(&model(), to);
    std::fs::remove_file(to.join("model.safetensors")).unwrap();
    let bytes = std::fs::read(model().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<_> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &to.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), serde_json::json!(file));
        }
        shards.push((file, part.to_vec()));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(to.join("model.safetensors.index.json"), index.to_string()).unwrap();
    shards
}

#[test]
fn sharded_checkpoint_with_a_missing_shard() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let m = t.join("sharded");
    let shards = shard_model(&m);
    // The sharded copy itself is good: the failure below is the missing shard alone.
    succeeded(&train(&m, &small_data(), &t.join("ok"), &[]));

    let (victim, held) = &shards[1];
    std::fs::remove_file(m.join(victim)).unwrap();
    let e = failed(&train(&m, &small_data(), &t.join("r1"), &[]));
    has_all(
        &e,
        &[
            &s(&m.join(victim)),
            "missing",
            "model.safetensors.index.json",
            &held[0],
        ],
    );

    // The index names a tensor that its shard does not hold.
    std::fs::remove_file(m.join("model.safetensors.index.json")).unwrap();
    shard_model(&m);
    edit_json(&m.join("model.safetensors.index.json"), |v| {
        v["weight_map"]["model.layers.9.mlp.up_proj.weight"] = serde_json::json!(victim);
    });
    let e = failed(&train(&m, &small_data(), &t.join("r2"), &[]));
    has_all(
        &e,
        &["model.layers.9.mlp.up_proj.weight", &s(&m.join(victim))],
    );
}

#[test]
fn tensor_that_does_not_fit_config_json() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let data = small_data();

    // hidden_size 64 → 128: the embedding is the first tensor checked.
    let m = t.join("hidden");
    copy_dir(&model(), &m);
    edit_json(&m.join("config.json"), |v| {
        v["hidden_size"] = serde_json::json!(128)
    });
    let e = failed(&train(&m, &data, &t.join("r1"), &[]));
    has_all(
        &e,
        &[
            "tensor model.embed_tokens.weight",
            &s(&m.join("model.safetensors")),
            "shape [842, 64]",
            "does not fit config.json",
            "expected [842, 128]",
        ],
    );

    // intermediate_size: the MLP projections.
    let m = t.join("intermediate");
    copy_dir(&model(), &m);
    edit_json(&m.join("config.json"), |v| {
        v["intermediate_size"] = serde_json::json!(96)
    });
    let e = failed(&train(&m, &data, &t.join("r2"), &[]));
    has_all(
        &e,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "does not fit config.json",
        ],
    );

    // A float tensor stored as integers of the same width.
    let m = t.join("dtype");
    copy_dir(&model(), &m);
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let victim = "model.norm.weight";
    let mut views = Vec::new();
    for (name, view) in st.tensors() {
        let view = if name == victim {
            let int = match view.dtype().bitsize() {
                16 => Dtype::I16,
                32 => Dtype::I32,
                other => panic!("unexpected width {other}"),
            };
            safetensors::tensor::TensorView::new(int, view.shape().to_vec(), view.data()).unwrap()
        } else {
            view
        };
        views.push((name, view));
    }
    let rewritten = safetensors::serialize(views, None).unwrap();
    std::fs::write(&f, rewritten).unwrap();
    let e = failed(&train(&m, &data, &t.join("r3"), &[]));
    has_all(&e, &[&format!("tensor {victim} in {}", s(&f)), "dtype I"]);
}

// ─── 3. tokenizer ───────────────────────────────────────────────────────────────────────

#[test]
fn tokenizer_ids_beyond_the_embedding() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let m = t.join("model");
    copy_dir(&model(), &m);
    let vocab = 842; // the demo's config.json
                     // A tokenizer with one token more than the model's embedding has rows.
    edit_json(&m.join("tokenizer.json"), |v| {
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": vocab, "content": "<|extra|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }))
    });
    let e = failed(&train(&m, &small_data(), &t.join("r1"), &[]));
    has_all(
        &e,
        &[
            &s(&m.join("tokenizer.json")),
            &s(&m.join("config.json")),
            &format!("ids up to {vocab}"),
            &format!("only {vocab} rows"),
        ],
    );
}

// ─── 4. data ────────────────────────────────────────────────────────────────────────────

/// A copy of the small data set with `file` rewritten line by line.
fn broken_data(t: &Path, name: &str, file: &str, edit: impl Fn(usize, &str) -> String) -> PathBuf {
    let d = t.join(name);
    copy_dir(&small_data(), &d);
    let text = std::fs::read_to_string(d.join(file)).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| edit(i + 1, l))
        .collect();
    std::fs::write(d.join(file), lines.join("\n") + "\n").unwrap();
    d
}

#[test]
fn data_without_columns_bad_labels_empty_split_malformed_rows() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let m = model();

    let d = broken_data(t, "columns", "train.tsv", |n, l| {
        if n == 1 {
            l.replace("#2 String", "Sentence B")
        } else {
            l.to_string()
        }
    });
    let e = failed(&train(&m, &d, &t.join("r1"), &[]));
    has_all(
        &e,
        &[&s(&d.join("train.tsv")), "missing column", "'#2 String'"],
    );

    // Line 5 of dev.tsv is the 4th example: idx 3 (row number, GLUE dev has no index column).
    let d = broken_data(t, "label", "dev.tsv", |n, l| {
        if n == 5 {
            format!("2{}", &l[1..])
        } else {
            l.to_string()
        }
    });
    let e = failed(&train(&m, &d, &t.join("r2"), &[]));
    has_all(
        &e,
        &[
            &s(&d.join("dev.tsv")),
            "validation split",
            "example idx 3 has label 2",
            "num_classes = 2",
        ],
    );

    let d = broken_data(t, "empty", "dev.tsv", |_, l| l.to_string());
    let header = std::fs::read_to_string(d.join("dev.tsv")).unwrap();
    std::fs::write(d.join("dev.tsv"), header.lines().next().unwrap()).unwrap();
    let e = failed(&train(&m, &d, &t.join("r3"), &[]));
    has_all(&e, &[&s(&d.join("dev.tsv")), "validation split is empty"]);

    let d = broken_data(t, "row", "train.tsv", |n, l| {
        if n == 7 {
            l.rsplit_once('\t').unwrap().0.to_string()
        } else {
            l.to_string()
        }
    });
    let e = failed(&train(&m, &d, &t.join("r4"), &[]));
    has_all(
        &e,
        &[
            &format!("{}:7", s(&d.join("train.tsv"))),
            "expected 5 tab-separated fields",
            "found 4",
        ],
    );

    let d = broken_data(t, "quality", "train.tsv", |n, l| {
        if n == 4 {
            format!("yes{}", &l[1..])
        } else {
            l.to_string()
        }
    });
    let e = failed(&train(&m, &d, &t.join("r5"), &[]));
    has_all(
        &e,
        &[
            &format!("{}:4", s(&d.join("train.tsv"))),
            "'Quality'",
            "'yes'",
        ],
    );

    // The other layouts, through the binary too.
    let d = t.join("csv");
    copy_dir(&small_data(), &d);
    std::fs::remove_file(d.join("train.tsv")).unwrap();
    std::fs::write(
        d.join("train.csv"),
        "sentence1,sentence2,label\n\"a b\",c,1\nd,e,0,extra\n",
    )
    .unwrap();
    let e = failed(&train(&m, &d, &t.join("r6"), &[]));
    has_all(
        &e,
        &[&format!("{}:3", s(&d.join("train.csv"))), "expected 3"],
    );

    let d = t.join("jsonl");
    copy_dir(&small_data(), &d);
    std::fs::remove_file(d.join("train.tsv")).unwrap();
    std::fs::write(
        d.join("train.jsonl"),
        "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": 1}\n{\"sentence1\": \"a\",\n",
    )
    .unwrap();
    let e = failed(&train(&m, &d, &t.join("r7"), &[]));
    has_all(
        &e,
        &[
            &format!("{}:2", s(&d.join("train.jsonl"))),
            "not valid JSON",
        ],
    );

    let d = t.join("jsonl_cols");
    copy_dir(&small_data(), &d);
    std::fs::remove_file(d.join("train.tsv")).unwrap();
    std::fs::write(
        d.join("train.jsonl"),
        "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": 1}\n{\"text\": \"a\", \"label\": 0}\n",
    )
    .unwrap();
    let e = failed(&train(&m, &d, &t.join("r8"), &[]));
    has_all(
        &e,
        &[
            &format!("{}:2", s(&d.join("train.jsonl"))),
            "missing column 'sentence1'",
        ],
    );

    let d = t.join("no_parquet");
    copy_dir(&small_data(), &d);
    std::fs::write(d.join("train-00000-of-00001.parquet"), b"PAR1 not really").unwrap();
    let e = failed(&train(&m, &d, &t.join("r9"), &[]));
    has_all(
        &e,
        &[
            &s(&d.join("train-00000-of-00001.parquet")),
            "not a readable parquet file",
        ],
    );

    let d = t.join("no_dev");
    copy_dir(&small_data(), &d);
    std::fs::remove_file(d.join("dev.tsv")).unwrap();
    let e = failed(&train(&m, &d, &t.join("r10"), &[]));
    has_all(&e, &["no file for the validation split", &s(&d), "dev.tsv"]);
}

/// A small valid parquet split (sentence1, sentence2, optional label), written with the
/// parquet crate's own writer.
fn parquet_bytes() -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = parse_message_type(
        "message schema { REQUIRED BINARY sentence1 (UTF8); REQUIRED BINARY sentence2 (UTF8); \
         OPTIONAL INT64 label; }",
    )
    .unwrap();
    let mut buf = Vec::new();
    let props = std::sync::Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(&mut buf, std::sync::Arc::new(schema), props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let text = |v: &[&str]| -> Vec<ByteArray> { v.iter().map(|s| ByteArray::from(*s)).collect() };
    let mut column = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match column {
            0 => col.typed::<ByteArrayType>().write_batch(
                &text(&["He said yes.", "The cat sat.", "Up."]),
                None,
                None,
            ),
            1 => col.typed::<ByteArrayType>().write_batch(
                &text(&["He agreed.", "A dog ran.", "Down."]),
                None,
                None,
            ),
            _ => col
                .typed::<Int64Type>()
                .write_batch(&[1, 0], Some(&[1, 1, 0]), None),
        }
        .unwrap();
        col.close().unwrap();
        column += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
    buf
}

/// The parquet crate panics (out-of-bounds indexing in its RLE decoder) on some corrupt
/// pages; the binary still ends with an error naming the file, not a crash.
#[test]
fn corrupt_parquet_is_an_error_not_a_crash() {
    let tmp = common::tempdir();
    let d = tmp.path().join("data");
    copy_dir(&small_data(), &d);
    std::fs::remove_file(d.join("train.tsv")).unwrap();
    let file = d.join("train-00000-of-00001.parquet");
    let good = parquet_bytes();
    std::fs::write(&file, &good).unwrap();
    let rows = qlora_cls::data::formats::load_split(&d, "train").expect("the good file loads");
    assert_eq!(rows.len(), 3);
    // The first one-byte edit of the pages that makes the decoder itself panic.
    let mut found = None;
    'search: for pos in 4..good.len().min(400) {
        for v in [0u8, 2, 3, 7, 16, 32, 127, 255] {
            let mut bad = good.clone();
            bad[pos] = v;
            std::fs::write(&file, &bad).unwrap();
            if let Err(e) = qlora_cls::data::formats::load_split(&d, "train") {
                if format!("{e:#}").contains("the decoder failed") {
                    found = Some((pos, v));
                    break 'search;
                }
            }
        }
    }
    let (pos, v) = found.expect("no one-byte edit upsets the parquet decoder any more");
    eprintln!("byte {pos} set to {v} makes the parquet decoder panic");
    let e = failed(&train(&model(), &d, &tmp.path().join("r"), &[]));
    has_all(
        &e,
        &[&s(&file), "corrupt parquet file", "the decoder failed"],
    );
}

// ─── 5. prompt ──────────────────────────────────────────────────────────────────────────

#[test]
fn unknown_prompt_name() {
    let tmp = common::tempdir();
    let out = train(
        &model(),
        &small_data(),
        &tmp.path().join("r"),
        &["--prompt", "perfekt"],
    );
    let e = failed(&out);
    has_all(
        &e,
        &[
            "--prompt",
            "key `prompt`",
            "'perfekt'",
            "did you mean 'perfect'",
        ],
    );
    // Refused before anything was written.
    assert!(!tmp.path().join("r").exists());

    // The same from a config file names the file.
    let cfg = tmp.path().join("c.yaml");
    std::fs::write(&cfg, "prompt: insuficient\n").unwrap();
    let e = failed(&train(
        &model(),
        &small_data(),
        &tmp.path().join("r"),
        &["--config", cfg.to_str().unwrap()],
    ));
    has_all(
        &e,
        &[&s(&cfg), "key `prompt`", "did you mean 'insufficient'"],
    );
}

// ─── 6. run folder ──────────────────────────────────────────────────────────────────────

#[test]
fn run_folder_not_writable() {
    // Tests may run as root, which ignores permission bits: a folder below a regular file
    // cannot be created by anyone.
    let tmp = common::tempdir();
    let afile = tmp.path().join("afile");
    std::fs::write(&afile, "not a folder").unwrap();
    let run = afile.join("run");
    let e = failed(&train(&model(), &small_data(), &run, &[]));
    has_all(
        &e,
        &["cannot create the run folder", &s(&run), "Not a directory"],
    );

    // The run folder itself is a regular file.
    let e = failed(&train(&model(), &small_data(), &afile, &[]));
    has_all(&e, &[&s(&afile)]);
    assert_eq!(std::fs::read_to_string(&afile).unwrap(), "not a folder");
}

// ─── 7. full disk ───────────────────────────────────────────────────────────────────────

/// Kilobytes a folder's files take on a page-granular file system (tmpfs).
fn pages_kib(dir: &Path) -> u64 {
    let mut kib = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            kib += pages_kib(&p);
        } else {
            kib += std::fs::metadata(&p).unwrap().len().div_ceil(4096) * 4;
        }
    }
    kib
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Step 1's checkpoint saved, step 2's save hits ENOSPC on a small tmpfs: the run stops
/// with the disk named, step 1's checkpoint is byte-identical to the same run's on a roomy
/// disk, and no half-written checkpoint is left. Needs `mount` (root); where it is refused
/// the library-level tests below are what covers a failed save.
#[test]
fn disk_full_while_saving_a_checkpoint_keeps_the_previous_one() {
    let tmp = common::tempdir();
    let t = tmp.path();
    let args = [
        "--max_steps",
        "3",
        "--checkpoint_every",
        "1",
        "--keep_checkpoints",
        "3",
    ];
    // The same run on a roomy disk, for the reference checkpoint and its size.
    let reference = t.join("reference");
    succeeded(&train(&model(), &small_data(), &reference, &args));
    let ck1 = reference.join("checkpoints/step-00000001");
    let ck_kib = pages_kib(&ck1);
    // config.json, quant_config.json, lora_config.json, metrics.csv, eval.csv: a page each,
    // and one more for metrics.csv's atomic rewrite.
    let size_kib = 6 * 4 + ck_kib + ck_kib / 2;

    let mnt = t.join("small_disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
        .arg(&mnt)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!(
                "NOT COVERED HERE: cannot mount a {size_kib} KiB tmpfs ({other:?}); the full \
                 disk is covered by the library-level tests only"
            );
            return;
        }
    }
    let _unmount = Mount(mnt.clone());
    eprintln!("the run folder is on a {size_kib} KiB tmpfs (one checkpoint: {ck_kib} KiB)");
    let run = mnt.join("run");
    let e = failed(&train(&model(), &small_data(), &run, &args));
    has_all(
        &e,
        &[
            "cannot save the checkpoint of step 2",
            "the previous checkpoints are intact",
            "No space left on device",
            "hint: the disk is full",
        ],
    );
    let kept = resume::list(&run).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let (step, dir) = &kept[0];
    assert_eq!(*step, 1);
    for f in ["trainable.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(ck1.join(f)).unwrap(),
            "{f} of step 1 differs from the reference run's"
        );
    }
    let ck = resume::load(dir).expect("the kept checkpoint loads");
    assert_eq!(ck.state.step, 1);
    // No temporary folder or file is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(run.join(resume::DIR))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And the run continues from it once there is room.
    let moved = t.join("moved");
    std::fs::create_dir_all(moved.join(resume::DIR)).unwrap();
    copy_dir(dir, &moved.join(resume::DIR).join("step-00000001"));
    drop(_unmount);
    succeeded(&train(
        &model(),
        &small_data(),
        &moved,
        &[&args[..], &["--resume", "auto"]].concat(),
    ));
    for f in ["trainable.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(moved.join("checkpoints/step-00000003").join(f)).unwrap(),
            std::fs::read(reference.join("checkpoints/step-00000003").join(f)).unwrap(),
            "{f} of step 3 after resuming differs from the uninterrupted run's"
        );
    }
}

/// Library level: a write that fails (here: its temporary file cannot be created) leaves
/// the file it was replacing untouched and names it.
#[test]
fn failed_atomic_write_leaves_the_old_file() {
    let tmp = common::tempdir();
    let target = tmp.path().join("state.json");
    runio::write_text(&target, "old\n").unwrap();
    let temp = tmp
        .path()
        .join(format!(".state.json.tmp-{}", std::process::id()));
    std::fs::create_dir_all(temp.join("in_the_way")).unwrap();
    let e = format!("{:#}", runio::write_text(&target, "new\n").unwrap_err());
    has_all(&e, &["cannot write", &s(&target)]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
}

/// Library level: a checkpoint save that fails leaves the previous checkpoint as it was and
/// is not listed.
#[test]
fn failed_checkpoint_save_keeps_the_previous_checkpoint() {
    let tmp = common::tempdir();
    let run = tmp.path();
    let state = |step| resume::TrainState {
        step,
        epochs_done: 0,
        batch_in_epoch: step,
        tokens_seen: 100 * step as i64,
        best_accuracy: None,
        train_seconds: 1.0,
        seed: 42,
        patience_counter: 0,
        early_stopped_at: None,
    };
    let w = vec![(
        "score.weight".to_string(),
        tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]),
    )];
    let o = vec![(
        "score.weight.exp_avg".to_string(),
        tch::Tensor::from_slice(&[0.5f32, 0.25]),
    )];
    let first = resume::save(run, &state(1), &w, &o, 2).unwrap();
    let before: Vec<Vec<u8>> = [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    .iter()
    .map(|f| std::fs::read(first.join(f)).unwrap())
    .collect();
    // Step 2's temporary folder cannot be created: something is in its place.
    let blocker = run
        .join(resume::DIR)
        .join(format!(".tmp-step-00000002-{}", std::process::id()));
    std::fs::write(&blocker, "in the way").unwrap();
    let e = format!("{:#}", resume::save(run, &state(2), &w, &o, 1).unwrap_err());
    has_all(
        &e,
        &[
            "cannot save the checkpoint of step 2",
            "previous checkpoints are intact",
        ],
    );
    let after: Vec<Vec<u8>> = [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    .iter()
    .map(|f| std::fs::read(first.join(f)).unwrap())
    .collect();
    assert_eq!(before, after);
    let listed = resume::list(run).unwrap();
    assert_eq!(listed, vec![(1, first.clone())]);
    assert_eq!(resume::latest(run).unwrap(), Some(first.clone()));
    assert_eq!(resume::load(&first).unwrap().state, state(1));
}

// ─── 8. non-finite loss ─────────────────────────────────────────────────────────────────

#[test]
fn non_finite_loss_stops_naming_step_examples_and_checkpoint() {
    let tmp = common::tempdir();
    let run = tmp.path().join("run");
    // Step 1 at lr 1e30 (no warmup) blows the LoRA and head weights up: step 2's loss is NaN.
    let huge = [
        "--lr",
        "1e30",
        "--warmup_ratio",
        "0",
        "--checkpoint_every",
        "1",
        "--max_steps",
        "3",
    ];
    let e = failed(&train(&model(), &small_data(), &run, &huge));
    // The second batch of epoch 1 (training order is a function of seed and epoch); the
    // GLUE TSV has no index column, so idx is the row number.
    let batches = epoch_batches(TRAIN_ROWS, 8, Some(42), 1, None);
    let idx = format!("{:?}", batches[1]);
    let last_good = run.join("checkpoints/step-00000001");
    has_all(
        &e,
        &[
            "non-finite loss NaN at step 2 (epoch 1, batch 2)",
            &format!("the batch's example idx: {idx}"),
            &format!("The last good checkpoint: {}", s(&last_good)),
            "on_nonfinite: skip",
        ],
    );
    assert!(resume::load(&last_good).is_ok());
    assert_eq!(resume::list(&run).unwrap().len(), 1);
    assert!(!run.join("summary.json").exists());
    // metrics.csv holds the good step only.
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");

    // With `on_nonfinite: skip` the same run warns about each bad step and finishes.
    let run = tmp.path().join("skip");
    let out = train(
        &model(),
        &small_data(),
        &run,
        &[&huge[..], &["--on_nonfinite", "skip", "--epochs", "1"]].concat(),
    );
    let e = succeeded(&out);
    for (b, batch) in batches.iter().enumerate().skip(1) {
        has_all(
            &e,
            &[
                &format!(
                    "warning: non-finite loss NaN at step 2 (epoch 1, batch {})",
                    b + 1
                ),
                &format!("the batch's example idx: {batch:?}; step skipped"),
            ],
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 1, "{summary}");
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
}
