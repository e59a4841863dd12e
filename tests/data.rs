//! The data pipeline against its oracles (tests/oracles/data_oracle.py): every MRPC layout
//! read the same as Python's csv/pyarrow read it, token ids and padding equal to Hugging Face
//! `AutoTokenizer`, clear errors on bad data, and deterministic, loadable demo assets.
mod common;

use qlora_cls::data::batch::{collate, encode_examples, epoch_batches, Encoded, TextEncoder};
use qlora_cls::data::formats::{check_labels, load_split, locate_split, Example, Layout};
use qlora_cls::data::long_text::{LongText, Side};
use qlora_cls::data::prompt::{render, resolve_prompt, PROMPTS};
use qlora_cls::demo::write_demo_assets;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

fn oracle(args: &[&str]) -> String {
    common::oracle("data_oracle.py", args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[derive(Deserialize)]
struct Counts {
    rows: usize,
    labels: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct Expected {
    splits: HashMap<String, Vec<Example>>,
    counts: HashMap<String, Counts>,
}

fn label_counts(ex: &[Example]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for e in ex {
        if let Some(l) = e.label {
            *c.entry(l.to_string()).or_insert(0) += 1;
        }
    }
    c
}

fn assert_same(got: &[Example], want: &[Example], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: row {i} differs");
    }
}

#[test]
fn every_layout_reads_mrpc_like_the_oracle() {
    let tmp = common::tempdir();
    let mrpc = common::mrpc_dir();
    oracle(&["layouts", s(&mrpc), s(tmp.path())]);
    let text = fs::read_to_string(tmp.path().join("expected.json")).unwrap();
    let exp: Expected = serde_json::from_str(&text).unwrap();

    let dirs: [(&str, PathBuf, Layout); 4] = [
        ("tsv", mrpc.clone(), Layout::GlueTsv),
        ("parquet", tmp.path().join("parquet"), Layout::Parquet),
        ("csv", tmp.path().join("csv"), Layout::Csv),
        ("jsonl", tmp.path().join("jsonl"), Layout::Jsonl),
    ];
    for (name, dir, layout) in &dirs {
        for split in ["train", "validation", "test"] {
            let (found, _) = locate_split(dir, split).unwrap();
            assert_eq!(found, *layout, "{name}/{split}");
            let got = load_split(dir, split).unwrap();
            assert_same(&got, &exp.splits[split], &format!("{name}/{split}"));
            let c = &exp.counts[split];
            assert_eq!(got.len(), c.rows, "{name}/{split} rows");
            assert_eq!(label_counts(&got), c.labels, "{name}/{split} labels");
        }
        let dev = load_split(dir, "dev").unwrap();
        assert_same(
            &dev,
            &exp.splits["validation"],
            &format!("{name}/dev alias"),
        );
        let both = load_split(dir, "train+validation").unwrap();
        let want: Vec<Example> = exp.splits["train"]
            .iter()
            .chain(&exp.splits["validation"])
            .cloned()
            .collect();
        assert_same(&both, &want, &format!("{name}/train+validation"));
    }

    // The MSR release: the GLUE test pairs with their labels.
    let msr = tmp.path().join("msr");
    assert_eq!(locate_split(&msr, "test").unwrap().0, Layout::Msr);
    let got = load_split(&msr, "test").unwrap();
    assert_same(&got, &exp.splits["msr_test"], "msr/test");
    assert_eq!(got.len(), exp.counts["msr_test"].rows);
    assert_eq!(label_counts(&got), exp.counts["msr_test"].labels);
    // In the real folder both test.tsv and msr_paraphrase_test.txt exist: TSV is preferred.
    assert_eq!(locate_split(&mrpc, "test").unwrap().0, Layout::GlueTsv);

    // Several layouts in one folder: parquet wins over TSV.
    let mixed = tmp.path().join("mixed");
    fs::create_dir(&mixed).unwrap();
    fs::copy(mrpc.join("dev.tsv"), mixed.join("dev.tsv")).unwrap();
    fs::copy(
        tmp.path()
            .join("parquet/mrpc/validation-00000-of-00001.parquet"),
        mixed.join("validation-00000-of-00001.parquet"),
    )
    .unwrap();
    assert_eq!(
        locate_split(&mixed, "validation").unwrap().0,
        Layout::Parquet
    );
    assert_same(
        &load_split(&mixed, "dev").unwrap(),
        &exp.splits["validation"],
        "mixed/dev",
    );
    eprintln!(
        "MRPC per the oracle: train {} {:?}, validation {} {:?}, test {}, msr test {:?}",
        exp.counts["train"].rows,
        exp.counts["train"].labels,
        exp.counts["validation"].rows,
        exp.counts["validation"].labels,
        exp.counts["test"].rows,
        exp.counts["msr_test"].labels
    );
}

#[derive(Deserialize)]
struct HfBatch {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
}

#[derive(Deserialize)]
struct HfTok {
    dir: String,
    class: String,
    pad_id: i64,
    len: usize,
    prompts: HashMap<String, Vec<HfBatch>>,
}

fn tensor_rows(t: &tch::Tensor) -> Vec<Vec<i64>> {
    let size = t.size();
    let flat: Vec<i64> = Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    if size[1] == 0 {
        return vec![Vec::new(); size[0] as usize];
    }
    flat.chunks(size[1] as usize).map(<[i64]>::to_vec).collect()
}

#[test]
fn tokenisation_and_padding_match_hugging_face() {
    let tmp = common::tempdir();
    let mrpc = common::mrpc_dir();
    let demo = tmp.path().join("demo");
    write_demo_assets(&demo).unwrap();
    let demo_tok = demo.join("model");
    let mrpc_tok = tmp.path().join("mrpc-tok");
    oracle(&["train_tokenizer", s(&mrpc), s(&mrpc_tok)]);
    let dev = load_split(&mrpc, "validation").unwrap();

    for (max_length, side) in [(0usize, "right"), (40, "right"), (40, "left")] {
        let out = tmp.path().join(format!("hf-{max_length}-{side}.json"));
        oracle(&[
            "hf_encode",
            s(&mrpc),
            s(&out),
            &format!("{max_length}:{side}"),
            s(&demo_tok),
            s(&mrpc_tok),
        ]);
        let hf: Vec<HfTok> = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(hf.len(), 2);
        for tok in &hf {
            let mut enc =
                TextEncoder::from_dir(Path::new(&tok.dir), (max_length > 0).then_some(max_length))
                    .unwrap();
            enc.set_long_text(LongText {
                side: Side::parse(side).unwrap(),
                ..LongText::truncate(None)
            });
            assert_eq!(enc.pad_id(), tok.pad_id, "{}: pad id", tok.dir);
            assert_eq!(enc.vocab_size(), tok.len, "{}: vocab size", tok.dir);
            assert_eq!(
                enc.max_id() as usize + 1,
                tok.len,
                "{}: ids contiguous",
                tok.dir
            );
            let mut rows = 0;
            for (name, _) in PROMPTS {
                let prompt = resolve_prompt(name).unwrap();
                let encoded = encode_examples(&enc, &dev, &prompt).unwrap().0;
                let want = &tok.prompts[name];
                let refs: Vec<&Encoded> = encoded.iter().collect();
                assert_eq!(refs.chunks(8).count(), want.len());
                for (b, (chunk, w)) in refs.chunks(8).zip(want).enumerate() {
                    let batch = collate(chunk, enc.pad_id());
                    let what = format!(
                        "{} ({}) prompt {name} max_length {max_length} {side} batch {b}",
                        tok.dir, tok.class
                    );
                    assert_eq!(tensor_rows(&batch.input_ids), w.input_ids, "{what}: ids");
                    assert_eq!(
                        tensor_rows(&batch.attention_mask),
                        w.attention_mask,
                        "{what}: mask"
                    );
                    let real: i64 = w.attention_mask.iter().flatten().sum();
                    assert_eq!(batch.n_tokens, real, "{what}: n_tokens");
                    rows += chunk.len();
                }
                // encode (one text) agrees with encode_examples (batched).
                let one = enc.encode(&render(&prompt, &dev[5])).unwrap();
                assert_eq!(one, encoded[5].ids);
            }
            assert_eq!(rows, 4 * dev.len());
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

fn err(dir: &Path, split: &str) -> String {
    format!("{:#}", load_split(dir, split).expect_err("must fail"))
}

const HEADER: &str = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n";

#[test]
fn bad_data_gives_clear_errors() {
    let tmp = common::tempdir();
    let mk = |name: &str| {
        let d = tmp.path().join(name);
        fs::create_dir(&d).unwrap();
        d
    };

    let d = mk("missing-column");
    write(
        &d,
        "train.tsv",
        "Quality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\ta b\n",
    );
    let e = err(&d, "train");
    assert!(
        e.contains("train.tsv") && e.contains("missing column") && e.contains("'#2 String'"),
        "{e}"
    );

    let d = mk("ragged");
    write(
        &d,
        "train.tsv",
        &format!("{HEADER}1\t1\t2\ta\tb\n0\t3\t4\tonly four\n"),
    );
    let e = err(&d, "train");
    assert!(
        e.contains("train.tsv:3") && e.contains("expected 5") && e.contains("found 4"),
        "{e}"
    );

    let d = mk("label");
    write(&d, "train.tsv", &format!("{HEADER}yes\t1\t2\ta\tb\n"));
    let e = err(&d, "train");
    assert!(
        e.contains("train.tsv:2") && e.contains("'yes' is not an integer") && e.contains("Quality"),
        "{e}"
    );

    let d = mk("empty");
    write(&d, "dev.tsv", HEADER);
    let e = err(&d, "dev");
    assert!(e.contains("dev.tsv") && e.contains("empty"), "{e}");

    let d = mk("no-test");
    write(&d, "train.tsv", &format!("{HEADER}1\t1\t2\ta\tb"));
    assert_eq!(
        load_split(&d, "train").unwrap().len(),
        1,
        "no final newline is fine"
    );
    let e = err(&d, "test");
    assert!(
        e.contains("no file for the test split") && e.contains("holds: train.tsv"),
        "{e}"
    );

    let e = err(&d, "training");
    assert!(e.contains("unknown split 'training'"), "{e}");

    let d = mk("csv");
    write(&d, "train.csv", "sentence1,label\na,1\n");
    let e = err(&d, "train");
    assert!(e.contains("train.csv") && e.contains("'sentence2'"), "{e}");
    write(&d, "dev.csv", "sentence1,sentence2,label\na,b,1\nc,d,1.5\n");
    let e = err(&d, "validation");
    assert!(
        e.contains("dev.csv:3") && e.contains("'1.5' is not an integer"),
        "{e}"
    );
    write(&d, "test.csv", "sentence1,sentence2\na,b\nc,d,e\n");
    let e = err(&d, "test");
    assert!(e.contains("test.csv:3") && e.contains("expected 2"), "{e}");

    let d = mk("jsonl");
    write(&d, "train.jsonl", "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": 1}\n{\"sentence1\": \"a\", \"label\": 0}\n");
    let e = err(&d, "train");
    assert!(
        e.contains("train.jsonl:2") && e.contains("missing column 'sentence2'"),
        "{e}"
    );
    write(
        &d,
        "test.jsonl",
        "{\"sentence1\": \"a\", \"sentence2\": \"b\", \"label\": \"pos\"}\n",
    );
    let e = err(&d, "test");
    assert!(
        e.contains("test.jsonl:1") && e.contains("'pos' is not an integer"),
        "{e}"
    );
    write(
        &d,
        "dev.jsonl",
        "{\"sentence1\": \"a\", \"sentence2\": \"b\"\n",
    );
    let e = err(&d, "dev");
    assert!(
        e.contains("dev.jsonl:1") && e.contains("not valid JSON"),
        "{e}"
    );

    // Quotes are ordinary characters, a BOM and CRLF line ends are tolerated, -1 = unlabelled.
    let d = mk("quirks");
    write(
        &d,
        "train.tsv",
        &format!(
            "\u{feff}{}\r\n1\t1\t2\t\"a\tb\"\r\n-1\t3\t4\tc\td\r\n",
            HEADER.trim_end()
        ),
    );
    let got = load_split(&d, "train").unwrap();
    assert_eq!(got[0].sentence1, "\"a");
    assert_eq!(got[0].sentence2, "b\"");
    assert_eq!((got[0].label, got[1].label, got[1].idx), (Some(1), None, 1));

    let ex = vec![
        Example {
            sentence1: "a".into(),
            sentence2: "b".into(),
            label: Some(1),
            idx: 7,
        },
        Example {
            sentence1: "a".into(),
            sentence2: "b".into(),
            label: Some(2),
            idx: 9,
        },
    ];
    check_labels(&ex[..1], 2, "train").unwrap();
    let e = format!("{:#}", check_labels(&ex, 2, "train").unwrap_err());
    assert!(
        e.contains("idx 9") && e.contains("label 2") && e.contains("train"),
        "{e}"
    );
}

#[test]
fn prompts_resolve_and_render_like_python() {
    assert_eq!(resolve_prompt("none").unwrap(), "");
    assert_eq!(
        resolve_prompt("perfect").unwrap(),
        "Does sentence 1 mean the same as sentence 2?"
    );
    assert_eq!(
        resolve_prompt("Conflicting").unwrap(),
        "Bob sent a message to Alice, which one is better?"
    );
    assert_eq!(
        resolve_prompt("insufficient").unwrap(),
        "Cut the crap, what's your GPA?"
    );
    assert_eq!(
        resolve_prompt("Are they equal?").unwrap(),
        "Are they equal?"
    );
    assert_eq!(resolve_prompt("Same?").unwrap(), "Same?");
    assert_eq!(resolve_prompt("").unwrap(), "");
    let e = resolve_prompt("perfekt").unwrap_err().to_string();
    assert!(e.contains("unknown prompt name 'perfekt'"), "{e}");
    assert!(e.contains("did you mean 'perfect'"), "{e}");
    assert!(e.contains("must contain a space"), "{e}");
    let e = resolve_prompt("insuficient").unwrap_err().to_string();
    assert!(e.contains("'insufficient'"), "{e}");

    let ex = Example {
        sentence1: "A b.".into(),
        sentence2: "C \"d\".".into(),
        label: None,
        idx: 0,
    };
    assert_eq!(render("", &ex), " Sentence 1: A b. Sentence 2: C \"d\".");
    assert_eq!(
        render("Q?", &ex),
        "Q? Sentence 1: A b. Sentence 2: C \"d\"."
    );
}

#[test]
fn collate_pads_right_with_the_pad_id() {
    let a = Encoded {
        ids: vec![5, 6, 7],
        label: Some(1.into()),
        idx: 3,
        window: 0,
        rejected: None,
    };
    let b = Encoded {
        ids: vec![8],
        label: Some(0.into()),
        idx: 4,
        window: 0,
        rejected: None,
    };
    let batch = collate(&[&a, &b], 9);
    assert_eq!(
        tensor_rows(&batch.input_ids),
        vec![vec![5, 6, 7], vec![8, 9, 9]]
    );
    assert_eq!(
        tensor_rows(&batch.attention_mask),
        vec![vec![1, 1, 1], vec![1, 0, 0]]
    );
    let labels = Vec::<i64>::try_from(batch.labels.as_ref().unwrap()).unwrap();
    assert_eq!(labels, vec![1, 0]);
    assert_eq!((batch.idx.clone(), batch.n_tokens), (vec![3, 4], 4));
    assert_eq!(batch.input_ids.kind(), tch::Kind::Int64);
    let c = Encoded {
        ids: vec![1],
        label: None,
        idx: 5,
        window: 0,
        rejected: None,
    };
    assert!(collate(&[&a, &c], 0).labels.is_none());
}

fn flat_sorted(batches: &[Vec<usize>]) -> Vec<usize> {
    let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
    all.sort_unstable();
    all
}

#[test]
fn epoch_batches_cover_each_index_once() {
    let n = 1003;
    let plain = epoch_batches(n, 8, None, 0, None);
    assert_eq!(plain.concat(), (0..n).collect::<Vec<_>>());
    assert_eq!(plain.len(), 126);
    assert_eq!(plain.last().unwrap().len(), 3);

    let e0 = epoch_batches(n, 8, Some(42), 0, None);
    assert_eq!(flat_sorted(&e0), (0..n).collect::<Vec<_>>());
    assert_eq!(
        e0,
        epoch_batches(n, 8, Some(42), 0, None),
        "same seed and epoch"
    );
    assert_ne!(e0, epoch_batches(n, 8, Some(42), 1, None), "epochs differ");
    assert_ne!(e0, epoch_batches(n, 8, Some(43), 0, None), "seeds differ");
    assert_ne!(e0.concat(), (0..n).collect::<Vec<_>>());

    // Bucketing: same coverage, far less padding than plain shuffled batches.
    let lengths: Vec<usize> = (0..n).map(|i| 10 + (i * 7919) % 90).collect();
    let padded = |bs: &[Vec<usize>]| -> usize {
        bs.iter()
            .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
            .sum()
    };
    let bucketed = epoch_batches(n, 8, Some(42), 0, Some(&lengths));
    assert_eq!(flat_sorted(&bucketed), (0..n).collect::<Vec<_>>());
    assert!(bucketed.iter().all(|b| !b.is_empty() && b.len() <= 8));
    assert!(
        padded(&bucketed) * 10 < padded(&e0) * 8,
        "{} vs {}",
        padded(&bucketed),
        padded(&e0)
    );
    assert_eq!(bucketed, epoch_batches(n, 8, Some(42), 0, Some(&lengths)));
    let unshuffled = epoch_batches(n, 8, None, 0, Some(&lengths));
    assert_eq!(flat_sorted(&unshuffled), (0..n).collect::<Vec<_>>());
}

fn read_all(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["model", "data"] {
        for e in fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            out.insert(
                format!("{sub}/{}", p.file_name().unwrap().to_string_lossy()),
                fs::read(&p).unwrap(),
            );
        }
    }
    out
}

#[derive(Deserialize)]
struct DemoCheck {
    tokenizer_class: String,
    len_tokenizer: usize,
    bos_id: i64,
    eos_id: i64,
    config_vocab: usize,
    missing: Vec<String>,
    unexpected: Vec<String>,
    mismatched: Vec<Vec<String>>,
    max_weight_diff: f64,
    weight_std_min: f64,
    weight_std_max: f64,
    norms_one: bool,
    logits_shape: Vec<i64>,
    logits_finite: bool,
    first_ids: Vec<i64>,
    rows: Vec<usize>,
    train_labels: BTreeMap<String, usize>,
    dev_labels: BTreeMap<String, usize>,
    test_labelled: bool,
    max_len_none_prompt: usize,
    bow_dev_accuracy: f64,
}

#[test]
fn demo_assets_are_deterministic_and_load_in_transformers() {
    let tmp = common::tempdir();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let t = std::time::Instant::now();
    write_demo_assets(&a).unwrap();
    eprintln!("write_demo_assets: {:.2}s", t.elapsed().as_secs_f64());
    write_demo_assets(&b).unwrap();
    let (fa, fb) = (read_all(&a), read_all(&b));
    let names: Vec<&String> = fa.keys().collect();
    assert_eq!(
        names,
        [
            "data/dev.tsv",
            "data/test.tsv",
            "data/train.tsv",
            "model/config.json",
            "model/model.safetensors",
            "model/tokenizer.json",
            "model/tokenizer_config.json"
        ]
    );
    for (name, bytes) in &fa {
        assert!(fb[name] == *bytes, "{name} differs between two runs");
    }

    let out = tmp.path().join("check.json");
    oracle(&["check_demo", s(&a), s(&out)]);
    let c: DemoCheck = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    let enc = TextEncoder::from_dir(&a.join("model"), None).unwrap();
    eprintln!(
        "demo: {} ({} tokens), rows {:?}, train labels {:?}, dev labels {:?}, bag-of-words dev accuracy {:.3}, longest train text {} tokens",
        c.tokenizer_class, c.len_tokenizer, c.rows, c.train_labels, c.dev_labels, c.bow_dev_accuracy, c.max_len_none_prompt
    );
    assert_eq!(
        c.missing,
        vec!["score.weight".to_string()],
        "only the new head is missing"
    );
    assert!(
        c.unexpected.is_empty() && c.mismatched.is_empty(),
        "{:?} {:?}",
        c.unexpected,
        c.mismatched
    );
    assert_eq!(
        c.max_weight_diff, 0.0,
        "transformers holds exactly the stored weights"
    );
    assert!(c.norms_one);
    assert!(
        (0.018..0.022).contains(&c.weight_std_min) && (0.018..0.022).contains(&c.weight_std_max)
    );
    assert_eq!(c.logits_shape, vec![8, 2]);
    assert!(c.logits_finite);
    assert_eq!(c.len_tokenizer, enc.vocab_size());
    assert_eq!(c.config_vocab, enc.vocab_size());
    assert!(
        (800..=1000).contains(&c.config_vocab),
        "vocab {}",
        c.config_vocab
    );
    assert_eq!(c.eos_id, enc.pad_id());
    assert_eq!(Some(c.bos_id), enc.token_to_id("<|begin_of_text|>"));
    assert_eq!(c.first_ids[0], c.bos_id, "bos prepended");
    assert!(c.max_len_none_prompt < 128);

    // Our reader sees the same data as Python's csv.
    let train = load_split(&a.join("data"), "train").unwrap();
    let dev = load_split(&a.join("data"), "dev").unwrap();
    let test = load_split(&a.join("data"), "test").unwrap();
    assert_eq!(vec![train.len(), dev.len(), test.len()], c.rows);
    assert_eq!(label_counts(&train), c.train_labels);
    assert_eq!(label_counts(&dev), c.dev_labels);
    assert!(!c.test_labelled && test.iter().all(|e| e.label.is_none()));
    let ones = c.train_labels["1"] as f64 / train.len() as f64;
    assert!((0.62..0.74).contains(&ones), "share of label 1: {ones}");
    // Learnable from a lexical signal in sentence 2.
    assert!(
        c.bow_dev_accuracy >= 0.95,
        "bag-of-words dev accuracy {}",
        c.bow_dev_accuracy
    );
    let first = encode_examples(&enc, &dev[..1], PROMPTS[1].1).unwrap().0;
    assert_eq!(first[0].ids, c.first_ids[..first[0].ids.len()]);
}

#[test]
fn comma_and_plus_join_splits_alike() {
    let dir = common::mrpc_dir();
    let plus = qlora_cls::data::formats::load_split(&dir, "train+validation").unwrap();
    let comma = qlora_cls::data::formats::load_split(&dir, "train,validation").unwrap();
    assert_eq!(plus.len(), 3668 + 408);
    assert_eq!(plus, comma);
}

/// The pad token: config.json's `pad_token_id` when the model names one, else EOS (what the
/// reference sets); padding and the pooled position follow it.
#[test]
fn pad_token_is_the_models_own_else_eos() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(tmp.path());
    let model = assets.join("model");
    let cfg = common::config_from(&["--model_dir", model.to_str().unwrap()]);
    let eos = {
        let l = qlora_cls::loader::load_model(&cfg, tch::Device::Cpu).expect("load");
        let eos = l
            .encoder
            .token_to_id(l.encoder.eos_token())
            .expect("eos id");
        assert_eq!(l.encoder.pad_id(), eos, "no pad_token_id: EOS pads");
        assert_eq!(l.model.opts.pad_token_id, eos);
        eos
    };
    let path = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let pad = if eos == 3 { 4 } else { 3 };
    v["pad_token_id"] = serde_json::json!(pad);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let l = qlora_cls::loader::load_model(&cfg, tch::Device::Cpu).expect("load");
    assert_eq!(l.encoder.pad_id(), pad);
    assert_eq!(l.model.opts.pad_token_id, pad);
    v["pad_token_id"] = serde_json::json!(1 << 30);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let err = format!(
        "{:#}",
        qlora_cls::loader::load_model(&cfg, tch::Device::Cpu)
            .err()
            .expect("a pad id outside the vocabulary is refused")
    );
    assert!(
        err.contains("pad_token_id") && err.contains("config.json"),
        "{err}"
    );
}
