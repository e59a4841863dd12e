//! Property-based fuzzing of everything that reads user input: the configuration (YAML file
//! and command-line flags) and every data loader (GLUE TSV, MSR txt, CSV, JSONL, parquet), and
//! the task readers with label inference (custom CSV/JSONL tasks, GLUE tasks' TSV layouts).
//! Each target gets a fixed number of cases from a fixed seed (the same inputs on every run,
//! whatever PROPTEST_* says), and must never panic: bad input is an `anyhow` error with a
//! message that names where the problem is. The number of inputs tried is printed per
//! target (`cargo test --test fuzz -- --nocapture`).
mod common;
use proptest::prelude::*;
use proptest::test_runner::{Config as PConfig, RngAlgorithm, RngSeed, TestCaseError, TestRunner};
use qlora_cls::config::{self, Config, Override};
use qlora_cls::data::examples;
use qlora_cls::data::formats::{check_labels, load_split};
use qlora_cls::task::Task;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn runner(cases: u32, seed: u64) -> TestRunner {
    TestRunner::new(PConfig {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 2000,
        max_global_rejects: 100_000,
        ..PConfig::default()
    })
}

/// Runs `check` on `cases` inputs; fails the test on a panic or a failed check (shrunk to a
/// minimal input); prints how many inputs were tried and how many were refused with an error.
fn fuzz<S: Strategy>(
    target: &str,
    cases: u32,
    seed: u64,
    strategy: S,
    check: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    let tried = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (t, r) = (tried.clone(), refused.clone());
    let result = runner(cases, seed).run(&strategy, move |v| {
        t.fetch_add(1, Ordering::Relaxed);
        if !check(v)? {
            r.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
    let (n, refused) = (
        tried.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    println!("fuzz {target}: {n} inputs tried ({refused} refused with an error, none panicked)");
    assert!(n >= cases as usize, "{target}: only {n} inputs tried");
}

/// An error must say something, and name `must_name` (the file or flag at fault).
fn check_error(e: &anyhow::Error, must_name: &[&str]) -> Result<(), TestCaseError> {
    let msg = format!("{e:#}");
    prop_assert!(!msg.trim().is_empty(), "empty error message");
    prop_assert!(
        must_name.iter().any(|n| msg.contains(n)),
        "error does not name any of {must_name:?}: {msg}"
    );
    Ok(())
}

// ─── configuration ──────────────────────────────────────────────────────────────────────

fn keys() -> Vec<String> {
    config::keys()
}

/// YAML scalars and collections, valid and not, near the edges of every key's type.
fn yaml_value() -> BoxedStrategy<String> {
    let fixed: Vec<&'static str> = vec![
        "null",
        "~",
        "true",
        "false",
        "yes",
        "0",
        "-1",
        "1",
        "2",
        "64",
        "4097",
        "0.5",
        "1.0",
        "-0.0",
        "1e400",
        "-1e400",
        ".nan",
        ".inf",
        "-.inf",
        "18446744073709551616",
        "9223372036854775807",
        "-9223372036854775808",
        "[]",
        "{}",
        "[q_proj, v_proj]",
        "[q_proj, nope]",
        "[1, 2]",
        "{a: 1}",
        "\"\"",
        "''",
        "cuda",
        "cuda:0",
        "cuda:1",
        "cuda:99999999999999999999",
        "cuda:-1",
        "cpu",
        "auto",
        "nf4",
        "fp4",
        "adamw",
        "adamw8bit",
        "sgd",
        "stop",
        "skip",
        "perfect",
        "perfekt",
        "\"Are these the same?\"",
        "bfloat16",
        "float64",
        "mrpc",
        "/nonexistent/folder",
        ".",
        "&a 1",
        "*a",
        "*undefined",
        "!!binary aGVsbG8=",
        "!!int x",
        "|\n  block\n  text",
        ">\n  folded",
        "[unclosed",
        "{unclosed: 1",
        "'unterminated",
        "\"\\uD800\"",
        "\"\\xff\"",
    ];
    prop_oneof![
        4 => proptest::sample::select(fixed).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:e}")),
        1 => "[a-zA-Z0-9_ :./,\\-]{0,20}",
        1 => "\\PC{0,20}",
    ]
    .boxed()
}

fn yaml_key() -> BoxedStrategy<String> {
    let known = keys();
    prop_oneof![
        6 => proptest::sample::select(known),
        1 => "[a-z_]{1,16}",
        1 => proptest::sample::select(vec!["<<", "? [a]", "1", "null", "\"model_dir\"", "- x", "batch-size", "Batch_Size"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

/// A YAML document: mostly `key: value` lines, sometimes mangled, sometimes noise.
fn yaml_doc() -> BoxedStrategy<Vec<u8>> {
    let lines =
        proptest::collection::vec((yaml_key(), yaml_value(), 0usize..4, any::<bool>()), 0..10)
            .prop_map(|items| {
                let mut text = String::new();
                for (k, v, indent, colon) in items {
                    text.push_str(&" ".repeat(indent * (indent % 2)));
                    text.push_str(&k);
                    text.push_str(if colon { ": " } else { " " });
                    text.push_str(&v);
                    text.push('\n');
                }
                text.into_bytes()
            });
    prop_oneof![
        6 => lines,
        1 => "\\PC{0,200}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => proptest::sample::select(vec!["", "---", "[]", "- a\n- b", "42", "!!map {}", "a: &x [*x]", "? a\n: b"])
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
    .boxed()
}

#[test]
fn fuzz_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let shown = path.display().to_string();
    fuzz("Config::load(YAML file)", 2000, 1, yaml_doc(), |text| {
        std::fs::write(&path, &text).unwrap();
        match Config::load(Some(&path), &[]) {
            Ok(_) => Ok(true),
            Err(e) => {
                check_error(&e, &[&shown])?;
                Ok(false)
            }
        }
    });
}

fn flag_tokens() -> BoxedStrategy<Vec<String>> {
    let token = prop_oneof![
        3 => (yaml_key(), yaml_value()).prop_map(|(k, v)| format!("--{k}={v}")),
        3 => yaml_key().prop_map(|k| format!("--{k}")),
        3 => yaml_value(),
        1 => proptest::sample::select(vec!["--", "-x", "--=", "--=1", "---", "-", "--config"])
            .prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ];
    proptest::collection::vec(token, 0..10).boxed()
}

#[test]
fn fuzz_config_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.yaml");
    std::fs::write(&path, "batch_size: 4\nprompt: none\n").unwrap();
    fuzz(
        "parse_flags + Config::load(overrides)",
        2000,
        2,
        (flag_tokens(), any::<bool>()),
        |(args, with_file)| {
            let overrides: Vec<Override> = match config::parse_flags(&args) {
                Ok(o) => o,
                Err(e) => {
                    check_error(&e, &["argument"])?;
                    return Ok(false);
                }
            };
            let file = with_file.then_some(path.as_path());
            match Config::load(file, &overrides) {
                Ok(_) => Ok(true),
                // Every value that is not a default came from a flag (or the file): the
                // message names it.
                Err(e) => {
                    check_error(&e, &["--", "base.yaml"])?;
                    Ok(false)
                }
            }
        },
    );
}

// ─── data loaders ───────────────────────────────────────────────────────────────────────

/// An edit of a valid file: the interesting bytes for every format, at random places.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let piece = prop_oneof![
        proptest::sample::select(vec![
            &b"\t"[..],
            b"\n",
            b"\r\n",
            b"\r",
            b"\"",
            b",",
            b"{",
            b"}",
            b"[",
            b":",
            b"-1",
            b"2",
            b"null",
            b"99999999999999999999",
            b"-9223372036854775808",
            b"1.5",
            b"\xff",
            b"\xc3",
            b"\xef\xbb\xbf",
            b"\0",
            b"\\",
            b"\\u0000",
            b"\"label\": \"x\"",
        ])
        .prop_map(<[u8]>::to_vec),
        proptest::collection::vec(any::<u8>(), 1..16),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), piece).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1usize..200).prop_map(|(p, n)| Mutation::Duplicate(p, n)),
    ]
}

fn apply(seed: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in edits {
        let at = |p: usize, b: &Vec<u8>| if b.is_empty() { 0 } else { p % (b.len() + 1) };
        match m {
            Mutation::Set(p, v) => {
                if !b.is_empty() {
                    let i = p % b.len();
                    b[i] = *v;
                }
            }
            Mutation::Insert(p, piece) => {
                let i = at(*p, &b);
                b.splice(i..i, piece.iter().copied());
            }
            Mutation::Delete(p, n) => {
                let i = at(*p, &b);
                let j = (i + n).min(b.len());
                b.drain(i..j);
            }
            Mutation::Truncate(p) => {
                let i = at(*p, &b);
                b.truncate(i);
            }
            Mutation::Duplicate(p, n) => {
                let i = at(*p, &b);
                let j = (i + n).min(b.len());
                let copy = b[i..j].to_vec();
                b.splice(j..j, copy);
            }
        }
    }
    b
}

/// A file's bytes: a valid `seed` mutated a little, or noise.
fn contents(seed: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(mutation(), 1..6).prop_map(move |m| apply(&seed, &m)),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => "\\PC{0,300}".prop_map(String::into_bytes),
    ]
    .boxed()
}

/// Writes `bytes` as `file` in a fresh folder and loads the train split from it.
fn check_loader(dir: &Path, file: &str, bytes: &[u8]) -> Result<bool, TestCaseError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    match load_split(dir, "train") {
        Ok(examples) => {
            prop_assert!(!examples.is_empty(), "an empty split was accepted");
            // Labels are range-checked separately; that must not panic either.
            if let Err(e) = check_labels(&examples, 2, file) {
                check_error(&e, &[file])?;
            }
            Ok(true)
        }
        Err(e) => {
            check_error(&e, &[&path.display().to_string()])?;
            Ok(false)
        }
    }
}

const GLUE_TSV: &str = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n\
1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" , of deliberately distorting his evidence .\tReferring to him as only \" the witness \" , Amrozi accused his brother of deliberately distorting his evidence .\n\
0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in 1998 for $ 2.5 billion .\tYucaipa bought Dominick 's in 1995 for $ 693 million and sold it to Safeway for $ 1.8 billion in 1998 .\n\
1\t1330381\t1330521\tThey had published an advertisement on the Internet on June 10 , offering the cargo for sale , he added .\tOn June 10 , the ship 's owners had published an advertisement on the Internet , offering the explosives for sale .\n";

const GLUE_TEST_TSV: &str = "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n\
0\t1089874\t1089925\tPCCW 's chief operating officer , Mike Butcher , and Alex Arena , the chief financial officer , will report directly to Mr So .\tCurrent Chief Operating Officer Mike Butcher and Group Chief Financial Officer Alex Arena will report to So .\n\
1\t3019446\t3019327\tThe world 's two largest automakers said their U.S. sales declined more than predicted last month as a late summer sales frenzy caused more of an industry backlash than expected .\tDomestic sales at both GM and No. 2 Ford Motor Co. declined more than predicted as a late summer sales frenzy prompted a larger-than-expected industry backlash .\n";

const CSV: &str = "sentence1,sentence2,label,idx\n\
\"He said \"\"yes\"\", then left.\",He agreed and left.,1,0\n\
The cat sat.,\"A dog, barking, ran.\",0,1\n\
Prices rose 5 %.,Prices fell.,,2\n";

const JSONL: &str =
    "{\"sentence1\": \"He said yes.\", \"sentence2\": \"He agreed.\", \"label\": 1, \"idx\": 0}\n\
{\"sentence1\": \"The cat sat.\", \"sentence2\": \"A dog ran.\", \"label\": 0, \"idx\": 1}\n\
{\"sentence1\": \"Prices rose.\", \"sentence2\": \"Prices fell.\", \"label\": null}\n";

#[test]
fn fuzz_glue_tsv() {
    let dir = tempfile::tempdir().unwrap();
    let seed = prop_oneof![
        3 => Just(GLUE_TSV.as_bytes().to_vec()),
        1 => Just(GLUE_TEST_TSV.as_bytes().to_vec()),
    ];
    let strategy = seed.prop_flat_map(contents);
    fuzz("load_split(GLUE TSV)", 800, 3, strategy, |bytes| {
        check_loader(&dir.path().join("d"), "train.tsv", &bytes)
    });
}

#[test]
fn fuzz_msr_txt() {
    let dir = tempfile::tempdir().unwrap();
    // The MSR release: the same columns, with a byte-order mark and CRLF line ends.
    let seed = format!("\u{feff}{}", GLUE_TSV.replace('\n', "\r\n"));
    fuzz(
        "load_split(MSR txt)",
        500,
        4,
        contents(seed.into_bytes()),
        |bytes| check_loader(&dir.path().join("d"), "msr_paraphrase_train.txt", &bytes),
    );
}

#[test]
fn fuzz_csv() {
    let dir = tempfile::tempdir().unwrap();
    fuzz(
        "load_split(CSV)",
        800,
        5,
        contents(CSV.as_bytes().to_vec()),
        |bytes| check_loader(&dir.path().join("d"), "train.csv", &bytes),
    );
}

#[test]
fn fuzz_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    fuzz(
        "load_split(JSONL)",
        800,
        6,
        contents(JSONL.as_bytes().to_vec()),
        |bytes| check_loader(&dir.path().join("d"), "train.jsonl", &bytes),
    );
}

/// A valid Hugging Face-style parquet file (sentence1, sentence2, label, idx), written with
/// the parquet crate's own writer.
fn parquet_bytes() -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = parse_message_type(
        "message schema { REQUIRED BINARY sentence1 (UTF8); REQUIRED BINARY sentence2 (UTF8); \
         OPTIONAL INT64 label; REQUIRED INT32 idx; }",
    )
    .unwrap();
    let mut buf = Vec::new();
    {
        let mut w = SerializedFileWriter::new(
            &mut buf,
            std::sync::Arc::new(schema),
            std::sync::Arc::new(WriterProperties::builder().build()),
        )
        .unwrap();
        let mut rg = w.next_row_group().unwrap();
        let s1: Vec<ByteArray> = ["He said yes.", "The cat sat.", "Prices rose."]
            .iter()
            .map(|s| ByteArray::from(*s))
            .collect();
        let s2: Vec<ByteArray> = ["He agreed.", "A dog ran.", "Prices fell."]
            .iter()
            .map(|s| ByteArray::from(*s))
            .collect();
        let mut column = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            match column {
                0 => {
                    col.typed::<ByteArrayType>()
                        .write_batch(&s1, None, None)
                        .unwrap();
                }
                1 => {
                    col.typed::<ByteArrayType>()
                        .write_batch(&s2, None, None)
                        .unwrap();
                }
                2 => {
                    col.typed::<Int64Type>()
                        .write_batch(&[1, 0], Some(&[1, 1, 0]), None)
                        .unwrap();
                }
                _ => {
                    col.typed::<Int32Type>()
                        .write_batch(&[0, 1, 2], None, None)
                        .unwrap();
                }
            }
            col.close().unwrap();
            column += 1;
        }
        rg.close().unwrap();
        w.close().unwrap();
    }
    buf
}

#[test]
fn fuzz_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let good = parquet_bytes();
    // The seed itself loads: the mutations below start from a real file.
    let d = dir.path().join("seed");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("train-00000-of-00001.parquet"), &good).unwrap();
    let rows = load_split(&d, "train").expect("the seed parquet file loads");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].label, None);

    // Every truncation of the file, then random edits (footer and page headers included).
    let len = good.len();
    let mut truncated = 0;
    for cut in 0..len {
        let ok = check_loader(
            &dir.path().join("t"),
            "train-00000-of-00001.parquet",
            &good[..cut],
        )
        .unwrap_or_else(|e| panic!("parquet cut at {cut} of {len} bytes: {e}"));
        assert!(!ok, "a parquet file cut at {cut} of {len} bytes loaded");
        truncated += 1;
    }
    println!("fuzz load_split(parquet, truncated): {truncated} inputs tried (every prefix)");
    let tail_heavy = {
        let good = good.clone();
        let len = good.len();
        // Half the edits land in the last 200 bytes (footer metadata), where parsers break.
        proptest::collection::vec(
            (mutation(), any::<bool>()).prop_map(move |(m, tail)| match (m, tail) {
                (Mutation::Set(p, b), true) => Mutation::Set(len.saturating_sub(200) + p % 200, b),
                (m, _) => m,
            }),
            1..4,
        )
        .prop_map(move |ms| apply(&good, &ms))
    };
    let decoder_panics = AtomicUsize::new(0);
    fuzz(
        "load_split(parquet, edited)",
        1000,
        7,
        tail_heavy,
        |bytes| {
            let r = check_loader(
                &dir.path().join("e"),
                "train-00000-of-00001.parquet",
                &bytes,
            );
            // How many of the refusals were the parquet crate's own panics, caught.
            if let Err(e) = load_split(&dir.path().join("e"), "train") {
                if format!("{e:#}").contains("decoder failed") {
                    decoder_panics.fetch_add(1, Ordering::Relaxed);
                }
            }
            r
        },
    );
    println!(
        "  of which {} were decoder panics turned into errors",
        decoder_panics.load(Ordering::Relaxed)
    );
}

// ─── task readers (custom and GLUE tasks) ────────────────────────────────────────────────

/// Writes `bytes` as `file` and reads the train split for `task`, then infers its labels and
/// encodes the targets as training does: every refusal names the file.
fn check_task_loader(
    dir: &Path,
    file: &str,
    bytes: &[u8],
    task: &Task,
) -> Result<bool, TestCaseError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    let name = path.display().to_string();
    let examples = match examples::load_split(dir, task, "train", true) {
        Ok(ex) => ex,
        Err(e) => {
            check_error(&e, &[&name])?;
            return Ok(false);
        }
    };
    prop_assert!(!examples.is_empty(), "an empty split was accepted");
    let spec = match examples::infer_labels(task, &examples) {
        Ok(spec) => spec,
        Err(e) => {
            check_error(&e, &[&name])?;
            return Ok(false);
        }
    };
    match examples::targets(&spec, task, &examples) {
        Ok(t) => {
            prop_assert_eq!(t.len(), examples.len());
            Ok(true)
        }
        Err(e) => {
            check_error(&e, &[&name])?;
            Ok(false)
        }
    }
}

#[test]
fn fuzz_custom_task_files() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let cases: [Case; 4] = [
        (
            // String labels, a renamed text column, quoting.
            "train.csv",
            "id,headline,topic\n1,Sales at Acme rose 3 percent.,sales\n\
             2,\"Shares, of Hooli, fell.\",shares\n3,\"Profit \"\"jumped\"\".\",profit\n",
            vec![("text_columns", "headline"), ("label_column", "topic")],
        ),
        (
            // Multi-label as `|`-joined names in CSV.
            "train.csv",
            "text,tags\nSales and shares rose.,sales|shares\nProfit fell.,profit\nNothing.,\n",
            vec![
                ("text_columns", "text"),
                ("label_column", "tags"),
                ("problem_type", "multi_label_classification"),
            ],
        ),
        (
            // Lists of names in JSONL.
            "train.jsonl",
            "{\"text\": \"Sales rose.\", \"tags\": [\"sales\"]}\n\
             {\"text\": \"Shares and profit fell.\", \"tags\": [\"shares\", \"profit\"]}\n",
            vec![("text_columns", "text"), ("label_column", "tags")],
        ),
        (
            // A float target, two text columns.
            "train.jsonl",
            "{\"a\": \"A man is dancing.\", \"b\": \"A man dances.\", \"score\": 4.5}\n\
             {\"a\": \"A cat sat.\", \"b\": \"Stocks fell.\", \"score\": 0.25}\n",
            vec![("text_columns", "a,b"), ("label_column", "score")],
        ),
    ];
    for (i, (file, seed, flags)) in cases.into_iter().enumerate() {
        let mut flags = flags;
        flags.push(("task", "custom"));
        let task = common::task(&flags);
        // The seed itself loads.
        let seed_dir = dir.path().join(format!("seed{i}"));
        assert!(
            check_task_loader(&seed_dir, file, seed.as_bytes(), &task).unwrap(),
            "seed {i} ({file}) does not load"
        );
        let d = dir.path().join(format!("c{i}"));
        fuzz(
            &format!("custom task {file} #{i}"),
            300,
            20 + i as u64,
            contents(seed.as_bytes().to_vec()),
            |bytes| check_task_loader(&d, file, &bytes, &task),
        );
    }
}

#[test]
fn fuzz_glue_task_tsv() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            // CoLA's train file has no header line.
            "cola",
            "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
        ),
        (
            "mnli",
            "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n\
             0\t1\t1e\tslate\tThe new rights are nice.\tEveryone likes them.\tneutral\tneutral\n\
             1\t2\t2c\tfiction\tThis site has a list.\tThere is no list.\tcontradiction\tcontradiction\n",
        ),
        (
            "stsb",
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n\
             0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man dances.\t5.000\n",
        ),
    ];
    for (i, (name, seed)) in cases.into_iter().enumerate() {
        let task = common::task(&[("task", name)]);
        let seed_dir = dir.path().join(format!("seed{i}"));
        assert!(
            check_task_loader(&seed_dir, "train.tsv", seed.as_bytes(), &task).unwrap(),
            "{name}: the seed does not load"
        );
        let d = dir.path().join(format!("g{i}"));
        fuzz(
            &format!("GLUE {name} TSV"),
            300,
            30 + i as u64,
            contents(seed.as_bytes().to_vec()),
            |bytes| check_task_loader(&d, "train.tsv", &bytes, &task),
        );
    }
}
