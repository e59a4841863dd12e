//! Sentence-pair examples from disk, in any of the layouts MRPC is distributed in.
//!
//! A data folder may hold (checked in this order of preference, per split):
//! 1. Hugging Face `glue`/`mrpc` parquet: `[mrpc/]{split}-*.parquet` (or `{split}.parquet`),
//!    columns `sentence1`, `sentence2`, `label`, `idx`;
//! 2. GLUE TSV: `train.tsv`, `dev.tsv`, `test.tsv` (columns `Quality`/`index`, `#1 ID`,
//!    `#2 ID`, `#1 String`, `#2 String`);
//! 3. the original MSR release: `msr_paraphrase_{train,test}.txt` (as `train.tsv`);
//! 4. `{split}.csv` and 5. `{split}.jsonl` with `sentence1`, `sentence2`, optional `label`
//!    and optional `idx`.
//!
//! The first layout that has a file for the requested split wins, so a folder holding both
//! `test.tsv` (unlabelled) and `msr_paraphrase_test.txt` (labelled) reads `test.tsv`.
//! A label of -1 means "unlabelled" in every layout (the Hugging Face convention) and becomes
//! `None`; an empty CSV cell, a JSON `null` and a missing label column do the same. `idx`
//! defaults to the row number within the split (0-based). Labels are not range-checked
//! here: see [`check_labels`].
use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::fs;
use std::path::{Path, PathBuf};

/// One sentence pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub sentence1: String,
    pub sentence2: String,
    /// `None` where the split is unlabelled (GLUE's hidden test labels).
    pub label: Option<i64>,
    /// Row number within the split unless the file says otherwise.
    pub idx: i64,
}

/// The on-disk layouts, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Parquet,
    GlueTsv,
    Msr,
    Csv,
    Jsonl,
}

impl Layout {
    pub const ALL: [Layout; 5] = [
        Layout::Parquet,
        Layout::GlueTsv,
        Layout::Msr,
        Layout::Csv,
        Layout::Jsonl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layout::Parquet => "Hugging Face parquet",
            Layout::GlueTsv => "GLUE TSV",
            Layout::Msr => "MSR paraphrase txt",
            Layout::Csv => "CSV",
            Layout::Jsonl => "JSONL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    fn parse(name: &str) -> Result<Split> {
        match name {
            "train" => Ok(Split::Train),
            "validation" | "dev" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            other => bail!(
                "unknown split '{other}': expected train, validation (or dev), test, \
                 or a '+'- or ','-joined list such as train+validation"
            ),
        }
    }

    /// File-name stems this split may go by (HF says validation, GLUE says dev).
    fn stems(self) -> &'static [&'static str] {
        match self {
            Split::Train => &["train"],
            Split::Validation => &["validation", "dev"],
            Split::Test => &["test"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// Loads `split` ("train", "validation"/"dev", "test", or e.g. "train+validation", the parts
/// concatenated in order, each keeping its own `idx`) from `data_dir`.
pub fn load_split(data_dir: &Path, split: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for part in split.split(['+', ',']) {
        let part = part.trim();
        if part.is_empty() {
            bail!("bad split '{split}': empty name in a '+'-joined list");
        }
        let split = Split::parse(part)?;
        let (layout, files) = locate(data_dir, split)?;
        let examples = read_files(layout, &files)?;
        if examples.is_empty() {
            bail!(
                "{}: the {} split is empty (a header but no rows)",
                join_paths(&files),
                split.name()
            );
        }
        out.extend(examples);
    }
    Ok(out)
}

/// The layout and file(s) that [`load_split`] reads for one split name (no '+').
pub fn locate_split(data_dir: &Path, split: &str) -> Result<(Layout, Vec<PathBuf>)> {
    locate(data_dir, Split::parse(split.trim())?)
}

/// Errors naming the first example whose label is outside `0..num_classes`.
pub fn check_labels(examples: &[Example], num_classes: usize, source: &str) -> Result<()> {
    for ex in examples {
        if let Some(l) = ex.label {
            if l < 0 || l as u128 >= num_classes as u128 {
                bail!(
                    "{source}: example idx {} has label {l}, outside 0..={} (num_classes = {num_classes})",
                    ex.idx,
                    num_classes as i64 - 1
                );
            }
        }
    }
    Ok(())
}

fn locate(data_dir: &Path, split: Split) -> Result<(Layout, Vec<PathBuf>)> {
    if !data_dir.is_dir() {
        bail!(
            "data folder {} does not exist or is not a folder",
            data_dir.display()
        );
    }
    for layout in Layout::ALL {
        let files = candidates(data_dir, layout, split)?;
        if !files.is_empty() {
            return Ok((layout, files));
        }
    }
    let mut looked = Vec::new();
    for stem in split.stems() {
        looked.push(format!("[mrpc/]{stem}-*.parquet"));
    }
    looked.push(
        match split {
            Split::Train => "train.tsv",
            Split::Validation => "dev.tsv",
            Split::Test => "test.tsv",
        }
        .to_string(),
    );
    match split {
        Split::Train => looked.push("msr_paraphrase_train.txt".into()),
        Split::Test => looked.push("msr_paraphrase_test.txt".into()),
        Split::Validation => {}
    }
    for stem in split.stems() {
        looked.push(format!("{stem}.csv"));
        looked.push(format!("{stem}.jsonl"));
    }
    bail!(
        "no file for the {} split in {} (looked for {}); the folder holds: {}",
        split.name(),
        data_dir.display(),
        looked.join(", "),
        list_folder(data_dir)
    )
}

fn candidates(dir: &Path, layout: Layout, split: Split) -> Result<Vec<PathBuf>> {
    let existing = |names: Vec<String>| -> Vec<PathBuf> {
        names
            .into_iter()
            .map(|n| dir.join(n))
            .filter(|p| p.is_file())
            .take(1)
            .collect()
    };
    Ok(match layout {
        Layout::Parquet => {
            // HF shards a split as name-00000-of-0000N.parquet; read all shards in name order.
            for folder in [dir.to_path_buf(), dir.join("mrpc")] {
                if !folder.is_dir() {
                    continue;
                }
                for stem in split.stems() {
                    let mut found = Vec::new();
                    let entries = fs::read_dir(&folder)
                        .with_context(|| format!("cannot list {}", folder.display()))?;
                    for entry in entries {
                        let entry =
                            entry.with_context(|| format!("cannot list {}", folder.display()))?;
                        let name = entry.file_name().to_string_lossy().into_owned();
                        let shard = name.starts_with(&format!("{stem}-"))
                            || name == format!("{stem}.parquet");
                        if shard && name.ends_with(".parquet") && entry.path().is_file() {
                            found.push(entry.path());
                        }
                    }
                    if !found.is_empty() {
                        found.sort();
                        return Ok(found);
                    }
                }
            }
            Vec::new()
        }
        Layout::GlueTsv => existing(match split {
            Split::Train => vec!["train.tsv".into()],
            Split::Validation => vec!["dev.tsv".into(), "validation.tsv".into()],
            Split::Test => vec!["test.tsv".into()],
        }),
        Layout::Msr => existing(match split {
            Split::Train => vec!["msr_paraphrase_train.txt".into()],
            Split::Validation => vec![],
            Split::Test => vec!["msr_paraphrase_test.txt".into()],
        }),
        Layout::Csv => existing(split.stems().iter().map(|s| format!("{s}.csv")).collect()),
        Layout::Jsonl => existing(split.stems().iter().map(|s| format!("{s}.jsonl")).collect()),
    })
}

fn list_folder(dir: &Path) -> String {
    let mut names = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let mut name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                name.push('/');
            }
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

fn join_paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_files(layout: Layout, files: &[PathBuf]) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for file in files {
        // idx defaults continue across shards: they number rows within the split.
        let first_row = out.len() as i64;
        let rows = match layout {
            Layout::Parquet => read_parquet(file, first_row)?,
            Layout::GlueTsv | Layout::Msr => read_tsv(file)?,
            Layout::Csv => read_csv(file)?,
            Layout::Jsonl => read_jsonl(file)?,
        };
        out.extend(rows);
    }
    Ok(out)
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Labels are integers; -1 is the Hugging Face marker for "no label".
fn label_from_int(v: i64) -> Option<i64> {
    (v != -1).then_some(v)
}

fn parse_label(cell: &str, at: &dyn Fn() -> String, column: &str) -> Result<Option<i64>> {
    let t = cell.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let v: i64 = t.parse().map_err(|_| {
        anyhow!(
            "{}: column '{column}': label '{cell}' is not an integer",
            at()
        )
    })?;
    Ok(label_from_int(v))
}

fn parse_idx(cell: &str, at: &dyn Fn() -> String, column: &str) -> Result<i64> {
    cell.trim()
        .parse()
        .map_err(|_| anyhow!("{}: column '{column}': '{cell}' is not an integer", at()))
}

fn missing_columns_error(path: &Path, missing: &[&str], present: &[String]) -> anyhow::Error {
    anyhow!(
        "{}: missing column(s) {} (the header has: {})",
        path.display(),
        missing
            .iter()
            .map(|m| format!("'{m}'"))
            .collect::<Vec<_>>()
            .join(", "),
        present
            .iter()
            .map(|m| format!("'{m}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// GLUE TSV and MSR txt: tab-separated, quoting off (a `"` is an ordinary character), header
/// line first, byte-order mark and final newline optional.
fn read_tsv(path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.len() > 1 && lines.last() == Some(&"") {
        lines.pop();
    }
    let strip_cr = |l: &str| l.strip_suffix('\r').unwrap_or(l).to_string();
    let header_line = strip_cr(lines[0]);
    if header_line.trim().is_empty() {
        bail!("{}: empty file (no header line)", path.display());
    }
    let header: Vec<String> = header_line
        .split('\t')
        .map(|s| s.trim().to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (s1, s2, quality, index) = (
        col("#1 String"),
        col("#2 String"),
        col("Quality"),
        col("index"),
    );
    let mut missing = Vec::new();
    if quality.is_none() && index.is_none() {
        missing.push("Quality");
    }
    if s1.is_none() {
        missing.push("#1 String");
    }
    if s2.is_none() {
        missing.push("#2 String");
    }
    let (Some(s1), Some(s2)) = (s1, s2) else {
        return Err(missing_columns_error(path, &missing, &header));
    };
    if !missing.is_empty() {
        return Err(missing_columns_error(path, &missing, &header));
    }
    let mut out = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate().skip(1) {
        let line = strip_cr(raw);
        let lineno = i + 1;
        let at = || format!("{}:{lineno}", path.display());
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != header.len() {
            bail!(
                "{}: expected {} tab-separated fields (as in the header), found {}",
                at(),
                header.len(),
                fields.len()
            );
        }
        let label = match quality {
            Some(q) => parse_label(fields[q], &at, "Quality")?,
            None => None,
        };
        let idx = match index {
            Some(c) => parse_idx(fields[c], &at, "index")?,
            None => out.len() as i64,
        };
        out.push(Example {
            sentence1: fields[s1].to_string(),
            sentence2: fields[s2].to_string(),
            label,
            idx,
        });
    }
    Ok(out)
}

/// A record of a CSV file and its `path:line` for messages; a malformed record is an error
/// naming its line.
pub(crate) fn csv_record(
    path: &Path,
    rec: csv::Result<csv::StringRecord>,
) -> Result<(csv::StringRecord, String)> {
    let rec = rec.map_err(|e| {
        let line = e.position().map(|p| p.line()).unwrap_or(0);
        anyhow!("{}:{line}: malformed CSV: {e}", path.display())
    })?;
    let line = rec.position().map(|p| p.line()).unwrap_or(0);
    Ok((rec, format!("{}:{line}", path.display())))
}

/// A CSV reader over `text` (fields counted by the caller) and its trimmed header.
pub(crate) fn csv_reader<'t>(
    path: &Path,
    text: &'t str,
) -> Result<(csv::Reader<&'t [u8]>, Vec<String>)> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = rdr
        .headers()
        .with_context(|| format!("{}: cannot read the header line", path.display()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    Ok((rdr, header))
}

fn read_csv(path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let (mut rdr, header) = csv_reader(path, &text)?;
    let col = |name: &str| header.iter().position(|h| h == name);
    let (s1, s2, label_col, idx_col) =
        (col("sentence1"), col("sentence2"), col("label"), col("idx"));
    let (Some(s1), Some(s2)) = (s1, s2) else {
        let missing: Vec<&str> = [("sentence1", s1), ("sentence2", s2)]
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| *n)
            .collect();
        return Err(missing_columns_error(path, &missing, &header));
    };
    let mut out = Vec::new();
    for rec in rdr.records() {
        let (rec, place) = csv_record(path, rec)?;
        let at = || place.clone();
        if rec.len() != header.len() {
            bail!(
                "{}: expected {} comma-separated fields (as in the header), found {}",
                at(),
                header.len(),
                rec.len()
            );
        }
        let label = match label_col {
            Some(c) => parse_label(&rec[c], &at, "label")?,
            None => None,
        };
        let idx = match idx_col {
            Some(c) if !rec[c].trim().is_empty() => parse_idx(&rec[c], &at, "idx")?,
            _ => out.len() as i64,
        };
        out.push(Example {
            sentence1: rec[s1].to_string(),
            sentence2: rec[s2].to_string(),
            label,
            idx,
        });
    }
    Ok(out)
}

fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let at = || format!("{}:{lineno}", path.display());
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: not valid JSON: {e}", at()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("{}: expected a JSON object per line", at()))?;
        let sentence = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("{}: '{name}' must be a string, found {other}", at()),
                None => {
                    let keys: Vec<String> = obj.keys().map(|k| format!("'{k}'")).collect();
                    bail!(
                        "{}: missing column '{name}' (the object has: {})",
                        at(),
                        keys.join(", ")
                    )
                }
            }
        };
        let int_field = |name: &str| -> Result<Option<i64>> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(n)) => n
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("{}: column '{name}': '{n}' is not an integer", at())),
                Some(serde_json::Value::String(s)) => s
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow!("{}: column '{name}': '{s}' is not an integer", at())),
                Some(other) => bail!("{}: column '{name}': '{other}' is not an integer", at()),
            }
        };
        let sentence1 = sentence("sentence1")?;
        let sentence2 = sentence("sentence2")?;
        let label = int_field("label")?.and_then(label_from_int);
        let idx = int_field("idx")?.unwrap_or(out.len() as i64);
        out.push(Example {
            sentence1,
            sentence2,
            label,
            idx,
        });
    }
    Ok(out)
}

fn field_int(f: &Field) -> Option<i64> {
    match *f {
        Field::Byte(v) => Some(v as i64),
        Field::Short(v) => Some(v as i64),
        Field::Int(v) => Some(v as i64),
        Field::Long(v) => Some(v),
        Field::UByte(v) => Some(v as i64),
        Field::UShort(v) => Some(v as i64),
        Field::UInt(v) => Some(v as i64),
        Field::ULong(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

thread_local! {
    /// Set while this thread decodes a parquet file: its panics become errors, unprinted.
    static IN_PARQUET_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The parquet crate panics on some corrupt files (out-of-bounds indexing in its RLE
/// decoder, found by tests/fuzz.rs) instead of returning an error. Such a panic becomes an
/// error naming the file, and its message is not printed as a crash.
fn read_parquet(path: &Path, first_row: i64) -> Result<Vec<Example>> {
    guard_parquet(path, || read_parquet_unguarded(path, first_row))
}

/// Runs a parquet decode of `path`, turning the decoder's panics into an error naming it.
pub(crate) fn guard_parquet<T>(path: &Path, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_PARQUET_DECODER.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    IN_PARQUET_DECODER.with(|f| f.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    IN_PARQUET_DECODER.with(|f| f.set(false));
    result.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        bail!(
            "{}: corrupt parquet file (the decoder failed: {what})",
            path.display()
        )
    })
}

/// The top-level column names of a parquet file, in schema order.
pub(crate) fn parquet_columns(reader: &SerializedFileReader<fs::File>) -> Vec<String> {
    reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect()
}

fn read_parquet_unguarded(path: &Path, first_row: i64) -> Result<Vec<Example>> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let columns = parquet_columns(&reader);
    let missing: Vec<&str> = ["sentence1", "sentence2"]
        .into_iter()
        .filter(|c| !columns.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Err(missing_columns_error(path, &missing, &columns));
    }
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: cannot read rows", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let at = || format!("{}: row {}", path.display(), i + 1);
        let row = row.with_context(|| format!("{}: cannot decode", at()))?;
        let (mut s1, mut s2, mut label, mut idx) = (None, None, None, None);
        for (name, field) in row.get_column_iter() {
            match name.as_str() {
                "sentence1" | "sentence2" => {
                    let s = match field {
                        Field::Str(s) => s.clone(),
                        Field::Null => bail!("{}: column '{name}' is null", at()),
                        other => bail!("{}: column '{name}' is {other:?}, not a string", at()),
                    };
                    if name == "sentence1" {
                        s1 = Some(s);
                    } else {
                        s2 = Some(s);
                    }
                }
                "label" => {
                    label = match field {
                        Field::Null => None,
                        Field::Str(s) => parse_label(s, &at, "label")?,
                        f => Some(field_int(f).ok_or_else(|| {
                            anyhow!("{}: column 'label': {f:?} is not an integer", at())
                        })?),
                    }
                    .and_then(label_from_int);
                }
                "idx" => {
                    idx = match field {
                        Field::Null => None,
                        f => Some(field_int(f).ok_or_else(|| {
                            anyhow!("{}: column 'idx': {f:?} is not an integer", at())
                        })?),
                    }
                }
                _ => {}
            }
        }
        let (Some(sentence1), Some(sentence2)) = (s1, s2) else {
            bail!("{}: sentence columns missing from the row", at());
        };
        out.push(Example {
            sentence1,
            sentence2,
            label,
            idx: idx.unwrap_or(first_row + i as i64),
        });
    }
    Ok(out)
}
