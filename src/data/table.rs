//! Rows of any task's data file, before the task picks its columns: CSV, TSV (GLUE's
//! quoting-off layout), JSONL and parquet, each cell keeping the type the file gave it, and
//! each row knowing where it came from (file and line or row) for error messages.
use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One cell, typed as the file typed it (CSV and TSV cells are all strings).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Cell>),
}

/// One row: its cells by column name, and `where_` ("file:line" or "file: row N").
#[derive(Debug, Clone)]
pub struct Row {
    pub cells: BTreeMap<String, Cell>,
    pub where_: String,
}

/// The rows of a file and its column names in file order.
#[derive(Debug, Clone)]
pub struct Table {
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// A file's format, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        Ok(match ext.as_str() {
            "csv" => Format::Csv,
            "tsv" | "txt" => Format::Tsv,
            "jsonl" | "json" => Format::Jsonl,
            "parquet" => Format::Parquet,
            _ => bail!(
                "{}: unknown data format (expected .csv, .tsv, .jsonl or .parquet)",
                path.display()
            ),
        })
    }
}

/// Reads a file of any [`Format`]. `names`: column names for a TSV file without a header
/// line (GLUE's CoLA train/dev); `None` reads the first line as the header.
pub fn read(path: &Path, names: Option<&[&str]>) -> Result<Table> {
    match Format::of(path)? {
        Format::Csv => read_csv(path),
        Format::Tsv => read_tsv(path, names),
        Format::Jsonl => read_jsonl(path),
        Format::Parquet => super::formats::guard_parquet(path, || read_parquet(path)),
    }
}

fn read_csv(path: &Path) -> Result<Table> {
    let text = super::formats::read_text(path)?;
    let (mut rdr, columns) = super::formats::csv_reader(path, &text)?;
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let (rec, where_) = super::formats::csv_record(path, rec)?;
        rows.push(text_row(&columns, rec.iter(), where_, "comma")?);
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

/// Tab-separated, quoting off (GLUE's files: a `"` is an ordinary character).
fn read_tsv(path: &Path, names: Option<&[&str]>) -> Result<Table> {
    let text = super::formats::read_text(path)?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let strip_cr = |l: &str| l.strip_suffix('\r').unwrap_or(l).to_string();
    let (columns, first) = match names {
        Some(n) => (n.iter().map(|s| s.to_string()).collect::<Vec<_>>(), 0),
        None => {
            let Some(head) = lines.first().map(|l| strip_cr(l)) else {
                bail!("{}: empty file (no header line)", path.display());
            };
            if head.trim().is_empty() {
                bail!("{}: empty file (no header line)", path.display());
            }
            (head.split('\t').map(|s| s.trim().to_string()).collect(), 1)
        }
    };
    let mut rows = Vec::new();
    for (i, raw) in lines.iter().enumerate().skip(first) {
        let line = strip_cr(raw);
        let where_ = format!("{}:{}", path.display(), i + 1);
        rows.push(text_row(&columns, line.split('\t'), where_, "tab")?);
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

/// A row of string cells, one per column (`sep` names the separator in the error).
fn text_row<'a>(
    columns: &[String],
    fields: impl Iterator<Item = &'a str>,
    where_: String,
    sep: &str,
) -> Result<Row> {
    let fields: Vec<&str> = fields.collect();
    if fields.len() != columns.len() {
        bail!(
            "{where_}: expected {} {sep}-separated fields (as in the header), found {}",
            columns.len(),
            fields.len()
        );
    }
    let cells = columns
        .iter()
        .zip(fields)
        .map(|(c, v)| (c.clone(), Cell::Str(v.to_string())))
        .collect();
    Ok(Row { cells, where_ })
}

fn json_cell(v: &serde_json::Value) -> Cell {
    use serde_json::Value as V;
    match v {
        V::Null => Cell::Null,
        V::Bool(b) => Cell::Bool(*b),
        V::Number(n) => match n.as_i64() {
            Some(i) => Cell::Int(i),
            None => Cell::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        V::String(s) => Cell::Str(s.clone()),
        V::Array(a) => Cell::List(a.iter().map(json_cell).collect()),
        V::Object(_) => Cell::Str(v.to_string()),
    }
}

fn read_jsonl(path: &Path) -> Result<Table> {
    let text = super::formats::read_text(path)?;
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let where_ = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{where_}: not valid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("{where_}: expected a JSON object per line"))?;
        for k in obj.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        let cells = obj.iter().map(|(k, v)| (k.clone(), json_cell(v))).collect();
        rows.push(Row { cells, where_ });
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

fn parquet_cell(f: &Field) -> Cell {
    match f {
        Field::Null => Cell::Null,
        Field::Bool(b) => Cell::Bool(*b),
        Field::Byte(v) => Cell::Int(*v as i64),
        Field::Short(v) => Cell::Int(*v as i64),
        Field::Int(v) => Cell::Int(*v as i64),
        Field::Long(v) => Cell::Int(*v),
        Field::UByte(v) => Cell::Int(*v as i64),
        Field::UShort(v) => Cell::Int(*v as i64),
        Field::UInt(v) => Cell::Int(*v as i64),
        Field::ULong(v) => i64::try_from(*v).map_or(Cell::Float(*v as f64), Cell::Int),
        Field::Float(v) => Cell::Float(*v as f64),
        Field::Double(v) => Cell::Float(*v),
        Field::Str(s) => Cell::Str(s.clone()),
        Field::ListInternal(l) => Cell::List(l.elements().iter().map(parquet_cell).collect()),
        other => Cell::Str(other.to_string()),
    }
}

fn read_parquet(path: &Path) -> Result<Table> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let columns = super::formats::parquet_columns(&reader);
    let iter = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: cannot read rows", path.display()))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let where_ = format!("{}: row {}", path.display(), i + 1);
        let row = row.with_context(|| format!("{where_}: cannot decode"))?;
        let cells = row
            .get_column_iter()
            .map(|(n, f)| (n.clone(), parquet_cell(f)))
            .collect();
        rows.push(Row { cells, where_ });
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}
