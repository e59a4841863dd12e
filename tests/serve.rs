//! `qlora-cls serve` over real HTTP on 127.0.0.1: the TEI `/predict` answers equal `predict`'s
//! probabilities for texts, pairs and batches, and `/rerank` orders texts by predict's
//! p(positive) of their (query, text) pairs; 64 concurrent clients all get correct answers;
//! bad input gets a JSON 4xx; a full queue gets 429; SIGTERM finishes the queued requests and
//! exits 0.
mod common;
use common::server::{http, Server};
use common::{bin, config_from, demo_assets, random_adapter};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The demo model, a random adapter, and a JSONL split of pairs and lone texts.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
    data: PathBuf,
    rows: Vec<(String, String)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::tempdir();
        let demo = demo_assets(&dir.path().join("demo"));
        let model = demo.join("model");
        let adapter = dir.path().join("adapter");
        let cfg = config_from(&["--model_dir", s(&model), "--lora_dropout", "0"]);
        random_adapter(&cfg, &adapter);
        let mut rows: Vec<(String, String)> = qlora_cls::demo::demo_dataset()
            .2
            .iter()
            .take(10)
            .map(|e| (e.sentence1.clone(), e.sentence2.clone()))
            .collect();
        // Lone texts: `predict` reads them as pairs with an empty sentence 2.
        rows.push(("Shares of the bank rose 3 percent.".into(), String::new()));
        rows.push(("Profit fell sharply in the quarter".into(), String::new()));
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let lines: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, (a, b))| json!({"sentence1": a, "sentence2": b, "idx": i}).to_string())
            .collect();
        std::fs::write(data.join("test.jsonl"), lines.join("\n") + "\n").unwrap();
        Fixture {
            _dir: dir,
            model,
            adapter,
            data,
            rows,
        }
    })
}

/// The compute dtype every comparison here pins on both sides: `auto` is bf16 on a CPU with
/// AVX512-BF16 and fp32 on others, and the answers are compared at fp32's precision.
const FP32: &str = "float32";

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_in(FP32, extra)
    }

    fn start_in(dtype: &str, extra: &[&str]) -> Server {
        let f = fixture();
        let mut args = vec![
            "--model_dir",
            s(&f.model),
            "--adapter",
            s(&f.adapter),
            "--bnb_4bit_compute_dtype",
            dtype,
        ];
        args.extend_from_slice(extra);
        Server::serve(&args)
    }
}

/// `predict`'s probabilities for the fixture's rows in fp32, by row.
fn predict_csv() -> &'static Vec<Vec<f64>> {
    static P: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    P.get_or_init(|| predict_in(FP32))
}

/// `predict`'s probabilities for the fixture's rows computed in `dtype`, by row.
fn predict_in(dtype: &str) -> Vec<Vec<f64>> {
    let f = fixture();
    let out = f.data.join(format!("preds-{dtype}.csv"));
    let o = Command::new(bin())
        .args(["predict", "--split", "test", "--out", s(&out)])
        .args(["--model_dir", s(&f.model), "--data_dir", s(&f.data)])
        .args(["--adapter", s(&f.adapter)])
        .args(["--bnb_4bit_compute_dtype", dtype])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::predicted_probabilities(&out)
}

/// The input of row `i` as TEI writes it in a batch.
fn batch_item(i: usize) -> Value {
    let (a, b) = &fixture().rows[i];
    if b.is_empty() {
        json!([a])
    } else {
        json!([a, b])
    }
}

/// `[{label, score}]` → score by label index (LABEL_i), checking the order.
fn scores(answer: &Value) -> Vec<f64> {
    let list = answer.as_array().expect("a list of {label, score}");
    let mut out = vec![f64::NAN; list.len()];
    let mut last = f64::INFINITY;
    for e in list {
        let score = e["score"].as_f64().unwrap();
        assert!(score <= last, "not sorted by score: {answer}");
        last = score;
        let i: usize = e["label"].as_str().unwrap()["LABEL_".len()..]
            .parse()
            .unwrap();
        out[i] = score;
    }
    out
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5,
            "{what}: {got:?} vs predict's {want:?}"
        );
    }
}

/// With the frozen weights dequantised once (the default here: the tiny model fits) and kept
/// in NF4 (dequantised per batch as `predict` does), the same answers.
#[test]
fn predict_endpoint_equals_predict_for_texts_pairs_and_batches() {
    for (flags, frozen) in [
        (&[] as &[&str], "dense"),
        (&["--dense_weights", "false"], "nf4"),
    ] {
        predict_endpoint_equals_predict(flags, frozen);
    }
}

fn predict_endpoint_equals_predict(flags: &[&str], frozen: &str) {
    let want = predict_csv();
    let server = Server::start(flags);
    let f = fixture();
    for (i, (a, b)) in f.rows.iter().enumerate() {
        let single = if b.is_empty() {
            json!(a)
        } else {
            json!([a, b])
        };
        let (status, v) = server.predict(json!({ "inputs": single }));
        assert_eq!(status, 200, "{v}");
        assert_close(&scores(&v), &want[i], &format!("row {i} alone"));
    }
    let all: Vec<Value> = (0..f.rows.len()).map(batch_item).collect();
    let (status, v) = server.predict(json!({ "inputs": all }));
    assert_eq!(status, 200, "{v}");
    let answers = v.as_array().unwrap();
    assert_eq!(answers.len(), f.rows.len());
    for (i, a) in answers.iter().enumerate() {
        assert_close(&scores(a), &want[i], &format!("row {i} in a batch"));
    }
    // raw_scores: the logits, whose softmax is the score.
    let (a, b) = &f.rows[0];
    let (_, raw) = server.predict(json!({"inputs": [a, b], "raw_scores": true}));
    let raw = scores(&raw);
    let z: f64 = raw.iter().map(|x| x.exp()).sum();
    let soft: Vec<f64> = raw.iter().map(|x| x.exp() / z).collect();
    assert_close(&soft, &want[0], "softmax of raw_scores");

    let (status, health) = server.call("GET", "/health", "");
    assert_eq!((status, health.contains("ok")), (200, true), "{health}");
    let (status, info) = server.call("GET", "/info", "");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["labels"], json!(["LABEL_0", "LABEL_1"]));
    assert_eq!(info["problem_type"], "single_label_classification");
    assert_eq!(info["frozen_weights"], frozen, "{info}");
    assert_eq!(info["model_type"]["classifier"]["id2label"]["1"], "LABEL_1");
    for key in [
        "model_dtype",
        "device",
        "max_batch_tokens",
        "max_batch_requests",
    ] {
        assert!(!info[key].is_null(), "/info lacks {key}: {info}");
    }
    let (status, m) = server.call("GET", "/metrics", "");
    assert_eq!(status, 200);
    let n = f.rows.len() + 2;
    assert!(m.contains(&format!("qlora_cls_requests_total {n}")), "{m}");
    for name in [
        "qlora_cls_batch_size_bucket",
        "qlora_cls_queue_seconds_bucket",
        "qlora_cls_request_duration_seconds_bucket",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
}

#[test]
fn sixty_four_concurrent_clients_get_correct_answers() {
    let want = predict_csv().clone();
    let server = Server::start(&["--max_wait_ms", "5"]);
    let addr = server.addr.clone();
    let n_rows = fixture().rows.len();
    let start = Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let addr = addr.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                for k in 0..50 {
                    let i = (c * 7 + k * 3) % n_rows;
                    let body = json!({ "inputs": [batch_item(i)] }).to_string();
                    let (status, text) = http(&addr, "POST", "/predict", &body).unwrap();
                    assert_eq!(status, 200, "client {c} request {k}: {text}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_close(&scores(&v[0]), &want[i], &format!("client {c} request {k}"));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "64 clients x 50 requests: {secs:.1} s, {:.0} requests/s",
        3200.0 / secs
    );
    let (_, m) = server.call("GET", "/metrics", "");
    assert!(m.contains("qlora_cls_requests_total 3200"), "{m}");
    assert!(
        m.contains("qlora_cls_responses_total{status=\"2xx\"} 3200"),
        "{m}"
    );
    // Requests were batched: fewer forwards than inputs.
    let forwards: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("qlora_cls_batch_size_count "))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("{forwards} forwards for 3200 inputs");
    assert!(
        forwards < 3200.0,
        "no dynamic batching: {forwards} forwards"
    );
}

#[test]
fn bad_input_gets_a_json_error_and_the_server_lives_on() {
    let server = Server::start(&["--max_input_length", "48", "--max_client_batch_size", "4"]);
    let err = |status: u16, body: &str, needle: &str| {
        let (got, text) = server.call("POST", "/predict", body);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{body}: not a JSON error: {text}"));
        assert_eq!(got, status, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
        assert!(v["error_type"].is_string(), "{v}");
    };
    err(422, "{\"inputs\": [\"a\"", "malformed JSON");
    err(422, "[1, 2]", "JSON object");
    err(422, r#"{"input": "a"}"#, "unknown field `input`");
    err(422, r#"{"inputs": ""}"#, "empty");
    err(422, r#"{"inputs": []}"#, "empty list");
    err(422, r#"{"inputs": [["a", "b", "c"]]}"#, "inputs[0]");
    err(
        422,
        r#"{"inputs": [["a"], [7]]}"#,
        "inputs[1][0] must be a string",
    );
    err(422, r#"{"inputs": {"text": "a"}}"#, "`inputs` must be");
    err(
        413,
        r#"{"inputs": [["a"], ["b"], ["c"], ["d"], ["e"]]}"#,
        "max_client_batch_size",
    );
    let long = "the shares rose again ".repeat(40);
    err(
        413,
        &json!({ "inputs": long }).to_string(),
        "max_input_length 48",
    );
    let (status, v) = server.predict(json!({"inputs": long, "truncate": true}));
    assert_eq!(status, 200, "{v}");
    let total: f64 = scores(&v).iter().sum();
    assert!((total - 1.0).abs() < 1e-9, "{v}");
    // Concurrent garbage and good requests: every answer is a JSON answer, nobody panics.
    let addr = server.addr.clone();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for k in 0..20 {
                    let body = match (t + k) % 4 {
                        0 => "{\"inputs\": ".to_string(),
                        1 => json!({"inputs": [[""]]}).to_string(),
                        2 => json!({"inputs": "x".repeat(5000)}).to_string(),
                        _ => json!({"inputs": ["one", "two"]}).to_string(),
                    };
                    let (status, text) = http(&addr, "POST", "/predict", &body).unwrap();
                    assert!(
                        [200, 413, 422].contains(&status),
                        "unexpected {status}: {text}"
                    );
                    serde_json::from_str::<Value>(&text).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let (status, _) = server.call("GET", "/health", "");
    assert_eq!(status, 200);
    let (status, _) = server.call("GET", "/nowhere", "");
    assert_eq!(status, 404);
}

/// POSTs `body` to /predict from another thread.
fn post_in_background(
    addr: &str,
    body: Value,
) -> std::thread::JoinHandle<std::io::Result<(u16, String)>> {
    let addr = addr.to_string();
    std::thread::spawn(move || http(&addr, "POST", "/predict", &body.to_string()))
}

#[test]
fn a_full_queue_gets_429_and_sigterm_drains_the_queue() {
    // The first request's two inputs fill the queue for 1.5 s (the batch waits for more).
    let mut server = Server::start(&["--max_queue", "2", "--max_wait_ms", "1500"]);
    let addr = server.addr.clone();
    let first = post_in_background(&addr, json!({"inputs": [["a b"], ["c d"]]}));
    std::thread::sleep(Duration::from_millis(400));
    let (status, v) = server.predict(json!({"inputs": "one more"}));
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error_type"], "Overloaded");
    let (status, text) = first.join().unwrap().unwrap();
    assert_eq!(status, 200, "{text}");

    // SIGTERM while a request is queued: it is answered, then the server exits 0.
    let queued = post_in_background(&addr, json!({"inputs": [["x y"], ["z"]]}));
    std::thread::sleep(Duration::from_millis(400));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, text) = queued.join().unwrap().unwrap();
    assert_eq!(status, 200, "the queued request was dropped: {text}");
    let start = Instant::now();
    let code = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    assert!(
        http(&addr, "GET", "/health", "").is_err(),
        "still accepting after SIGTERM"
    );
}

fn chromium() -> &'static str {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no chromium on PATH: `make setup` installs Debian's (apt-get install chromium)")
}

/// Runs headless Chromium on `url` with `action` (`--dump-dom`, `--screenshot=FILE`).
fn browse(profile: &Path, url: &str, action: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=900,700",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(action)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_page_shows_label_bars_in_headless_chromium() {
    let server = Server::start(&[]);
    let (status, html) = server.call("GET", "/", "");
    assert_eq!(status, 200);
    for external in ["src=\"http", "href=\"http", "@import", "<link"] {
        assert!(
            !html.contains(external),
            "the page loads an external asset: {external}"
        );
    }
    let dir = common::tempdir();
    // `#run` makes the page classify its example pair on load.
    let url = format!("http://{}/#run", server.addr);
    let dom = browse(&dir.path().join("p1"), &url, "--dump-dom");
    for label in ["LABEL_0", "LABEL_1"] {
        assert!(
            dom.contains(&format!("class=\"bar\" data-label=\"{label}\"")),
            "no bar for {label} in the rendered page:\n{dom}"
        );
    }
    assert!(
        dom.contains("single_label_classification"),
        "/info not shown:\n{dom}"
    );
    let shot = dir.path().join("page.png");
    browse(
        &dir.path().join("p2"),
        &url,
        &format!("--screenshot={}", shot.display()),
    );
    let decoder = png::Decoder::new(std::fs::File::open(&shot).expect("screenshot written"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("PNG data");
    let px = frame.color_type.samples();
    assert!(px >= 3, "unexpected PNG colour type {:?}", frame.color_type);
    let pixels: Vec<&[u8]> = buf[..frame.buffer_size()].chunks(px).collect();
    let non_white = pixels.iter().filter(|p| p[..3] != [255, 255, 255]).count();
    // The bars' blue (#2f5bd3).
    let bar = pixels
        .iter()
        .filter(|p| {
            p[0].abs_diff(0x2f) < 12 && p[1].abs_diff(0x5b) < 12 && p[2].abs_diff(0xd3) < 12
        })
        .count();
    eprintln!(
        "screenshot {}x{}: {non_white} non-white pixels, {bar} bar-blue pixels",
        frame.width, frame.height
    );
    assert!(non_white > pixels.len() / 50, "the screenshot is blank");
    assert!(
        bar > 2000,
        "no score bars in the screenshot ({bar} bar-blue pixels)"
    );
}

/// In bf16 (what `auto` computes in on a GPU and on a CPU with AVX512-BF16) a row's logits
/// depend on its batch mates beyond fp32's rounding: the frozen-weight GEMMs run over all the
/// batch's tokens at once and their blocking follows the row count. The rule is the same for
/// both: the same rows in the same batch give `predict`'s answers to fp32's precision (1e-5, the
/// CSV's 6 digits), and a row alone is within what bf16 explains (measured: 1.5e-3 in the
/// logits, 4.8e-4 in probability, the same with `QLORA_CPU_BF16=0/1`).
#[test]
fn in_bf16_the_same_batches_give_predicts_answers() {
    const BF16: &str = "bfloat16";
    let want = predict_in(BF16);
    let server = Server::start_in(BF16, &["--max_batch_requests", "64"]);
    let f = fixture();
    let eval_batch = qlora_cls::config::Config::default().eval_batch_size;
    let mut alone = 0f64;
    for start in (0..f.rows.len()).step_by(eval_batch) {
        let rows: Vec<usize> = (start..(start + eval_batch).min(f.rows.len())).collect();
        let items: Vec<Value> = rows.iter().map(|&i| batch_item(i)).collect();
        let (status, v) = server.predict(json!({ "inputs": items }));
        assert_eq!(status, 200, "{v}");
        for (a, &i) in v.as_array().unwrap().iter().zip(&rows) {
            assert_close(
                &scores(a),
                &want[i],
                &format!("bf16: row {i} in predict's batch"),
            );
        }
        // Alone, a row's logits are within the bound the bf16 model tests hold against
        // transformers in bf16 (2% of the largest logit).
        let raw = |items: Vec<Value>| {
            let (status, v) = server.predict(json!({ "inputs": items, "raw_scores": true }));
            assert_eq!(status, 200, "{v}");
            v.as_array().unwrap().iter().map(scores).collect::<Vec<_>>()
        };
        let in_batch = raw(items.clone());
        for (k, &i) in rows.iter().enumerate() {
            let lone = raw(vec![batch_item(i)]).remove(0);
            let top = in_batch[k].iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in lone.iter().zip(&in_batch[k]) {
                assert!(
                    (g - w).abs() <= 0.02 * top,
                    "bf16: row {i} alone {lone:?} vs in its batch {:?}",
                    in_batch[k]
                );
                alone = alone.max((g - w).abs());
            }
        }
    }
    eprintln!("bf16: a row alone vs in predict's batch: max |Δlogit| {alone:.3e}");
}

/// The fixture's first query with the sentence 2 of its first ten rows as the texts to rank.
fn rerank_case() -> (String, Vec<String>) {
    let rows = &fixture().rows;
    (
        rows[0].0.clone(),
        rows[..10].iter().map(|r| r.1.clone()).collect(),
    )
}

/// `predict`'s p(positive) for (query, text) pairs, as a file of those pairs.
fn predict_pairs(query: &str, texts: &[String]) -> Vec<f64> {
    let f = fixture();
    let input = f.data.join("rerank-pairs.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"sentence1": query, "sentence2": t, "idx": i}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = f.data.join("rerank-preds.csv");
    let o = Command::new(bin())
        .args(["predict", "--input", s(&input), "--out", s(&out)])
        .args(["--model_dir", s(&f.model), "--adapter", s(&f.adapter)])
        .args(["--bnb_4bit_compute_dtype", FP32])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::predicted_probabilities(&out)
        .into_iter()
        .map(|p| p[1])
        .collect()
}

/// `/rerank`'s answer → score by text index, checking the order and the texts.
fn reranked_scores(v: &Value, texts: &[String], with_text: bool) -> Vec<f64> {
    let list = v.as_array().unwrap_or_else(|| panic!("not a list: {v}"));
    assert_eq!(list.len(), texts.len(), "{v}");
    let mut out = vec![f64::NAN; texts.len()];
    let mut last = f64::INFINITY;
    for e in list {
        let (i, score) = (
            e["index"].as_u64().unwrap() as usize,
            e["score"].as_f64().unwrap(),
        );
        assert!(score <= last, "not sorted by score: {v}");
        last = score;
        assert_eq!(e.get("text").is_some(), with_text, "{e}");
        if with_text {
            assert_eq!(e["text"], texts[i].as_str());
        }
        out[i] = score;
    }
    assert!(out.iter().all(|x| x.is_finite()), "an index twice: {v}");
    out
}

#[test]
fn rerank_orders_texts_as_predict_scores_their_pairs() {
    let (query, texts) = rerank_case();
    let want = predict_pairs(&query, &texts);
    let server = Server::start(&["--max_wait_ms", "5", "--max_client_batch_size", "16"]);
    let (status, info) = server.call("GET", "/info", "");
    assert_eq!(status, 200);
    assert!(info.contains("\"reranker\":true"), "{info}");
    let body = json!({"query": query, "texts": texts, "return_text": true});
    let (status, text) = server.call("POST", "/rerank", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_close(&reranked_scores(&v, &texts, true), &want, "/rerank");

    // raw_scores: the positive label's logit, as /predict's raw_scores gives it.
    let body = json!({"query": query, "texts": texts, "raw_scores": true});
    let (_, text) = server.call("POST", "/rerank", &body.to_string());
    let raw = reranked_scores(&serde_json::from_str(&text).unwrap(), &texts, false);
    for (i, t) in texts.iter().enumerate().take(3) {
        let (_, p) = server.predict(json!({"inputs": [query, t], "raw_scores": true}));
        let logit = p
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["label"] == "LABEL_1")
            .unwrap()["score"]
            .as_f64()
            .unwrap();
        assert!(
            (raw[i] - logit).abs() <= 1e-5,
            "text {i}: {} vs {logit}",
            raw[i]
        );
    }

    // 64 concurrent clients, each ranking its own slice of the texts.
    let addr = server.addr.clone();
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let (addr, query, texts, want) =
                (addr.clone(), query.clone(), texts.clone(), want.clone());
            std::thread::spawn(move || {
                for k in 0..10 {
                    let start = (c + k) % texts.len();
                    let n = 1 + (c * 3 + k) % (texts.len() - start);
                    let mine = &texts[start..start + n];
                    let body = json!({"query": query, "texts": mine}).to_string();
                    let (status, text) = http(&addr, "POST", "/rerank", &body).unwrap();
                    assert_eq!(status, 200, "client {c} request {k}: {text}");
                    let got = reranked_scores(&serde_json::from_str(&text).unwrap(), mine, false);
                    assert_close(
                        &got,
                        &want[start..start + n],
                        &format!("client {c} request {k}"),
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }

    // Bad requests get a JSON 4xx, and the server lives on.
    let many: Vec<&str> = vec!["a text"; 17];
    for (body, code, says) in [
        (json!({"texts": ["a"]}), 422, "missing field `query`"),
        (json!({"query": "q", "texts": []}), 422, "empty list"),
        (json!({"query": "q", "texts": "a"}), 422, "list of strings"),
        (
            json!({"query": "q", "texts": many}),
            413,
            "max_client_batch_size 16",
        ),
    ] {
        let (status, text) = server.call("POST", "/rerank", &body.to_string());
        assert_eq!(status, code, "{body}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert!(e["error"].as_str().unwrap().contains(says), "{text}");
        assert_eq!(e["error_type"], "Validation", "{text}");
    }
    let (status, _) = server.call("GET", "/health", "");
    assert_eq!(status, 200);
}

/// `"truncate": true` cuts an over-long input's end, or with `"truncation_direction": "Left"`
/// its start, as `predict` does with `--truncation_side left`.
#[test]
fn truncation_direction_left_cuts_as_truncation_side_left_does() {
    let f = fixture();
    let max = "20";
    for (side, direction) in [("right", "Right"), ("left", "Left")] {
        let out = f.data.join(format!("preds-{side}.csv"));
        let o = Command::new(bin())
            .args(["predict", "--split", "test", "--out", s(&out)])
            .args(["--model_dir", s(&f.model), "--data_dir", s(&f.data)])
            .args(["--adapter", s(&f.adapter), "--bnb_4bit_compute_dtype", FP32])
            .args(["--max_length", max, "--truncation_side", side])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let want = common::predicted_probabilities(&out);
        let server = Server::start(&["--max_input_length", max]);
        for i in [0usize, 3, 7] {
            let (status, v) = server.predict(json!({
                "inputs": [batch_item(i)],
                "truncate": true,
                "truncation_direction": direction,
            }));
            assert_eq!(status, 200, "{v}");
            assert_close(&scores(&v[0]), &want[i], &format!("row {i}, {direction}"));
        }
    }
    let read =
        |side: &str| common::predicted_probabilities(&f.data.join(format!("preds-{side}.csv")));
    let (right, left) = (read("right"), read("left"));
    assert!(
        right
            .iter()
            .zip(&left)
            .any(|(a, b)| (a[1] - b[1]).abs() > 1e-4),
        "cutting the other end changes some answer"
    );
}
