//! `qlora-cls serve`: the trained classifier behind an HTTP API (axum on tokio) that speaks
//! text-embeddings-inference's `/predict`, so TEI clients work unchanged; plus `GET /health`,
//! `GET /info`, `GET /metrics` (Prometheus) and a page at `GET /` to try it.
//!
//! The model is loaded once and owned by the batching thread ([`batcher`]); handlers render
//! each input with the prompt the adapter was trained with (`predict`'s text exactly: a pair
//! fills sentence 1 and 2, a lone text fills sentence 1 and leaves sentence 2 empty),
//! tokenise it, queue it and await its logits. SIGTERM (or Ctrl-C) stops accepting
//! connections, lets the queued requests finish, and exits 0.
pub mod api;
pub mod batcher;
pub mod metrics;

use crate::config::Config;
use crate::data::batch::TextEncoder;
use crate::data::formats::Example;
use crate::data::long_text::{self, Aggregate, Mode, Side};
use crate::data::prompt;
use crate::labels::{self, LabelSpec, ProblemType};
use crate::loader;
use crate::task::Task;
use anyhow::{Context, Result};
use api::{ApiError, Input};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batcher::{Batcher, Limits};
use metrics::Metrics;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (printed on the `listening on` line).
    pub port: u16,
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_wait_ms: u64,
    pub max_queue: usize,
    pub max_client_batch_size: usize,
    /// Longest input in tokens (prompt and special tokens included); longer ones are refused
    /// unless the request sets `truncate`.
    pub max_input_length: Option<usize>,
    /// Dequantise the frozen NF4 weights once at start (`Some(true)`), never (`Some(false)`),
    /// or when the dense copy fits half the free memory (`None`, the default).
    pub dense_weights: Option<bool>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch_tokens: 16384,
            max_batch_requests: 64,
            max_wait_ms: 2,
            max_queue: 2048,
            max_client_batch_size: 64,
            max_input_length: None,
            dense_weights: None,
        }
    }
}

struct AppState {
    encoder: TextEncoder,
    /// Fits a text to `max_input_length` as `long_text` says (`truncate`: exactly as the
    /// tokenizer's own truncation would).
    truncating: TextEncoder,
    /// How a chunked input's windows become one answer.
    aggregate: Aggregate,
    max_input_length: usize,
    prompt: String,
    /// The task the adapter was trained on: its template and text columns.
    task: Task,
    labels: LabelSpec,
    batcher: Batcher,
    metrics: Arc<Metrics>,
    info: Value,
    max_client_batch_size: usize,
    stopping: AtomicBool,
}

const PAGE: &str = include_str!("page.html");

/// Loads the model with its adapter and serves it until SIGTERM / Ctrl-C.
pub fn serve(cfg: &Config, adapter: &Path, opts: &ServeOptions) -> Result<()> {
    let mut cfg = cfg.clone();
    // Requests choose between refusing and truncating; the encoder must not cut silently.
    let configured_max = cfg.max_length.take();
    let (loaded, trained) = loader::load_with_adapter(&cfg, adapter)?;
    let task = trained.task;
    let loader::Loaded {
        mut model,
        encoder,
        device,
    } = loaded;
    let frozen_weights = loader::for_inference(&mut model, device, opts.dense_weights)?;
    let max_input_length = opts
        .max_input_length
        .or(configured_max)
        .unwrap_or(model.config.max_position_embeddings.max(1) as usize);
    let tokenizer_dir = cfg.tokenizer_dir()?;
    let mut truncating = TextEncoder::from_dir(tokenizer_dir, Some(max_input_length))?;
    truncating.set_pad_id(encoder.pad_id());
    truncating.set_long_text(cfg.long_text_settings()?);
    let aggregate = cfg.chunk_aggregate()?;
    let num_labels = model.opts.num_labels as usize;
    let labels = crate::adapter::labels_for(adapter, num_labels)?;
    // The prompt the adapter was trained with (an adapter from before labels.json: the
    // configuration's).
    let prompt_text = if task.prompt.is_empty() {
        prompt::resolve_prompt(&cfg.prompt)?
    } else {
        task.prompt.clone()
    };
    let metrics = Arc::new(Metrics::default());
    let limits = Limits {
        max_batch_tokens: opts.max_batch_tokens.max(1),
        max_batch_requests: opts.max_batch_requests.max(1),
        max_wait: Duration::from_millis(opts.max_wait_ms),
        max_queue: opts.max_queue.max(1),
    };
    // TEI's /predict answers every label's probability; the decision rule a client should
    // apply (the adapter's threshold.json) travels in /info.
    let threshold = match loader::decision(&cfg, adapter, &labels)? {
        crate::threshold::Decision::Default => Value::Null,
        crate::threshold::Decision::Binary(t) => json!(t),
        crate::threshold::Decision::PerLabel(ts) => json!(ts),
    };
    let info = json!({
        "model_id": cfg.model_dir()?.display().to_string(),
        "adapter": adapter.display().to_string(),
        "model_dtype": crate::model::hf_config::dtype_config_name(model.opts.compute_dtype),
        "model_type": {"classifier": label_spec_fields(&labels)},
        "problem_type": labels.problem_type.as_str(),
        "labels": labels.names,
        "pair_inputs": task.text_columns.len() == 2,
        "reranker": rerank_logit(&task, &labels).is_some(),
        "template": task.template,
        "prompt": prompt_text,
        "device": format!("{device:?}"),
        "quantized": model.opts.quant.is_some(),
        "frozen_weights": frozen_weights,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_requests": limits.max_batch_requests,
        "max_wait_ms": opts.max_wait_ms,
        "max_concurrent_requests": limits.max_queue,
        "max_client_batch_size": opts.max_client_batch_size,
        "max_input_length": max_input_length,
        "long_text": cfg.long_text,
        "chunk_aggregate": cfg.chunk_aggregate,
        "temperature": model.temperature(),
        "threshold": threshold,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let pad_id = encoder.pad_id();
    let batcher = Batcher::start(model, device, pad_id, limits, metrics.clone());
    let state = Arc::new(AppState {
        encoder,
        truncating,
        aggregate,
        max_input_length,
        prompt: prompt_text,
        task,
        labels,
        batcher,
        metrics,
        info,
        max_client_batch_size: opts.max_client_batch_size.max(1),
        stopping: AtomicBool::new(false),
    });
    let app = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/info", get(info_json))
        .route("/metrics", get(metrics_text))
        .route("/predict", post(predict))
        .route("/rerank", post(rerank))
        .with_state(state.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal(state.clone()))
            .await
            .context("the HTTP server failed")
    });
    // Whatever is still queued is answered before the forward thread ends.
    state.batcher.close();
    served?;
    println!("stopped");
    Ok(())
}

fn label_spec_fields(labels: &LabelSpec) -> Value {
    let f = labels.config_fields();
    json!({"id2label": f["id2label"], "label2id": f["label2id"]})
}

async fn stop_signal(state: Arc<AppState>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    state.stopping.store(true, Ordering::SeqCst);
    eprintln!("stopping: no new connections; finishing the queued requests");
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.stopping.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unhealthy",
            "shutting down",
        )
        .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn info_json(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(s.info.clone())
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(s.batcher.queued()),
    )
        .into_response()
}

/// An answer as JSON (or its error), timed and counted in `/metrics` with its inputs.
async fn counted(
    s: &AppState,
    answer: impl std::future::Future<Output = Result<(Value, usize), ApiError>>,
) -> Response {
    let start = Instant::now();
    let (response, inputs) = match answer.await {
        Ok((v, n)) => (Json(v).into_response(), n),
        Err(e) => (e.into_response(), 0),
    };
    s.metrics.request(
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
        inputs,
    );
    response
}

async fn predict(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    counted(&s, predict_inner(&s, &body)).await
}

/// The text `predict` feeds the model for a row with these texts: MRPC's own rendering, or
/// the task's template with its prompt and text columns; for a reward model (`task:
/// preference`), a response, or a (prompt, response) pair, as training read it: `prompt +
/// response`, EOS appended unless there.
fn render(prompt_text: &str, task: &Task, input: &Input, eos: &str) -> String {
    let (a, b) = match input {
        Input::Single(t) => (t.clone(), String::new()),
        Input::Pair(a, b) => (a.clone(), b.clone()),
    };
    if task.is_preference() {
        let text = format!("{a}{b}");
        return if text.ends_with(eos) {
            text
        } else {
            text + eos
        };
    }
    if !task.template.is_empty() && !task.is_classic_mrpc() {
        let texts = [a, b];
        return crate::task::render(&task.template, prompt_text, &task.text_columns, &texts);
    }
    prompt::render(
        prompt_text,
        &Example {
            sentence1: a,
            sentence2: b,
            label: None,
            idx: 0,
        },
    )
}

/// The start of every text [`render`] makes: what each `chunk` window repeats.
fn prompt_part(prompt_text: &str, task: &Task) -> String {
    if !task.template.is_empty() && !task.is_classic_mrpc() {
        return crate::task::prompt_part(&task.template, prompt_text, &task.text_columns);
    }
    prompt::prompt_part(prompt_text)
}

fn backend(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Backend",
        format!("{e:#}"),
    )
}

/// The model's logits for each input (`what[i]` in errors): cut or refused at
/// `max_input_length` as `truncate` and `long_text` say, batched with the other requests, a
/// chunked input's windows combined into one row.
async fn logits_of(
    s: &AppState,
    inputs: &[Input],
    truncate: bool,
    left: bool,
    what: &str,
) -> Result<Vec<Vec<f64>>, ApiError> {
    let mut fit = *s.truncating.long_text();
    let chunk = fit.mode == Mode::Chunk;
    if left {
        if fit.mode != Mode::Truncate {
            return Err(ApiError::validation(format!(
                "truncation_direction Left cuts a text's start, but this server's long_text is {}",
                fit.mode.name()
            )));
        }
        fit.side = Side::Left;
    }
    let prefix = prompt_part(&s.prompt, &s.task).len();
    // Every input's rows: one, or one per window of a chunked input.
    let mut ids: Vec<Vec<Vec<i64>>> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let text = render(&s.prompt, &s.task, input, s.encoder.eos_token());
        let tokenizer_error = |e: anyhow::Error| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Tokenizer",
                format!("{what}[{i}]: {e:#}"),
            )
        };
        let t = s.encoder.encode(&text).map_err(tokenizer_error)?;
        if t.len() > s.max_input_length {
            if !truncate && !chunk {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Validation",
                    format!(
                        "{what}[{i}] is {} tokens long with the prompt, over max_input_length {}; \
                         shorten it or send \"truncate\": true",
                        t.len(),
                        s.max_input_length
                    ),
                ));
            }
            let (mut fitted, _) = s
                .truncating
                .fit_many(vec![text], prefix, &fit)
                .map_err(tokenizer_error)?;
            ids.push(fitted.pop().unwrap_or_default());
        } else {
            ids.push(vec![t]);
        }
    }
    let windows: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut pending = s
        .batcher
        .submit(ids.into_iter().flatten().collect())?
        .into_iter();
    let mut out = Vec::with_capacity(windows.len());
    for count in windows {
        let mut rows = Vec::with_capacity(count);
        for rx in pending.by_ref().take(count) {
            rows.push(
                rx.await
                    .map_err(|_| {
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Unhealthy",
                            "the server stopped before answering",
                        )
                    })?
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e))?,
            );
        }
        out.push(long_text::aggregate(&rows, s.labels.problem_type, s.aggregate).map_err(backend)?);
    }
    Ok(out)
}

async fn predict_inner(s: &AppState, body: &[u8]) -> Result<(Value, usize), ApiError> {
    let req = api::parse_predict(body, s.max_client_batch_size)?;
    let rows = logits_of(s, &req.inputs, req.truncate, req.truncate_left, "inputs").await?;
    let n = rows.len();
    let mut answers = Vec::with_capacity(n);
    for row in rows {
        let scores = if req.raw_scores {
            row
        } else {
            score_row(&row, s.labels.problem_type).map_err(backend)?
        };
        answers.push(api::ranked(&s.labels.names, &scores));
    }
    let v = if req.single {
        answers.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(answers)
    };
    Ok((v, n))
}

/// Which logit ranks a (query, text) pair: the only one of a one-output model, the positive
/// (last) label's of a two-label classifier; `None` for any other model, or one not trained
/// on pairs.
fn rerank_logit(task: &Task, labels: &LabelSpec) -> Option<usize> {
    if task.text_columns.len() != 2 {
        return None;
    }
    // One output is a score whatever the problem type says (transformers reads an adapter
    // saved without one as single-label).
    match (labels.problem_type, labels.num_labels()) {
        (_, 1) => Some(0),
        (ProblemType::SingleLabel, 2) => Some(1),
        _ => None,
    }
}

/// A (query, text) pair's score from its logits: σ of a one-output model's logit, p(`k`) of
/// a classifier, or the logit itself (`raw`).
fn rerank_score(row: &[f64], k: usize, problem: ProblemType, raw: bool) -> Result<f64, ApiError> {
    Ok(match (raw, row.len()) {
        (true, _) => row[k],
        (false, 1) => 1.0 / (1.0 + (-row[k]).exp()),
        (false, _) => score_row(row, problem).map_err(backend)?[k],
    })
}

async fn rerank(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    counted(&s, rerank_inner(&s, &body)).await
}

/// TEI's `/rerank`: each text paired with the query through the adapter's template and
/// prompt, scored by σ(logit) (one output) or p(positive) (two labels), or by that raw logit
/// with `raw_scores`.
async fn rerank_inner(s: &AppState, body: &[u8]) -> Result<(Value, usize), ApiError> {
    let Some(k) = rerank_logit(&s.task, &s.labels) else {
        return Err(ApiError::validation(format!(
            "/rerank needs a model trained on pairs (two text columns) with one output or two \
             labels; this adapter has {} text column(s) and {} {} label(s)",
            s.task.text_columns.len(),
            s.labels.num_labels(),
            s.labels.problem_type.as_str()
        )));
    };
    let req = api::parse_rerank(body, s.max_client_batch_size)?;
    let pairs: Vec<Input> = req
        .texts
        .iter()
        .map(|t| Input::Pair(req.query.clone(), t.clone()))
        .collect();
    let rows = logits_of(s, &pairs, req.truncate, req.truncate_left, "texts").await?;
    let scores = rows
        .iter()
        .map(|row| rerank_score(row, k, s.labels.problem_type, req.raw_scores))
        .collect::<Result<Vec<_>, _>>()?;
    let texts = req.return_text.then_some(req.texts.as_slice());
    Ok((api::reranked(&scores, texts), rows.len()))
}

fn score_row(logits: &[f64], problem: ProblemType) -> Result<Vec<f64>, tch::TchError> {
    Vec::<f64>::try_from(&labels::scores(&batcher::row_tensor(logits), problem).view([-1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(columns: &[&str]) -> Task {
        Task {
            name: "custom".into(),
            text_columns: columns.iter().map(|c| c.to_string()).collect(),
            label_column: "label".into(),
            labels: None,
            problem_type: None,
            template: String::new(),
            prompt: String::new(),
            metrics: Vec::new(),
        }
    }

    #[test]
    fn rerank_scores_one_output_or_the_positive_of_two_labels_of_pairs() {
        let pair = task(&["query", "passage"]);
        let spec = |p, n| LabelSpec {
            problem_type: p,
            names: (0..n).map(|i| format!("LABEL_{i}")).collect(),
        };
        assert_eq!(
            rerank_logit(&pair, &spec(ProblemType::Regression, 1)),
            Some(0)
        );
        assert_eq!(
            rerank_logit(&pair, &spec(ProblemType::SingleLabel, 1)),
            Some(0)
        );
        assert_eq!(
            rerank_logit(&pair, &spec(ProblemType::SingleLabel, 2)),
            Some(1)
        );
        assert_eq!(
            rerank_logit(&pair, &spec(ProblemType::SingleLabel, 3)),
            None
        );
        assert_eq!(rerank_logit(&pair, &spec(ProblemType::MultiLabel, 2)), None);
        assert_eq!(
            rerank_logit(&task(&["text"]), &spec(ProblemType::SingleLabel, 2)),
            None
        );
        assert!(
            (rerank_score(&[0.0], 0, ProblemType::Regression, false).unwrap() - 0.5).abs() < 1e-12
        );
        let p1 = rerank_score(&[0.0, 2.0f64.ln()], 1, ProblemType::SingleLabel, false).unwrap();
        assert!((p1 - 2.0 / 3.0).abs() < 1e-12, "{p1}");
        assert_eq!(
            rerank_score(&[0.1, 0.7], 1, ProblemType::SingleLabel, true).unwrap(),
            0.7
        );
    }
}
