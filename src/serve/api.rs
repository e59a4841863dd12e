//! The text-embeddings-inference `/predict` and `/rerank` requests and responses, and the
//! JSON errors.
//!
//! `inputs` is a text (`"a"`), one pair (`["a", "b"]`, TEI's reading of a two-string list) or
//! a batch of texts and pairs (`[["a"], ["a", "b"]]`); `truncate` (default false) cuts an
//! over-long input instead of refusing it; `raw_scores` (default false) returns the logits
//! instead of the scores of the problem type. A single input answers one list of
//! `{"label", "score"}` sorted by score, a batch one such list per input.
//! `truncation_direction` (`Right`, or `Left` to keep the end) says which end `truncate` cuts.
//!
//! `/rerank` takes a `query` and `texts` (and `truncate`, `raw_scores`, `return_text`) and
//! answers `[{"index", "score"[, "text"]}]`, highest score first.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An error as TEI reports it: `{"error": "...", "error_type": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            kind: "Validation",
            message: message.into(),
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "error_type": self.kind})),
        )
            .into_response()
    }
}

/// One input: a text, or a sentence pair.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Single(String),
    Pair(String, String),
}

#[derive(Debug, PartialEq)]
pub struct PredictRequest {
    pub inputs: Vec<Input>,
    /// A single input (answer a flat list) rather than a batch.
    pub single: bool,
    pub truncate: bool,
    /// `truncation_direction: Left`: cut the start instead of the end.
    pub truncate_left: bool,
    pub raw_scores: bool,
}

fn text(v: &Value, at: &str) -> Result<String, ApiError> {
    let s = v
        .as_str()
        .ok_or_else(|| ApiError::validation(format!("{at} must be a string, got {v}")))?;
    if s.trim().is_empty() {
        return Err(ApiError::validation(format!("{at} is empty")));
    }
    Ok(s.to_string())
}

fn flag(obj: &serde_json::Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::validation(format!(
            "`{key}` must be true or false, got {v}"
        ))),
    }
}

/// TEI's `truncation_direction`: `Right` (the default) or `Left`; true for left.
fn truncate_left(obj: &serde_json::Map<String, Value>) -> Result<bool, ApiError> {
    match obj.get("truncation_direction") {
        None | Some(Value::Null) => Ok(false),
        Some(d) if d == "Right" || d == "right" => Ok(false),
        Some(d) if d == "Left" || d == "left" => Ok(true),
        Some(d) => Err(ApiError::validation(format!(
            "truncation_direction {d}: expected Right or Left"
        ))),
    }
}

fn too_many(n: usize, what: &str, max_client_batch: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Validation",
        format!("batch of {n} {what} exceeds max_client_batch_size {max_client_batch}"),
    )
}

/// Parses and checks a `/predict` body.
pub fn parse_predict(body: &[u8], max_client_batch: usize) -> Result<PredictRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("malformed JSON body: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::validation("the body must be a JSON object with `inputs`"))?;
    if let Some(k) = obj.keys().find(|k| {
        !["inputs", "truncate", "raw_scores", "truncation_direction"].contains(&k.as_str())
    }) {
        return Err(ApiError::validation(format!(
            "unknown field `{k}` (fields: inputs, truncate, raw_scores)"
        )));
    }
    let inputs = obj
        .get("inputs")
        .ok_or_else(|| ApiError::validation("missing field `inputs`"))?;
    let (inputs, single) = match inputs {
        Value::String(_) => (vec![Input::Single(text(inputs, "inputs")?)], true),
        Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => (
            vec![Input::Pair(
                text(&a[0], "inputs[0]")?,
                text(&a[1], "inputs[1]")?,
            )],
            true,
        ),
        Value::Array(a) if a.is_empty() => {
            return Err(ApiError::validation("`inputs` is an empty list"))
        }
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, item) in a.iter().enumerate() {
                out.push(match item.as_array().map(Vec::as_slice) {
                    Some([t]) => Input::Single(text(t, &format!("inputs[{i}][0]"))?),
                    Some([t, u]) => Input::Pair(
                        text(t, &format!("inputs[{i}][0]"))?,
                        text(u, &format!("inputs[{i}][1]"))?,
                    ),
                    _ => {
                        return Err(ApiError::validation(format!(
                            "inputs[{i}] must be a list of one text or two (a pair), got {item}"
                        )))
                    }
                });
            }
            (out, false)
        }
        other => {
            return Err(ApiError::validation(format!(
                "`inputs` must be a text, a pair [\"a\", \"b\"] or a list of [\"a\"] / [\"a\", \"b\"], got {other}"
            )))
        }
    };
    if inputs.len() > max_client_batch {
        return Err(too_many(inputs.len(), "inputs", max_client_batch));
    }
    Ok(PredictRequest {
        inputs,
        single,
        truncate: flag(obj, "truncate")?,
        truncate_left: truncate_left(obj)?,
        raw_scores: flag(obj, "raw_scores")?,
    })
}

/// A `/rerank` request: the query and the texts to order by relevance to it.
#[derive(Debug, PartialEq)]
pub struct RerankRequest {
    pub query: String,
    pub texts: Vec<String>,
    pub truncate: bool,
    /// `truncation_direction: Left`.
    pub truncate_left: bool,
    pub raw_scores: bool,
    pub return_text: bool,
}

/// Parses and checks a `/rerank` body.
pub fn parse_rerank(body: &[u8], max_client_batch: usize) -> Result<RerankRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("malformed JSON body: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        ApiError::validation("the body must be a JSON object with `query` and `texts`")
    })?;
    const FIELDS: [&str; 6] = [
        "query",
        "texts",
        "truncate",
        "raw_scores",
        "return_text",
        "truncation_direction",
    ];
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(format!(
            "unknown field `{k}` (fields: query, texts, truncate, raw_scores, return_text)"
        )));
    }
    let query = text(
        obj.get("query")
            .ok_or_else(|| ApiError::validation("missing field `query`"))?,
        "query",
    )?;
    let texts = match obj.get("texts") {
        None => return Err(ApiError::validation("missing field `texts`")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::validation("`texts` is an empty list"))
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| text(t, &format!("texts[{i}]")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(ApiError::validation(format!(
                "`texts` must be a list of strings, got {other}"
            )))
        }
    };
    if texts.len() > max_client_batch {
        return Err(too_many(texts.len(), "texts", max_client_batch));
    }
    Ok(RerankRequest {
        query,
        texts,
        truncate: flag(obj, "truncate")?,
        truncate_left: truncate_left(obj)?,
        raw_scores: flag(obj, "raw_scores")?,
        return_text: flag(obj, "return_text")?,
    })
}

/// `/rerank`'s answer: every text's index and score (and the text itself when asked),
/// highest score first; equal scores keep the request's order.
pub fn reranked(scores: &[f64], texts: Option<&[String]>) -> Value {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    Value::Array(
        order
            .into_iter()
            .map(|i| {
                let mut e = json!({"index": i, "score": scores[i]});
                if let Some(t) = texts {
                    e["text"] = json!(t[i]);
                }
                e
            })
            .collect(),
    )
}

/// One input's answer: every label with its score, highest first.
pub fn ranked(labels: &[String], scores: &[f64]) -> Value {
    let mut pairs: Vec<(&String, f64)> = labels.iter().zip(scores.iter().copied()).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    Value::Array(
        pairs
            .into_iter()
            .map(|(l, s)| json!({"label": l, "score": s}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> PredictRequest {
        parse_predict(body.as_bytes(), 8).unwrap()
    }

    fn err(body: &str) -> String {
        parse_predict(body.as_bytes(), 8).unwrap_err().message
    }

    #[test]
    fn tei_shapes() {
        let r = ok(r#"{"inputs": "hi"}"#);
        assert_eq!(r.inputs, [Input::Single("hi".into())]);
        assert!(r.single && !r.truncate && !r.raw_scores);
        let r = ok(r#"{"inputs": ["a", "b"], "raw_scores": true}"#);
        assert_eq!(r.inputs, [Input::Pair("a".into(), "b".into())]);
        assert!(r.single && r.raw_scores);
        let r = ok(r#"{"inputs": [["a"], ["a", "b"]], "truncate": true}"#);
        assert_eq!(
            r.inputs,
            [
                Input::Single("a".into()),
                Input::Pair("a".into(), "b".into())
            ]
        );
        assert!(!r.single && r.truncate);
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        assert!(err("{").contains("malformed JSON"));
        assert!(err(r#"{"text": "a"}"#).contains("unknown field `text`"));
        assert!(err(r#"{"truncate": true}"#).contains("missing field `inputs`"));
        assert!(err(r#"{"inputs": ""}"#).contains("inputs is empty"));
        assert!(err(r#"{"inputs": []}"#).contains("empty list"));
        assert!(err(r#"{"inputs": [["a", "b", "c"]]}"#).contains("inputs[0]"));
        assert!(err(r#"{"inputs": [["a"], [" "]]}"#).contains("inputs[1][0] is empty"));
        assert!(err(r#"{"inputs": 3}"#).contains("`inputs` must be"));
        assert!(err(r#"{"inputs": "a", "raw_scores": "yes"}"#).contains("raw_scores"));
        assert!(ok(r#"{"inputs": "a", "truncation_direction": "Left"}"#).truncate_left);
        assert!(!ok(r#"{"inputs": "a", "truncation_direction": "Right"}"#).truncate_left);
        assert!(err(r#"{"inputs": "a", "truncation_direction": "Up"}"#).contains("Right or Left"));
        let big = format!(r#"{{"inputs": [{}]}}"#, [r#"["a"]"#; 9].join(","));
        let e = parse_predict(big.as_bytes(), 8).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn rerank_bodies_are_checked_and_answers_sorted() {
        let r = parse_rerank(
            br#"{"query": "q", "texts": ["a", "b"], "return_text": true}"#,
            8,
        )
        .unwrap();
        assert_eq!((r.query.as_str(), r.texts.len()), ("q", 2));
        assert!(r.return_text && !r.raw_scores && !r.truncate);
        let err = |b: &str| parse_rerank(b.as_bytes(), 2).unwrap_err();
        assert!(err(r#"{"texts": ["a"]}"#)
            .message
            .contains("missing field `query`"));
        assert!(err(r#"{"query": "q"}"#)
            .message
            .contains("missing field `texts`"));
        assert!(err(r#"{"query": "q", "texts": []}"#)
            .message
            .contains("empty list"));
        assert!(err(r#"{"query": "q", "texts": "a"}"#)
            .message
            .contains("list of strings"));
        assert!(err(r#"{"query": "q", "texts": ["a", 3]}"#)
            .message
            .contains("texts[1]"));
        assert!(err(r#"{"query": " ", "texts": ["a"]}"#)
            .message
            .contains("query is empty"));
        assert!(err(r#"{"query": "q", "texts": ["a"], "top_n": 1}"#)
            .message
            .contains("top_n"));
        let big = err(r#"{"query": "q", "texts": ["a", "b", "c"]}"#);
        assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
        let v = reranked(
            &[0.1, 0.9, 0.1],
            Some(&["x".into(), "y".into(), "z".into()]),
        );
        let idx: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [1, 0, 2]);
        assert_eq!(v[0]["text"], "y");
        assert!(reranked(&[0.5], None)[0].get("text").is_none());
    }

    #[test]
    fn ranked_sorts_by_score() {
        let v = ranked(&["a".into(), "b".into()], &[0.25, 0.75]);
        assert_eq!(v[0]["label"], "b");
        assert_eq!(v[1]["score"], 0.25);
    }
}
