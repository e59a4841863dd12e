//! Task data without a model: every GLUE task's fixture read in both of its layouts (GLUE's
//! own TSV and the HF `glue/<task>` parquet) to the same examples; custom tasks' label types
//! and inference; the bad-input errors, each naming the file, the row and the column.
mod common;
use common::task;
use qlora_cls::data::examples::{infer_labels, load_split, targets, TaskExample};
use qlora_cls::labels::Target;
use qlora_cls::labels::{LabelSpec, ProblemType};
use qlora_cls::task::Task;
use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn to_parquet(jsonl: &Path, parquet: &Path) {
    common::oracle(
        "tasks_oracle.py",
        &[
            "to_parquet",
            jsonl.to_str().unwrap(),
            parquet.to_str().unwrap(),
        ],
    );
}

/// One GLUE task's fixture: its TSV (GLUE's layout) and the same rows in HF's columns.
struct Glue {
    name: &'static str,
    split: &'static str,
    tsv_file: &'static str,
    tsv: &'static str,
    hf_rows: &'static [&'static str],
    /// (texts, target, idx) each layout must give.
    want: Vec<(Vec<&'static str>, Target, i64)>,
}

fn glue_fixtures() -> Vec<Glue> {
    use Target::{Class, Value};
    vec![
        Glue {
            name: "cola",
            split: "train",
            tsv_file: "train.tsv",
            // No header line; columns: source, label, original label, sentence.
            tsv: "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
            hf_rows: &[
                r#"{"sentence": "Our friends won't buy this analysis.", "label": 1, "idx": 0}"#,
                r#"{"sentence": "They drank the pub.", "label": 0, "idx": 1}"#,
            ],
            want: vec![
                (vec!["Our friends won't buy this analysis."], Class(1), 0),
                (vec!["They drank the pub."], Class(0), 1),
            ],
        },
        Glue {
            name: "sst2",
            split: "validation",
            tsv_file: "dev.tsv",
            tsv: "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak\t0\n",
            hf_rows: &[
                r#"{"sentence": "it 's a charming journey . ", "label": 1, "idx": 0}"#,
                r#"{"sentence": "unflinchingly bleak", "label": 0, "idx": 1}"#,
            ],
            want: vec![
                (vec!["it 's a charming journey . "], Class(1), 0),
                (vec!["unflinchingly bleak"], Class(0), 1),
            ],
        },
        Glue {
            name: "qqp",
            split: "train",
            tsv_file: "train.tsv",
            tsv: "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n\
                  7\t15\t16\tHow do I learn Rust?\tWhat is the best way to learn Rust?\t1\n\
                  9\t19\t20\tWhy is the sky blue?\tWhat is a \"tensor\"?\t0\n",
            hf_rows: &[
                r#"{"question1": "How do I learn Rust?", "question2": "What is the best way to learn Rust?", "label": 1, "idx": 7}"#,
                r#"{"question1": "Why is the sky blue?", "question2": "What is a \"tensor\"?", "label": 0, "idx": 9}"#,
            ],
            want: vec![
                (
                    vec!["How do I learn Rust?", "What is the best way to learn Rust?"],
                    Class(1),
                    7,
                ),
                (
                    vec!["Why is the sky blue?", "What is a \"tensor\"?"],
                    Class(0),
                    9,
                ),
            ],
        },
        Glue {
            name: "stsb",
            split: "validation",
            tsv_file: "dev.tsv",
            tsv: "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n\
                  0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\tA man wearing a hard hat is dancing.\t5.000\n\
                  1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\tA child is riding a horse.\t4.750\n",
            hf_rows: &[
                r#"{"sentence1": "A man with a hard hat is dancing.", "sentence2": "A man wearing a hard hat is dancing.", "label": 5.0, "idx": 0}"#,
                r#"{"sentence1": "A young child is riding a horse.", "sentence2": "A child is riding a horse.", "label": 4.75, "idx": 1}"#,
            ],
            want: vec![
                (
                    vec![
                        "A man with a hard hat is dancing.",
                        "A man wearing a hard hat is dancing.",
                    ],
                    Value(5.0),
                    0,
                ),
                (
                    vec!["A young child is riding a horse.", "A child is riding a horse."],
                    Value(4.75),
                    1,
                ),
            ],
        },
        Glue {
            name: "mnli",
            split: "validation_matched",
            tsv_file: "dev_matched.tsv",
            tsv: "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n\
                  0\t63735\t63735n\tslate\t( ( The ) )\t( ( A ) )\t(ROOT)\t(ROOT)\tThe new rights are nice enough\tEveryone really likes the newest benefits \tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n\
                  1\t91383\t91383c\tgovernment\t( x )\t( y )\t(ROOT)\t(ROOT)\tThis site includes a list.\tThe Government Executive articles are not on the website.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n",
            hf_rows: &[
                r#"{"premise": "The new rights are nice enough", "hypothesis": "Everyone really likes the newest benefits ", "label": 1, "idx": 0}"#,
                r#"{"premise": "This site includes a list.", "hypothesis": "The Government Executive articles are not on the website.", "label": 2, "idx": 1}"#,
            ],
            want: vec![
                (
                    vec![
                        "The new rights are nice enough",
                        "Everyone really likes the newest benefits ",
                    ],
                    Class(1),
                    0,
                ),
                (
                    vec![
                        "This site includes a list.",
                        "The Government Executive articles are not on the website.",
                    ],
                    Class(2),
                    1,
                ),
            ],
        },
        Glue {
            name: "qnli",
            split: "train",
            tsv_file: "train.tsv",
            tsv: "index\tquestion\tsentence\tlabel\n\
                  0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it, it was set in reality.\tnot_entailment\n\
                  1\tWhat is the capital of France?\tParis is the capital of France.\tentailment\n",
            hf_rows: &[
                r#"{"question": "When did the third Digimon series begin?", "sentence": "Unlike the two seasons before it, it was set in reality.", "label": 1, "idx": 0}"#,
                r#"{"question": "What is the capital of France?", "sentence": "Paris is the capital of France.", "label": 0, "idx": 1}"#,
            ],
            want: vec![
                (
                    vec![
                        "When did the third Digimon series begin?",
                        "Unlike the two seasons before it, it was set in reality.",
                    ],
                    Class(1),
                    0,
                ),
                (
                    vec![
                        "What is the capital of France?",
                        "Paris is the capital of France.",
                    ],
                    Class(0),
                    1,
                ),
            ],
        },
        Glue {
            name: "rte",
            split: "validation",
            tsv_file: "dev.tsv",
            tsv: "index\tsentence1\tsentence2\tlabel\n\
                  0\tDana Reeve died of lung cancer.\tChristopher Reeve had an accident.\tnot_entailment\n\
                  1\tYet, we now are discovering that antibiotics are losing their effectiveness.\tBacteria is winning the war against antibiotics.\tentailment\n",
            hf_rows: &[
                r#"{"sentence1": "Dana Reeve died of lung cancer.", "sentence2": "Christopher Reeve had an accident.", "label": 1, "idx": 0}"#,
                r#"{"sentence1": "Yet, we now are discovering that antibiotics are losing their effectiveness.", "sentence2": "Bacteria is winning the war against antibiotics.", "label": 0, "idx": 1}"#,
            ],
            want: vec![
                (
                    vec![
                        "Dana Reeve died of lung cancer.",
                        "Christopher Reeve had an accident.",
                    ],
                    Class(1),
                    0,
                ),
                (
                    vec![
                        "Yet, we now are discovering that antibiotics are losing their effectiveness.",
                        "Bacteria is winning the war against antibiotics.",
                    ],
                    Class(0),
                    1,
                ),
            ],
        },
        Glue {
            name: "wnli",
            split: "train",
            tsv_file: "train.tsv",
            tsv: "index\tsentence1\tsentence2\tlabel\n\
                  0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1\n\
                  1\tJohn couldn't see the stage.\tThe stage couldn't see.\t0\n",
            hf_rows: &[
                r#"{"sentence1": "I stuck a pin through a carrot.", "sentence2": "The carrot had a hole.", "label": 1, "idx": 0}"#,
                r#"{"sentence1": "John couldn't see the stage.", "sentence2": "The stage couldn't see.", "label": 0, "idx": 1}"#,
            ],
            want: vec![
                (
                    vec!["I stuck a pin through a carrot.", "The carrot had a hole."],
                    Class(1),
                    0,
                ),
                (
                    vec!["John couldn't see the stage.", "The stage couldn't see."],
                    Class(0),
                    1,
                ),
            ],
        },
    ]
}

fn glue_spec(t: &Task) -> LabelSpec {
    let problem = t.problem_type.expect("GLUE tasks name their problem type");
    LabelSpec {
        problem_type: problem,
        names: t
            .labels
            .clone()
            .unwrap_or_else(|| vec!["LABEL_0".to_string()]),
    }
}

fn examples_as(t: &Task, got: &[TaskExample]) -> Vec<(Vec<String>, Target, i64)> {
    let spec = glue_spec(t);
    let tg = targets(&spec, t, got).expect("targets");
    got.iter()
        .zip(tg)
        .map(|(e, t)| (e.texts.clone(), t.expect("labelled"), e.idx))
        .collect()
}

#[test]
fn every_glue_task_reads_the_same_from_its_tsv_and_hf_parquet() {
    let tmp = common::tempdir();
    let fixtures = glue_fixtures();
    assert_eq!(
        fixtures.len(),
        8,
        "MRPC's real files are tested in tests/data.rs"
    );
    for g in fixtures {
        let t = task(&[("task", g.name)]);
        let tsv_dir = tmp.path().join("tsv").join(g.name);
        write(&tsv_dir.join(g.tsv_file), g.tsv);
        // HF's layout: `<task>/<split>-00000-of-00001.parquet`.
        let hf_dir = tmp.path().join("hf");
        let jsonl = tmp.path().join(format!("{}.jsonl", g.name));
        write(&jsonl, &(g.hf_rows.join("\n") + "\n"));
        let parquet = hf_dir
            .join(g.name)
            .join(format!("{}-00000-of-00001.parquet", g.split));
        std::fs::create_dir_all(parquet.parent().unwrap()).unwrap();
        to_parquet(&jsonl, &parquet);
        let want: Vec<(Vec<String>, Target, i64)> = g
            .want
            .iter()
            .map(|(texts, t, i)| (texts.iter().map(|s| s.to_string()).collect(), t.clone(), *i))
            .collect();
        for (layout, dir) in [("GLUE TSV", &tsv_dir), ("HF parquet", &hf_dir)] {
            let got = load_split(dir, &t, g.split, true)
                .unwrap_or_else(|e| panic!("{} {layout}: {e:#}", g.name));
            assert_eq!(examples_as(&t, &got), want, "{} {layout}", g.name);
        }
    }
}

#[test]
fn glue_test_files_read_unlabelled() {
    let tmp = common::tempdir();
    write(
        &tmp.path().join("test.tsv"),
        "index\tsentence\n0\tBill whistled past the house.\n1\tThe car honked.\n",
    );
    let t = task(&[("task", "cola")]);
    let got = load_split(tmp.path(), &t, "test", false).unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|e| e.label.is_none()));
    assert_eq!(
        (got[1].idx, got[1].texts[0].as_str()),
        (1, "The car honked.")
    );
    let e = format!(
        "{:#}",
        load_split(tmp.path(), &t, "test", true).unwrap_err()
    );
    assert!(e.contains("test.tsv") && e.contains("'label'"), "{e}");
}

fn custom(dir: &Path, file: &str, text: &str, flags: &[(&str, &str)]) -> (Task, Vec<TaskExample>) {
    write(&dir.join(file), text);
    let mut all = vec![("task", "custom")];
    all.extend_from_slice(flags);
    let t = task(&all);
    let ex = load_split(dir, &t, "train", true).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    (t, ex)
}

#[test]
fn custom_labels_infer_the_problem_type_as_transformers_does() {
    let tmp = common::tempdir();
    // Strings → single-label, names sorted.
    let (t, ex) = custom(
        &tmp.path().join("a"),
        "train.csv",
        "ticket,team\nprinter on fire,hardware\nforgot password,accounts\nscreen cracked,hardware\n",
        &[("text_columns", "ticket"), ("label_column", "team")],
    );
    let spec = infer_labels(&t, &ex).unwrap();
    assert_eq!(spec.problem_type, ProblemType::SingleLabel);
    assert_eq!(spec.names, ["accounts", "hardware"]);
    let tg = targets(&spec, &t, &ex).unwrap();
    assert_eq!(tg[1], Some(Target::Class(0)));
    // `|`-separated names in CSV → multi-label (a single name is a list of one).
    let (t, ex) = custom(
        &tmp.path().join("b"),
        "train.csv",
        "text,tags\nbig and red,big|red\nsmall,small\n",
        &[("text_columns", "text"), ("label_column", "tags")],
    );
    let spec = infer_labels(&t, &ex).unwrap();
    assert_eq!(spec.problem_type, ProblemType::MultiLabel);
    assert_eq!(spec.names, ["big", "red", "small"]);
    let tg = targets(&spec, &t, &ex).unwrap();
    assert_eq!(tg[0], Some(Target::Multi(vec![1.0, 1.0, 0.0])));
    // Floats → regression; integers → classes; two text columns and a custom template.
    let (t, ex) = custom(
        &tmp.path().join("c"),
        "train.jsonl",
        "{\"q\": \"a\", \"d\": \"b\", \"y\": 0.5}\n{\"q\": \"c\", \"d\": \"e\", \"y\": 2}\n",
        &[
            ("text_columns", "q,d"),
            ("label_column", "y"),
            ("template", "{prompt} Q: {q} D: {d}"),
        ],
    );
    assert_eq!(t.template, "{prompt} Q: {q} D: {d}");
    let spec = infer_labels(&t, &ex).unwrap();
    assert_eq!(spec.problem_type, ProblemType::Regression);
    assert_eq!(
        targets(&spec, &t, &ex).unwrap()[1],
        Some(Target::Value(2.0))
    );
    // The `problem_type` key overrides: integer scores as regression.
    let (t, ex) = custom(
        &tmp.path().join("d"),
        "train.csv",
        "text,label\na,1\nb,3\n",
        &[("text_columns", "text"), ("problem_type", "regression")],
    );
    assert_eq!(
        infer_labels(&t, &ex).unwrap().problem_type,
        ProblemType::Regression
    );
    // `labels` fixes the ids: names in that order, integers as ids.
    let (t, ex) = custom(
        &tmp.path().join("e"),
        "train.csv",
        "text,label\na,pos\nb,neg\nc,1\n",
        &[("text_columns", "text"), ("labels", "neg,pos")],
    );
    let err = format!("{:#}", infer_labels(&t, &ex).unwrap_err());
    assert!(err.contains("mixed label types"), "{err}");
    // A multi-label CSV row with no tags: an empty cell is the empty set when `problem_type`
    // says multi-label (without it, a missing label: see the bad-input test).
    let (t, ex) = custom(
        &tmp.path().join("f"),
        "train.csv",
        "text,tags\nbig and red,big|red\nnothing,\nsmall,small\n",
        &[
            ("text_columns", "text"),
            ("label_column", "tags"),
            ("problem_type", "multi_label_classification"),
        ],
    );
    let spec = infer_labels(&t, &ex).unwrap();
    assert_eq!(spec.names, ["big", "red", "small"]);
    assert_eq!(
        targets(&spec, &t, &ex).unwrap()[1],
        Some(Target::Multi(vec![0.0, 0.0, 0.0]))
    );
}

/// The error of reading `file` (or inferring its labels), which must name `parts`.
fn bad(file: &str, text: &str, flags: &[(&str, &str)], parts: &[&str]) {
    let tmp = common::tempdir();
    write(&tmp.path().join(file), text);
    let mut all = vec![("task", "custom")];
    all.extend_from_slice(flags);
    let t = task(&all);
    let err = match load_split(tmp.path(), &t, "train", true) {
        Err(e) => format!("{e:#}"),
        Ok(ex) => match infer_labels(&t, &ex) {
            Err(e) => format!("{e:#}"),
            Ok(spec) => format!(
                "{:#}",
                targets(&spec, &t, &ex).expect_err("bad input must fail")
            ),
        },
    };
    for p in parts {
        assert!(err.contains(p), "{file}: {err:?} lacks {p:?}");
    }
}

#[test]
fn bad_input_errors_name_the_file_row_and_column() {
    let text = [("text_columns", "text")];
    // A label outside `labels`.
    bad(
        "train.csv",
        "text,label\na,neg\nb,maybe\n",
        &[("text_columns", "text"), ("labels", "neg,pos")],
        &["train.csv:3", "'label'", "'maybe'", "neg, pos"],
    );
    // Mixed label types.
    bad(
        "train.jsonl",
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": 3}\n",
        &text,
        &[
            "train.jsonl:2",
            "'label'",
            "mixed label types",
            "train.jsonl:1",
        ],
    );
    // A NaN or infinite regression target.
    bad(
        "train.csv",
        "text,label\na,0.5\nb,nan\n",
        &text,
        &["train.csv:3", "'label'", "NaN or infinite"],
    );
    bad(
        "train.csv",
        "text,label\na,0.5\nb,inf\n",
        &text,
        &["train.csv:3", "NaN or infinite"],
    );
    // A missing text or label column.
    bad(
        "train.csv",
        "body,label\na,1\n",
        &text,
        &["train.csv", "text column 'text'", "'body'"],
    );
    bad(
        "train.csv",
        "text,y\na,1\n",
        &text,
        &["train.csv", "label column 'label'"],
    );
    // An empty text, and a row without a label.
    bad(
        "train.csv",
        "text,label\na,1\n  ,0\n",
        &text,
        &["train.csv:3", "'text'", "empty text"],
    );
    bad(
        "train.jsonl",
        "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
        &text,
        &["train.jsonl:2", "'label'", "no label"],
    );
}
