//! A task's examples: its split's file(s) located in `data_dir`, its text and label columns
//! picked, its labels turned into targets by a [`LabelSpec`] (inferred from the training
//! labels as transformers infers `problem_type`: floats → regression, lists → multi-label,
//! else single-label). Errors name the file, the line or row, and the column.
use super::table::{self, Cell, Format, Table};
use crate::labels::{LabelSpec, ProblemType, Target};
use crate::task::{glue, GlueTsv, Task};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A label as the file gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawLabel {
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<String>),
}

impl RawLabel {
    fn kind(&self) -> &'static str {
        match self {
            RawLabel::Int(_) => "an integer",
            RawLabel::Float(_) => "a number",
            RawLabel::Str(_) => "a string",
            RawLabel::List(_) => "a list",
        }
    }

    fn text(&self) -> String {
        match self {
            RawLabel::Int(i) => i.to_string(),
            RawLabel::Float(f) => f.to_string(),
            RawLabel::Str(s) => s.clone(),
            RawLabel::List(l) => l.join("|"),
        }
    }
}

/// One example of a task: its texts (in `text_columns` order), its label, its id.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskExample {
    pub texts: Vec<String>,
    pub label: Option<RawLabel>,
    pub idx: i64,
    /// "file:line" or "file: row N".
    pub where_: String,
    /// A preference pair in TRL's conversational form: each text is the JSON of a list of
    /// `{"role", "content"}` messages.
    pub conversational: bool,
}

/// Split names a file may go by: HF says `validation[_matched]`, GLUE says `dev[_matched]`.
fn stems(split: &str) -> Vec<String> {
    let mut v = vec![split.to_string()];
    if let Some(rest) = split.strip_prefix("validation") {
        v.push(format!("dev{rest}"));
    } else if let Some(rest) = split.strip_prefix("dev") {
        v.push(format!("validation{rest}"));
    }
    v
}

/// The file(s) of `split` in `dir` or `dir/<task>`: HF parquet shards (`{split}-*.parquet`),
/// then `{split}.parquet`, `.tsv`, `.csv`, `.jsonl`.
pub fn locate(dir: &Path, task: &str, split: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "data folder {} does not exist or is not a folder",
            dir.display()
        );
    }
    let mut looked = Vec::new();
    for folder in [dir.to_path_buf(), dir.join(task)] {
        if !folder.is_dir() {
            continue;
        }
        for stem in stems(split) {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(&folder)
                .with_context(|| format!("cannot list {}", folder.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    name.is_some_and(|n| {
                        n.starts_with(&format!("{stem}-")) && n.ends_with(".parquet")
                    }) && p.is_file()
                })
                .collect();
            if !shards.is_empty() {
                shards.sort();
                return Ok(shards);
            }
            for ext in ["parquet", "tsv", "csv", "jsonl"] {
                let p = folder.join(format!("{stem}.{ext}"));
                if p.is_file() {
                    return Ok(vec![p]);
                }
                looked.push(format!("{stem}.{ext}"));
            }
        }
    }
    bail!(
        "no file for the {split} split in {} or {}/{task} (looked for {split}-*.parquet, {})",
        dir.display(),
        dir.display(),
        looked.join(", ")
    )
}

/// The examples of `split` (or several, `+`-joined). `require_labels`: every row must have
/// a label (training and evaluation); else unlabelled rows are kept (prediction).
pub fn load_split(
    dir: &Path,
    task: &Task,
    split: &str,
    require_labels: bool,
) -> Result<Vec<TaskExample>> {
    let mut out = Vec::new();
    for part in split.split(['+', ',']) {
        let part = part.trim();
        if part.is_empty() {
            bail!("bad split '{split}': empty name in a '+'-joined list");
        }
        let files = locate(dir, &task.name, part)?;
        let mut got = Vec::new();
        for f in &files {
            got.extend(read_file(f, task, require_labels, got.len() as i64)?);
        }
        if got.is_empty() {
            bail!("{}: the {part} split has no rows", files[0].display());
        }
        out.extend(got);
    }
    Ok(out)
}

/// The examples of one file (any format); `first_row` numbers rows across shards.
pub fn read_file(
    path: &Path,
    task: &Task,
    require_labels: bool,
    first_row: i64,
) -> Result<Vec<TaskExample>> {
    let glue_tsv = glue(&task.name)
        .filter(|_| Format::of(path).ok() == Some(Format::Tsv))
        .map(|g| g.tsv);
    let table = match glue_tsv {
        Some(tsv) => read_glue_tsv(path, &tsv)?,
        None => table::read(path, None)?,
    };
    let (text_cols, label_col, idx_col): (Vec<String>, String, Option<String>) = match glue_tsv {
        Some(tsv) => (
            tsv.text.iter().map(|s| s.to_string()).collect(),
            tsv.label.to_string(),
            tsv.index.map(str::to_string),
        ),
        // A reward model scores plain rows too: a `text` (and optional `prompt`) per row.
        None if task.is_preference()
            && !table.columns.iter().any(|c| c == "chosen")
            && table.columns.iter().any(|c| c == "text") =>
        {
            (
                vec!["text".to_string()],
                task.label_column.clone(),
                Some("idx".to_string()),
            )
        }
        None => (
            task.text_columns.clone(),
            task.label_column.clone(),
            Some("idx".to_string()),
        ),
    };
    extract(
        &table,
        &text_cols,
        &label_col,
        idx_col.as_deref(),
        require_labels,
        task,
        first_row,
    )
}

/// GLUE's TSV: CoLA's train/dev files have no header line; its test file has one.
fn read_glue_tsv(path: &Path, tsv: &GlueTsv) -> Result<Table> {
    if let Some(names) = tsv.headerless {
        let text = super::formats::read_text(path)?;
        let first = text.lines().next().unwrap_or("");
        if !first.starts_with("index\t") {
            return table::read(path, Some(names));
        }
    }
    table::read(path, None)
}

/// A JSONL list of message objects (read as their JSON texts) as one JSON array, checked.
fn messages_json(items: &[Cell]) -> Result<String> {
    let parts: Vec<&str> = items
        .iter()
        .map(|c| match c {
            Cell::Str(s) => Ok(s.as_str()),
            other => Err(anyhow!(
                "{other:?} is not a {{\"role\", \"content\"}} message"
            )),
        })
        .collect::<Result<_>>()?;
    let json = format!("[{}]", parts.join(","));
    super::chat::parse_messages(&json)?;
    Ok(json)
}

fn missing_column(table: &Table, column: &str, what: &str) -> anyhow::Error {
    anyhow!(
        "{}: no {what} column '{column}' (the file has: {})",
        table.path.display(),
        table
            .columns
            .iter()
            .map(|c| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn extract(
    table: &Table,
    text_cols: &[String],
    label_col: &str,
    idx_col: Option<&str>,
    require_labels: bool,
    task: &Task,
    first_row: i64,
) -> Result<Vec<TaskExample>> {
    // GLUE marks a hidden test label with -1 (HF) or leaves the column out (TSV).
    let glue_task = glue(&task.name).is_some();
    let multi_label = task.problem_type == Some(ProblemType::MultiLabel);
    for c in text_cols {
        if !table.columns.contains(c) {
            return Err(missing_column(table, c, "text"));
        }
    }
    let has_label = table.columns.iter().any(|c| c == label_col);
    // A preference pair's label is its order; `margin` is optional.
    if require_labels && !has_label && !task.is_preference() {
        return Err(missing_column(table, label_col, "label"));
    }
    let textual = matches!(Format::of(&table.path)?, Format::Csv | Format::Tsv);
    let mut out = Vec::with_capacity(table.rows.len());
    for (i, row) in table.rows.iter().enumerate() {
        let at = &row.where_;
        let mut texts = Vec::with_capacity(text_cols.len());
        let mut conversational = false;
        for c in text_cols {
            let t = match row.cells.get(c) {
                Some(Cell::List(items)) if task.is_preference() => {
                    conversational = true;
                    messages_json(items).map_err(|e| anyhow!("{at}: column '{c}': {e}"))?
                }
                Some(Cell::Str(s)) => s.clone(),
                Some(Cell::Int(v)) => v.to_string(),
                Some(Cell::Float(v)) => v.to_string(),
                Some(Cell::Null) | None => String::new(),
                Some(other) => bail!("{at}: column '{c}': {other:?} is not a text"),
            };
            if t.trim().is_empty() {
                bail!("{at}: column '{c}': empty text");
            }
            texts.push(t);
        }
        if task.is_preference() {
            // TRL's explicit-prompt form: `prompt` goes in front of both texts.
            let prompt = match row.cells.get("prompt") {
                Some(Cell::List(items)) if conversational => {
                    messages_json(items).map_err(|e| anyhow!("{at}: column 'prompt': {e}"))?
                }
                None | Some(Cell::Null) if conversational => "[]".to_string(),
                Some(Cell::Str(s)) => s.clone(),
                Some(Cell::Null) | None => String::new(),
                Some(other) => bail!("{at}: column 'prompt': {other:?} is not a text"),
            };
            texts.insert(0, prompt);
        }
        let label = match row.cells.get(label_col) {
            None => None,
            Some(cell) => {
                raw_label(cell, textual).map_err(|e| anyhow!("{at}: column '{label_col}': {e}"))?
            }
        };
        let label = label.filter(|l| !(glue_task && *l == RawLabel::Int(-1)));
        // In CSV/TSV a multi-label row with no tags is an empty cell: with `problem_type`
        // saying multi-label, that is the empty set, not a missing label.
        let label = match (label, row.cells.get(label_col)) {
            (None, Some(Cell::Str(_))) if textual && multi_label => {
                Some(RawLabel::List(Vec::new()))
            }
            (l, _) => l,
        };
        if require_labels && label.is_none() && !task.is_preference() {
            bail!("{at}: column '{label_col}': no label");
        }
        let idx = match idx_col.and_then(|c| row.cells.get(c).map(|v| (c, v))) {
            Some((_, Cell::Int(v))) => *v,
            Some((c, Cell::Str(s))) if !s.trim().is_empty() => s
                .trim()
                .parse()
                .map_err(|_| anyhow!("{at}: column '{c}': '{s}' is not an integer"))?,
            _ => first_row + i as i64,
        };
        out.push(TaskExample {
            texts,
            label,
            idx,
            where_: row.where_.clone(),
            conversational,
        });
    }
    Ok(out)
}

/// A label cell; `textual`: CSV/TSV, whose cells are strings (`a|b` a list of names).
fn raw_label(cell: &Cell, textual: bool) -> Result<Option<RawLabel>> {
    Ok(match cell {
        Cell::Null => None,
        Cell::Int(i) => Some(RawLabel::Int(*i)),
        Cell::Float(f) => Some(RawLabel::Float(*f)),
        Cell::Bool(b) => Some(RawLabel::Int(i64::from(*b))),
        Cell::List(items) => Some(RawLabel::List(
            items
                .iter()
                .map(|c| match c {
                    Cell::Str(s) => Ok(s.clone()),
                    Cell::Int(i) => Ok(i.to_string()),
                    other => bail!("list item {other:?} is not a label name"),
                })
                .collect::<Result<_>>()?,
        )),
        Cell::Str(s) => {
            let t = s.trim();
            if t.is_empty() {
                None
            } else if textual && t.contains('|') {
                Some(RawLabel::List(
                    t.split('|').map(|x| x.trim().to_string()).collect(),
                ))
            } else if let Ok(i) = t.parse::<i64>() {
                Some(RawLabel::Int(i))
            } else if let Some(f) = textual.then(|| t.parse::<f64>().ok()).flatten() {
                Some(RawLabel::Float(f))
            } else {
                Some(RawLabel::Str(t.to_string()))
            }
        }
    })
}

/// The label side of a task from its training examples (`source` names them in errors).
pub fn infer_labels(task: &Task, train: &[TaskExample]) -> Result<LabelSpec> {
    if task.is_preference() {
        return Ok(LabelSpec::transformers_default(1));
    }
    let labelled: Vec<(&TaskExample, &RawLabel)> = train
        .iter()
        .filter_map(|e| e.label.as_ref().map(|l| (e, l)))
        .collect();
    let col = &task.label_column;
    let has = |k: &str| labelled.iter().any(|(_, l)| l.kind() == k);
    let first_of = |k: &str| labelled.iter().find(|(_, l)| l.kind() == k);
    let problem = match task.problem_type {
        Some(p) => p,
        None if has("a list") => ProblemType::MultiLabel,
        None if has("a number") => ProblemType::Regression,
        None => ProblemType::SingleLabel,
    };
    // Mixed label types: a string beside numbers (no list to make them tag names).
    if problem != ProblemType::MultiLabel && has("a string") {
        for k in ["an integer", "a number"] {
            if let (Some((e, l)), Some((e0, l0))) = (first_of(k), first_of("a string")) {
                bail!(
                    "{}: column '{col}': mixed label types: {} '{}' here, {} '{}' at {}",
                    e.where_,
                    l.kind(),
                    l.text(),
                    l0.kind(),
                    l0.text(),
                    e0.where_
                );
            }
        }
    }
    let names: Vec<String> = match (problem, &task.labels) {
        (ProblemType::Regression, Some(_)) => {
            bail!("`labels` names classes; a regression task has none")
        }
        (ProblemType::Regression, None) => vec!["LABEL_0".into()],
        (_, Some(names)) => names.clone(),
        (ProblemType::SingleLabel, None) => {
            if has("a string") {
                let s: BTreeSet<String> = labelled.iter().map(|(_, l)| l.text()).collect();
                s.into_iter().collect()
            } else {
                let mut ints = BTreeSet::new();
                for (e, l) in &labelled {
                    match l {
                        RawLabel::Int(i) => ints.insert(*i),
                        RawLabel::Float(f) if f.fract() == 0.0 => ints.insert(*f as i64),
                        other => bail!(
                            "{}: column '{col}': {} '{}' is not a class (problem_type {})",
                            e.where_,
                            other.kind(),
                            other.text(),
                            problem.as_str()
                        ),
                    };
                }
                ints.into_iter().map(|i| i.to_string()).collect()
            }
        }
        (ProblemType::MultiLabel, None) => {
            let mut s = BTreeSet::new();
            for (_, l) in &labelled {
                match l {
                    RawLabel::List(items) => s.extend(items.iter().cloned()),
                    other => {
                        s.insert(other.text());
                    }
                }
            }
            s.into_iter().collect()
        }
    };
    // The file(s) the labels came from, for the errors about them all.
    let files: BTreeSet<&str> = train
        .iter()
        .map(|e| {
            e.where_
                .rsplit_once(':')
                .map_or(e.where_.as_str(), |(f, _)| f)
        })
        .collect();
    let source = files.into_iter().collect::<Vec<_>>().join(", ");
    if problem == ProblemType::SingleLabel && names.len() < 2 {
        bail!(
            "{source}: column '{col}': a single-label task needs at least 2 labels, found {:?}",
            names
        );
    }
    if problem == ProblemType::MultiLabel && names.is_empty() {
        bail!("{source}: column '{col}': a multi-label task needs at least 1 label name");
    }
    let spec = LabelSpec {
        problem_type: problem,
        names,
    };
    for (e, l) in &labelled {
        encode(&spec, l, col).with_context(|| e.where_.clone())?;
    }
    Ok(spec)
}

/// The model's target for a label.
pub fn encode(spec: &LabelSpec, label: &RawLabel, column: &str) -> Result<Target> {
    let k = spec.num_labels();
    let class = |name: &str| -> Result<i64> {
        if let Some(id) = spec.id_of(name) {
            return Ok(id as i64);
        }
        bail!(
            "column '{column}': label '{name}' is not one of the labels [{}]",
            spec.names.join(", ")
        )
    };
    Ok(match spec.problem_type {
        ProblemType::SingleLabel => match label {
            RawLabel::Str(s) => Target::Class(class(s)?),
            RawLabel::Int(i) => match spec.id_of(&i.to_string()) {
                Some(id) => Target::Class(id as i64),
                // An integer names a class by its id where the names are words (GLUE's).
                None if (0..k as i64).contains(i) => Target::Class(*i),
                None => bail!(
                    "column '{column}': label {i} is neither a label name nor an id in 0..{k} (labels [{}])",
                    spec.names.join(", ")
                ),
            },
            RawLabel::Float(f) if f.fract() == 0.0 => {
                return encode(spec, &RawLabel::Int(*f as i64), column)
            }
            other => bail!(
                "column '{column}': {} '{}' is not a class label (problem_type {})",
                other.kind(),
                other.text(),
                spec.problem_type.as_str()
            ),
        },
        ProblemType::MultiLabel => {
            let items = match label {
                RawLabel::List(items) => items.clone(),
                other => vec![other.text()],
            };
            let mut hot = vec![0f32; k];
            for name in items.iter().filter(|n| !n.is_empty()) {
                hot[class(name)? as usize] = 1.0;
            }
            Target::Multi(hot)
        }
        ProblemType::Regression => {
            let v = match label {
                RawLabel::Int(i) => *i as f64,
                RawLabel::Float(f) => *f,
                other => bail!(
                    "column '{column}': {} '{}' is not a number (problem_type regression)",
                    other.kind(),
                    other.text()
                ),
            };
            if !v.is_finite() {
                bail!("column '{column}': regression target {v} is NaN or infinite");
            }
            Target::Value(v)
        }
    })
}

/// The targets of `examples` (`None` where unlabelled); errors name the row.
pub fn targets(
    spec: &LabelSpec,
    task: &Task,
    examples: &[TaskExample],
) -> Result<Vec<Option<Target>>> {
    if task.is_preference() {
        return examples
            .iter()
            .map(|e| match &e.label {
                // A plain row (prompt, text) has no order to learn.
                _ if e.texts.len() == 2 => Ok(None),
                None => Ok(Some(Target::Value(0.0))),
                Some(RawLabel::Int(m)) => Ok(Some(Target::Value(*m as f64))),
                Some(RawLabel::Float(m)) if m.is_finite() => Ok(Some(Target::Value(*m))),
                Some(other) => bail!(
                    "{}: column '{}': {} is not a number",
                    e.where_,
                    task.label_column,
                    other.text()
                ),
            })
            .collect();
    }
    examples
        .iter()
        .map(|e| {
            e.label
                .as_ref()
                .map(|l| encode(spec, l, &task.label_column).with_context(|| e.where_.clone()))
                .transpose()
        })
        .collect()
}
