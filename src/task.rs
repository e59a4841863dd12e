//! What a run classifies: the GLUE suite by name, or `task: custom` described by its config
//! keys (text columns, label column, label names, template, problem type, metrics). The
//! label side that travels with a trained adapter is [`TaskLabels`].
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::labels::{LabelSpec, ProblemType};

/// `problem_type` in transformers' spelling, in saved files.
mod problem_serde {
    use super::ProblemType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<ProblemType>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(p.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ProblemType>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| ProblemType::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// How one GLUE task's own TSV files lay out its columns (GLUE's data documentation; the
/// HF `glue` loading script reads them the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlueTsv {
    /// Column names of train/dev files without a header line (CoLA); `None`: a header line.
    pub headerless: Option<&'static [&'static str]>,
    /// The TSV columns holding the texts, in the order of [`GlueTask::columns`].
    pub text: &'static [&'static str],
    /// The TSV column holding the label (absent from test files).
    pub label: &'static str,
    /// The TSV column holding the example id, where one exists.
    pub index: Option<&'static str>,
}

/// One GLUE task: HF `glue/<name>` columns, label names in id order, problem type, and the
/// official metrics (the `evaluate` library's keys; the first is the main one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlueTask {
    pub name: &'static str,
    /// Text columns of the HF parquet layout.
    pub columns: &'static [&'static str],
    /// Label names in id order (HF's `ClassLabel` names); empty for regression.
    pub labels: &'static [&'static str],
    pub problem: ProblemType,
    pub metrics: &'static [&'static str],
    /// The evaluation split(s): MNLI scores matched and mismatched.
    pub eval_splits: &'static [&'static str],
    /// The test split(s) GLUE's server scores.
    pub test_splits: &'static [&'static str],
    pub tsv: GlueTsv,
}

const SINGLE: ProblemType = ProblemType::SingleLabel;
const ONE_SPLIT: [&[&str]; 2] = [&["validation"], &["test"]];

/// A task of the suite; `splits`: its evaluation and test splits.
const fn task(
    name: &'static str,
    columns: &'static [&'static str],
    labels: &'static [&'static str],
    problem: ProblemType,
    metrics: &'static [&'static str],
    splits: [&'static [&'static str]; 2],
    tsv: GlueTsv,
) -> GlueTask {
    GlueTask {
        name,
        columns,
        labels,
        problem,
        metrics,
        eval_splits: splits[0],
        test_splits: splits[1],
        tsv,
    }
}

/// A TSV layout with a header line.
const fn tsv(text: &'static [&'static str], label: &'static str, index: &'static str) -> GlueTsv {
    GlueTsv {
        headerless: None,
        text,
        label,
        index: Some(index),
    }
}

const ENTAILMENT: &[&str] = &["entailment", "not_entailment"];
const PAIR: &[&str] = &["sentence1", "sentence2"];

/// The GLUE suite (label names and columns as HF's `glue` builder; TSV layouts as GLUE's).
pub const GLUE: [GlueTask; 9] = [
    task(
        "cola",
        &["sentence"],
        &["unacceptable", "acceptable"],
        SINGLE,
        &["matthews_correlation"],
        ONE_SPLIT,
        GlueTsv {
            headerless: Some(&["source", "label", "original_label", "sentence"]),
            ..tsv(&["sentence"], "label", "index")
        },
    ),
    task(
        "sst2",
        &["sentence"],
        &["negative", "positive"],
        SINGLE,
        &["accuracy"],
        ONE_SPLIT,
        tsv(&["sentence"], "label", "index"),
    ),
    task(
        "mrpc",
        PAIR,
        &["not_equivalent", "equivalent"],
        SINGLE,
        &["accuracy", "f1"],
        ONE_SPLIT,
        tsv(&["#1 String", "#2 String"], "Quality", "index"),
    ),
    task(
        "qqp",
        &["question1", "question2"],
        &["not_duplicate", "duplicate"],
        SINGLE,
        &["accuracy", "f1"],
        ONE_SPLIT,
        tsv(&["question1", "question2"], "is_duplicate", "id"),
    ),
    task(
        "stsb",
        PAIR,
        &[],
        ProblemType::Regression,
        &["pearson", "spearmanr"],
        ONE_SPLIT,
        tsv(PAIR, "score", "index"),
    ),
    task(
        "mnli",
        &["premise", "hypothesis"],
        &["entailment", "neutral", "contradiction"],
        SINGLE,
        &["accuracy"],
        [
            &["validation_matched", "validation_mismatched"],
            &["test_matched", "test_mismatched"],
        ],
        tsv(PAIR, "gold_label", "index"),
    ),
    task(
        "qnli",
        &["question", "sentence"],
        ENTAILMENT,
        SINGLE,
        &["accuracy"],
        ONE_SPLIT,
        tsv(&["question", "sentence"], "label", "index"),
    ),
    task(
        "rte",
        PAIR,
        ENTAILMENT,
        SINGLE,
        &["accuracy"],
        ONE_SPLIT,
        tsv(PAIR, "label", "index"),
    ),
    task(
        "wnli",
        PAIR,
        &["not_entailment", "entailment"],
        SINGLE,
        &["accuracy"],
        ONE_SPLIT,
        tsv(PAIR, "label", "index"),
    ),
];

/// The GLUE task called `name`.
pub fn glue(name: &str) -> Option<&'static GlueTask> {
    GLUE.iter().find(|t| t.name == name)
}

/// TRL's preference task: pairs of `chosen` and `rejected` texts (an optional `prompt` in
/// front of both, an optional `margin`), trained as a one-output reward model.
pub const PREFERENCE: &str = "preference";

/// Every task name the `task` key accepts.
pub fn task_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = GLUE.iter().map(|t| t.name).collect();
    v.push("custom");
    v.push(PREFERENCE);
    v
}

/// A task as a run uses it: the GLUE definition or the `custom` keys, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub name: String,
    pub text_columns: Vec<String>,
    pub label_column: String,
    /// Label names in id order, when given (GLUE's, or the `labels` key).
    pub labels: Option<Vec<String>>,
    /// `None`: inferred from the training labels.
    #[serde(with = "problem_serde")]
    pub problem_type: Option<ProblemType>,
    /// With `{prompt}` and `{column}` placeholders.
    pub template: String,
    /// The prompt's text (a named prompt resolved), so a saved task renders as it trained.
    #[serde(default)]
    pub prompt: String,
    /// Metric keys; `metric_for_best_model` first.
    pub metrics: Vec<String>,
}

/// The default template for one or two text columns, after the reference's
/// `f"{prompt} Sentence 1: {s1} Sentence 2: {s2}"`.
pub fn default_template(columns: &[String]) -> String {
    match columns {
        [a] => format!("{{prompt}} Sentence: {{{a}}}"),
        [a, b] => format!("{{prompt}} Sentence 1: {{{a}}} Sentence 2: {{{b}}}"),
        _ => String::new(),
    }
}

/// The default metrics of a problem type (the first is the main one).
pub fn default_metrics(problem: ProblemType, num_labels: usize) -> Vec<String> {
    let keys: &[&str] = match problem {
        ProblemType::SingleLabel if num_labels == 2 => &["accuracy", "f1"],
        ProblemType::SingleLabel => &["accuracy", "macro_f1"],
        ProblemType::MultiLabel => &["micro_f1", "macro_f1", "exact_match"],
        ProblemType::Regression => &["pearson", "spearmanr"],
    };
    keys.iter().map(|s| s.to_string()).collect()
}

/// The metric keys that apply to each problem type.
pub fn metrics_for(problem: ProblemType) -> &'static [&'static str] {
    match problem {
        ProblemType::SingleLabel => &["accuracy", "f1", "matthews_correlation", "macro_f1"],
        ProblemType::MultiLabel => &["micro_f1", "macro_f1", "exact_match"],
        ProblemType::Regression => &["pearson", "spearmanr"],
    }
}

/// Fills `{prompt}` and each `{column}` of `template`.
pub fn render(template: &str, prompt: &str, columns: &[String], texts: &[String]) -> String {
    let mut out = template.replace("{prompt}", prompt);
    for (c, t) in columns.iter().zip(texts) {
        out = out.replace(&format!("{{{c}}}"), t);
    }
    out
}

/// The start of every text [`render`] makes from `template`: the template up to its first
/// text column, with the prompt filled in (what each `chunk` window repeats).
pub fn prompt_part(template: &str, prompt: &str, columns: &[String]) -> String {
    let filled = template.replace("{prompt}", prompt);
    let first = columns
        .iter()
        .filter_map(|c| filled.find(&format!("{{{c}}}")))
        .min()
        .unwrap_or(filled.len());
    filled[..first].to_string()
}

/// The placeholders of a template that name neither `prompt` nor one of `columns`.
pub fn unknown_placeholders(template: &str, columns: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        if name != "prompt" && !columns.iter().any(|c| c == name) {
            out.push(name.to_string());
        }
        rest = &after[close + 1..];
    }
    out
}

/// The config keys a task is described by (`Config::to_task` fills them in).
#[derive(Debug, Clone, Copy)]
pub struct TaskKeys<'a> {
    pub task: &'a str,
    pub text_columns: &'a [String],
    pub label_column: &'a str,
    pub labels: Option<&'a [String]>,
    pub problem_type: Option<&'a str>,
    pub prompt: &'a str,
    pub template: Option<&'a str>,
    pub metric_for_best_model: Option<&'a str>,
}

impl Task {
    /// The task the config keys describe (checked by `Config::validate`).
    pub fn from_keys(cfg: &TaskKeys) -> Result<Task> {
        let problem_type = cfg.problem_type.map(ProblemType::parse).transpose()?;
        let mut task = if let Some(g) = glue(cfg.task) {
            Task {
                name: g.name.into(),
                text_columns: g.columns.iter().map(|s| s.to_string()).collect(),
                label_column: "label".into(),
                labels: (!g.labels.is_empty())
                    .then(|| g.labels.iter().map(|s| s.to_string()).collect()),
                problem_type: Some(g.problem),
                template: String::new(),
                prompt: String::new(),
                metrics: g.metrics.iter().map(|s| s.to_string()).collect(),
            }
        } else if cfg.task == PREFERENCE {
            Task {
                name: PREFERENCE.into(),
                text_columns: vec!["chosen".into(), "rejected".into()],
                label_column: "margin".into(),
                labels: None,
                problem_type: Some(ProblemType::Regression),
                template: String::new(),
                prompt: String::new(),
                metrics: vec!["accuracy".into(), "margin".into()],
            }
        } else if cfg.task == "custom" {
            if cfg.text_columns.is_empty() || cfg.text_columns.len() > 2 {
                bail!(
                    "task `custom` needs `text_columns`: one or two column names, got {}",
                    cfg.text_columns.len()
                );
            }
            Task {
                name: "custom".into(),
                text_columns: cfg.text_columns.to_vec(),
                label_column: cfg.label_column.to_string(),
                labels: cfg.labels.map(<[String]>::to_vec),
                problem_type,
                template: String::new(),
                prompt: String::new(),
                metrics: Vec::new(),
            }
        } else {
            bail!(
                "unknown task `{}` (expected one of: {})",
                cfg.task,
                task_names().join(", ")
            );
        };
        if task.name != "custom" && problem_type.is_some_and(|p| Some(p) != task.problem_type) {
            bail!(
                "task `{}` is {}; `problem_type` cannot change it",
                task.name,
                task.problem_type.map_or("?", ProblemType::as_str)
            );
        }
        if task.is_preference() {
            // TRL renders `prompt + chosen`: the texts are read as they are.
            return Ok(task);
        }
        task.prompt = crate::data::prompt::resolve_prompt(cfg.prompt)?;
        task.template = cfg
            .template
            .map_or_else(|| default_template(&task.text_columns), str::to_string);
        let unknown = unknown_placeholders(&task.template, &task.text_columns);
        if !unknown.is_empty() {
            bail!(
                "template {:?} names {} (the placeholders are {{prompt}} and the text columns: {})",
                task.template,
                unknown
                    .iter()
                    .map(|u| format!("{{{u}}}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                task.text_columns.join(", ")
            );
        }
        if let Some(m) = cfg.metric_for_best_model {
            task.metrics.retain(|k| k != m);
            task.metrics.insert(0, m.to_string());
        }
        Ok(task)
    }

    pub fn is_preference(&self) -> bool {
        self.name == PREFERENCE
    }

    /// MRPC with its default template: read by the original MRPC readers (GLUE TSV, MSR txt,
    /// parquet, CSV, JSONL) and rendered by `prompt::render`, byte for byte as before.
    pub fn is_classic_mrpc(&self) -> bool {
        self.name == "mrpc" && self.template == default_template(&self.text_columns)
    }

    /// The metrics once the label side is known (custom tasks default by problem type).
    pub fn metrics_for(&self, spec: &LabelSpec) -> Result<Vec<String>> {
        if self.is_preference() {
            // RewardTrainer's: the share of pairs ranked right, the mean reward gap.
            return Ok(self.metrics.clone());
        }
        let allowed = metrics_for(spec.problem_type);
        let mut m = default_metrics(spec.problem_type, spec.names.len());
        if self.name != "custom" {
            m = self.metrics.clone();
        } else if let Some(first) = self.metrics.first() {
            m.retain(|k| k != first);
            m.insert(0, first.clone());
        }
        for k in &m {
            if !allowed.contains(&k.as_str()) {
                bail!(
                    "metric `{k}` does not apply to {} (choose from {})",
                    spec.problem_type.as_str(),
                    allowed.join(", ")
                );
            }
        }
        Ok(m)
    }
}

/// A task and its label side: what travels with a trained adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskLabels {
    pub task: Task,
    pub spec: LabelSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_check_placeholders() {
        let cols = vec!["title".to_string(), "body".to_string()];
        let t = default_template(&cols);
        assert_eq!(t, "{prompt} Sentence 1: {title} Sentence 2: {body}");
        let texts = vec!["A".to_string(), "B".to_string()];
        assert_eq!(
            render(&t, "P?", &cols, &texts),
            "P? Sentence 1: A Sentence 2: B"
        );
        assert_eq!(
            render(&t, "", &cols, &texts),
            " Sentence 1: A Sentence 2: B"
        );
        assert_eq!(
            unknown_placeholders("{prompt} {title} {bdy}", &cols),
            vec!["bdy".to_string()]
        );
    }

    #[test]
    fn glue_suite_is_complete() {
        let names: Vec<&str> = GLUE.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
        );
        for t in GLUE {
            assert_eq!(t.columns.len(), t.tsv.text.len(), "{}", t.name);
            assert_eq!(t.labels.is_empty(), t.problem == ProblemType::Regression);
        }
    }
}
