//! `qlora-cls plot`: what the reference showed, from the run folders of a sweep: the training
//! loss, accuracy per epoch with one line per prompt and the untrained baseline, as PNG and
//! SVG, and a Markdown table of the final accuracy/F1 per prompt; the bench's scaling charts;
//! an evaluation's reliability diagram and confusion matrix.
//!
//! Why one file: every chart goes through the one [`Chart`] writer (SVG, then PNG by a
//! temporary name) and the one font registration, and the line charts share `LineChart`;
//! split, those would become crate-wide API for three small callers.
use crate::runio;
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One run folder, as the plots need it.
#[derive(Debug, Clone)]
pub struct RunData {
    pub name: String,
    pub prompt: String,
    /// (step, loss)
    pub loss: Vec<(f64, f64)>,
    /// (epoch, accuracy, f1)
    pub evals: Vec<(f64, f64, f64)>,
}

fn read_csv(path: &Path) -> Result<Vec<Vec<String>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect())
}

fn num(path: &Path, line: usize, v: Option<&String>) -> Result<f64> {
    v.and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("{}:{}: not a number", path.display(), line + 2))
}

/// Reads every run folder below `runs` that has an eval.csv.
pub fn read_runs(runs: &Path) -> Result<Vec<RunData>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .with_context(|| format!("cannot read the runs folder {}", runs.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("eval.csv").is_file())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let cfg: serde_json::Value = std::fs::read(d.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let prompt = cfg["prompt"].as_str().unwrap_or("?").to_string();
        let ev_path = d.join("eval.csv");
        let mut evals = Vec::new();
        // eval.csv: epoch, split, loss, then the task's metrics (the main one first); runs
        // made before that order had epoch, split, accuracy, f1, loss.
        let header = std::fs::read_to_string(&ev_path)
            .with_context(|| format!("cannot read {}", ev_path.display()))?;
        let header: Vec<&str> = header.lines().next().unwrap_or("").split(',').collect();
        let (a, b) = if header.get(2) == Some(&"loss") {
            let f1 = header.iter().position(|h| *h == "f1").unwrap_or(3);
            (3, f1)
        } else {
            (2, 3)
        };
        for (i, r) in read_csv(&ev_path)?.iter().enumerate() {
            if r.get(a).is_none_or(|s| s.is_empty()) {
                continue; // unlabelled split
            }
            evals.push((
                num(&ev_path, i, r.first())?,
                num(&ev_path, i, r.get(a))?,
                num(&ev_path, i, r.get(b).filter(|s| !s.is_empty()).or(r.get(a)))?,
            ));
        }
        let m_path = d.join("metrics.csv");
        let mut loss = Vec::new();
        if m_path.is_file() {
            for (i, r) in read_csv(&m_path)?.iter().enumerate() {
                loss.push((num(&m_path, i, r.first())?, num(&m_path, i, r.get(2))?));
            }
        }
        out.push(RunData {
            name: d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            prompt,
            loss,
            evals,
        });
    }
    if out.is_empty() {
        bail!("no run folders with eval.csv below {}", runs.display());
    }
    Ok(out)
}

/// Moving average, so a per-step loss curve is readable.
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for i in 0..points.len() {
        sum += points[i].1;
        if i >= w {
            sum -= points[i - w].1;
        }
        out.push((points[i].0, sum / (i + 1).min(w) as f64));
    }
    out
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

fn draw_loss<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunData]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let trained: Vec<&RunData> = runs.iter().filter(|r| !r.loss.is_empty()).collect();
    let (x0, x1) = bounds(trained.iter().flat_map(|r| r.loss.iter().map(|p| p.0)));
    let (_, y1) = bounds(trained.iter().flat_map(|r| r.loss.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption("Training loss (moving average)", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1 * 1.05)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy loss")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Colours are picked by the run's place in `runs`, as in the accuracy chart, so one run
    // has one colour in both.
    for (i, r) in runs.iter().enumerate().filter(|(_, r)| !r.loss.is_empty()) {
        let color = Palette99::pick(i).to_rgba();
        let window = (r.loss.len() / 50).max(1);
        chart
            .draw_series(LineSeries::new(
                smooth(&r.loss, window),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(format!("{} ({})", r.name, r.prompt))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    area.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn draw_accuracy<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunData]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let max_epoch = runs
        .iter()
        .flat_map(|r| r.evals.iter().map(|e| e.0))
        .fold(1.0f64, f64::max);
    let (lo, _) = bounds(runs.iter().flat_map(|r| r.evals.iter().map(|e| e.1)));
    let mut chart = ChartBuilder::on(area)
        .caption("Validation accuracy per epoch", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_epoch, (lo - 0.05).max(0.0)..1.0)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch (0 = before fine-tuning)")
        .y_desc("accuracy")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, r) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = r.evals.iter().map(|e| (e.0, e.1)).collect();
        let untrained = r.loss.is_empty();
        let label = if untrained {
            format!("{} (untrained baseline, {})", r.name, r.prompt)
        } else {
            format!("{} ({})", r.name, r.prompt)
        };
        let series: Vec<(f64, f64)> = if untrained && pts.len() == 1 {
            // A baseline is one number: draw it across the whole axis.
            vec![(0.0, pts[0].1), (max_epoch, pts[0].1)]
        } else {
            pts.clone()
        };
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    area.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// The Markdown table of final results per run.
pub fn results_table(runs: &[RunData]) -> String {
    let mut s = String::from(
        "| run | prompt | accuracy before | final accuracy | final F1 | best accuracy |\n|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let before = r.evals.iter().find(|e| e.0 == 0.0).map(|e| e.1);
        let last = r.evals.last();
        let best = r.evals.iter().map(|e| e.1).fold(f64::NAN, f64::max);
        let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{:.2}%", 100.0 * x));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.name,
            if r.prompt.is_empty() {
                "(none)"
            } else {
                &r.prompt
            },
            f(before),
            f(last.map(|e| e.1)),
            f(last.map(|e| e.2)),
            f(Some(best).filter(|b| b.is_finite())),
        ));
    }
    s
}

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    let path = std::env::var("QLORA_FONT")
        .ok()
        .map(PathBuf::from)
        .or_else(|| FONT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file()))
        .context("no TrueType font found for the PNG text (install fonts-dejavu-core or set QLORA_FONT=/path/font.ttf)")?;
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read font {}", path.display()))?;
    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", path.display()))?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Curves {
    Loss,
    Accuracy,
}

/// The loss or accuracy curves of a sweep's runs.
struct RunsChart<'a> {
    which: Curves,
    runs: &'a [RunData],
}

impl Chart for RunsChart<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        match self.which {
            Curves::Loss => draw_loss(area, self.runs),
            Curves::Accuracy => draw_accuracy(area, self.runs),
        }
    }
}

/// Draws loss and accuracy (PNG + SVG) and writes results.md into `out`.
pub fn plot(runs_dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let runs = read_runs(runs_dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    register_font()?;
    let mut written = Vec::new();
    for (name, which) in [("loss", Curves::Loss), ("accuracy", Curves::Accuracy)] {
        written.extend(write_chart(&RunsChart { which, runs: &runs }, out, name)?);
    }
    let p = out.join("results.md");
    runio::write_text(&p, &results_table(&runs))?;
    written.push(p);
    Ok(written)
}

/// One measurement of `bench/results/scaling.csv` (written by `make bench`, row 7): one
/// implementation at one (sequence length, batch size).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPoint {
    pub implementation: String,
    pub seq: u64,
    pub batch: u64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: f64,
}

/// Reads a scaling CSV: a header naming at least `impl`, `seq`, `batch`, `tokens_per_s` and
/// `peak_rss_bytes` (in any order; other columns are ignored), then one row per measurement.
/// A malformed row is an error naming the file and its line.
pub fn read_scaling(path: &Path) -> Result<Vec<ScalingPoint>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = match lines.next() {
        Some((_, h)) => h.split(',').map(str::trim).collect(),
        None => bail!("{}: empty file (expected a CSV header)", path.display()),
    };
    let col = |name: &str| -> Result<usize> {
        header.iter().position(|h| *h == name).with_context(|| {
            format!(
                "{}:1: no column `{name}` in the header (need impl, seq, batch, tokens_per_s, \
                 peak_rss_bytes)",
                path.display()
            )
        })
    };
    let (ci, cs, cb, ct, cm) = (
        col("impl")?,
        col("seq")?,
        col("batch")?,
        col("tokens_per_s")?,
        col("peak_rss_bytes")?,
    );
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let cell = |c: usize, name: &str| -> Result<&str> {
            cells
                .get(c)
                .copied()
                .filter(|s| !s.is_empty())
                .with_context(|| format!("{}:{n}: no value for `{name}`", path.display()))
        };
        let int = |c: usize, name: &str| -> Result<u64> {
            let v = cell(c, name)?;
            v.parse::<u64>().ok().filter(|&x| x > 0).with_context(|| {
                format!(
                    "{}:{n}: `{name}` {v:?} is not a positive integer",
                    path.display()
                )
            })
        };
        let float = |c: usize, name: &str| -> Result<f64> {
            let v = cell(c, name)?;
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| {
                    format!(
                        "{}:{n}: `{name}` {v:?} is not a non-negative number",
                        path.display()
                    )
                })
        };
        out.push(ScalingPoint {
            implementation: cell(ci, "impl")?.to_string(),
            seq: int(cs, "seq")?,
            batch: int(cb, "batch")?,
            tokens_per_s: float(ct, "tokens_per_s")?,
            peak_rss_bytes: float(cm, "peak_rss_bytes")?,
        });
    }
    if out.is_empty() {
        bail!("{}: no measurements below the header", path.display());
    }
    Ok(out)
}

/// One line of a chart: its legend, its colour index (Palette99) and its (x, y) points.
type Series = (String, usize, Vec<(f64, f64)>);

/// A line chart: one polyline (with markers) per named series.
struct LineChart {
    title: String,
    x_desc: String,
    y_desc: String,
    /// A log₂ x axis (sequence lengths, batch sizes).
    log_x: bool,
    /// Where the legend goes: a corner the lines leave free.
    legend: SeriesLabelPosition,
    series: Vec<Series>,
}

impl Chart for LineChart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e| anyhow::anyhow!("{e:?}");
        area.fill(&WHITE).map_err(e)?;
        let (mut x0, mut x1) = bounds(self.series.iter().flat_map(|s| s.2.iter().map(|p| p.0)));
        if self.log_x && x0 == x1 {
            (x0, x1) = (x0 / 2.0, x1 * 2.0);
        } else if self.log_x {
            (x0, x1) = (x0 / 1.15, x1 * 1.15);
        }
        let (_, y1) = bounds(self.series.iter().flat_map(|s| s.2.iter().map(|p| p.1)));
        let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&self.title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70);
        if self.log_x {
            let mut chart = builder
                .build_cartesian_2d((x0..x1).log_scale().base(2.0), 0.0..y1)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc.as_str())
                .y_desc(self.y_desc.as_str())
                .x_label_formatter(&|v| format!("{v:.0}"))
                .draw()
                .map_err(e)?;
            self.draw_series(&mut chart)
        } else {
            let mut chart = builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(e)?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc.as_str())
                .y_desc(self.y_desc.as_str())
                .draw()
                .map_err(e)?;
            self.draw_series(&mut chart)
        }?;
        area.present().map_err(e)?;
        Ok(())
    }
}

impl LineChart {
    fn draw_series<'a, DB, X>(
        &self,
        chart: &mut ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    ) -> Result<()>
    where
        DB: DrawingBackend + 'a,
        DB::ErrorType: 'static,
        X: Ranged<ValueType = f64>,
    {
        let e = |e| anyhow::anyhow!("{e:?}");
        for (label, colour, pts) in &self.series {
            let color = Palette99::pick(*colour).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .position(self.legend.clone())
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

/// The value of `want` if any point has it, else the value most points share (ties: the
/// smallest).
fn pick_fixed(values: impl Iterator<Item = u64>, want: u64) -> Option<u64> {
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    if counts.contains_key(&want) {
        return Some(want);
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|&(_, c)| c == best).map(|(v, _)| v)
}

/// One series per implementation, from the points `keep` selects, as (x, y) sorted by x.
fn series_by_impl(
    points: &[ScalingPoint],
    keep: impl Fn(&ScalingPoint) -> Option<(f64, f64)>,
) -> Vec<Series> {
    let mut names: Vec<&str> = points.iter().map(|p| p.implementation.as_str()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    // Colours by the implementation's place among all of them, so a side keeps its colour
    // in every chart.
    for (colour, name) in names.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.implementation == *name)
            .filter_map(&keep)
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !pts.is_empty() {
            out.push((name.to_string(), colour, pts));
        }
    }
    out
}

/// `qlora-cls plot --scaling FILE`: from the bench's scaling.csv, tokens/s and peak memory
/// against the sequence length (at batch 8, or the batch size most rows share) with one line
/// per implementation, and tokens/s against the batch size (at sequence length 128, or the
/// most common one) when the file holds more than one batch size there. PNG + SVG each.
pub fn plot_scaling(csv: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let points = read_scaling(csv)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    register_font()?;
    let mut written = Vec::new();
    // pick_fixed sees at least one point, so both are Some.
    let batch = pick_fixed(points.iter().map(|p| p.batch), 8).unwrap_or(8);
    let seq = pick_fixed(points.iter().map(|p| p.seq), 128).unwrap_or(128);
    let by_seq = |f: fn(&ScalingPoint) -> f64| {
        series_by_impl(&points, move |p| {
            (p.batch == batch).then(|| (p.seq as f64, f(p)))
        })
    };
    let charts = [
        (
            "scaling_tokens_per_s",
            LineChart {
                title: format!("Training throughput vs sequence length (batch {batch})"),
                x_desc: "sequence length (tokens)".into(),
                y_desc: "tokens/s".into(),
                log_x: true,
                legend: SeriesLabelPosition::LowerLeft,
                series: by_seq(|p| p.tokens_per_s),
            },
        ),
        (
            "scaling_memory",
            LineChart {
                title: format!("Peak resident memory vs sequence length (batch {batch})"),
                x_desc: "sequence length (tokens)".into(),
                y_desc: "peak RSS (GiB)".into(),
                log_x: true,
                legend: SeriesLabelPosition::UpperLeft,
                series: by_seq(|p| p.peak_rss_bytes / (1u64 << 30) as f64),
            },
        ),
    ];
    for (name, chart) in &charts {
        written.extend(write_chart(chart, out, name)?);
    }
    let batches: std::collections::BTreeSet<u64> = points
        .iter()
        .filter(|p| p.seq == seq)
        .map(|p| p.batch)
        .collect();
    if batches.len() > 1 {
        let chart = LineChart {
            title: format!("Training throughput vs batch size (sequence length {seq})"),
            x_desc: "batch size".into(),
            y_desc: "tokens/s".into(),
            log_x: true,
            legend: SeriesLabelPosition::UpperLeft,
            series: series_by_impl(&points, |p| {
                (p.seq == seq).then_some((p.batch as f64, p.tokens_per_s))
            }),
        };
        written.extend(write_chart(&chart, out, "scaling_batch")?);
    }
    Ok(written)
}

/// The reliability diagram of one evaluation, `<out>/<name>.{svg,png}`: per non-empty bin of
/// top-label probability, the fraction predicted right against the mean probability, one
/// line per `curves` entry (before and after temperature scaling), beside the diagonal of
/// perfect calibration.
pub fn reliability_diagram(
    out: &Path,
    name: &str,
    title: &str,
    curves: &[(String, Vec<crate::calibration::Bin>)],
) -> Result<Vec<PathBuf>> {
    register_font()?;
    let mut series: Vec<Series> = vec![(
        "perfect calibration".into(),
        0,
        vec![(0.0, 0.0), (1.0, 1.0)],
    )];
    for (i, (label, bins)) in curves.iter().enumerate() {
        let pts = bins
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| (b.confidence, b.accuracy))
            .collect();
        series.push((label.clone(), i + 1, pts));
    }
    let chart = LineChart {
        title: title.into(),
        x_desc: "mean top-label probability in the bin (15 bins)".into(),
        y_desc: "fraction predicted right".into(),
        log_x: false,
        legend: SeriesLabelPosition::UpperLeft,
        series,
    };
    write_chart(&chart, out, name)
}

/// A chart written as SVG and PNG by [`write_chart`].
trait Chart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;

    fn size(&self) -> (u32, u32) {
        (1000, 600)
    }
}

/// Writes `<out>/<name>.svg` and `<out>/<name>.png`; returns both paths.
fn write_chart(chart: &impl Chart, out: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, chart.size()).into_drawing_area();
        chart.draw(&area)?;
    }
    let svg_path = out.join(format!("{name}.svg"));
    runio::write_text(&svg_path, &svg)?;
    // The bitmap backend writes the file itself: give it a temporary name, then rename.
    let png_path = out.join(format!("{name}.png"));
    let tmp = out.join(format!(".{name}.tmp-{}.png", std::process::id()));
    {
        let area = BitMapBackend::new(&tmp, chart.size()).into_drawing_area();
        chart.draw(&area)?;
    }
    std::fs::rename(&tmp, &png_path)
        .with_context(|| format!("cannot write {}", png_path.display()))?;
    Ok(vec![svg_path, png_path])
}

/// One evaluation's confusion matrix: gold class down, the predicted one across.
struct ConfusionChart<'a> {
    title: &'a str,
    names: &'a [String],
    counts: &'a [Vec<u64>],
}

impl Chart for ConfusionChart<'_> {
    fn size(&self) -> (u32, u32) {
        (800, 700)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e| anyhow::anyhow!("{e:?}");
        area.fill(&WHITE).map_err(e)?;
        let k = self.names.len() as i32;
        // `(0..n).into_segmented()` has a segment per value 0..=n: k cells are 0..k-1.
        let name = |v: &SegmentValue<i32>, flip: bool| match v {
            SegmentValue::CenterOf(i) => {
                let i = if flip { k - 1 - i } else { *i };
                self.names.get(i as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(140)
            .build_cartesian_2d((0..k - 1).into_segmented(), (0..k - 1).into_segmented())
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("predicted")
            .y_desc("gold")
            .x_label_formatter(&|v| name(v, false))
            .y_label_formatter(&|v| name(v, true))
            .draw()
            .map_err(e)?;
        for (g, row) in self.counts.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            // Row 0 at the top.
            let y = k - 1 - g as i32;
            for (p, &n) in row.iter().enumerate() {
                let share = n as f64 / total;
                let fill = RGBColor(
                    (255.0 - 205.0 * share) as u8,
                    (255.0 - 150.0 * share) as u8,
                    255,
                );
                let x = p as i32;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                        ],
                        fill.filled(),
                    )))
                    .map_err(e)?;
                let ink = if share > 0.6 { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        n.to_string(),
                        (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                        ("sans-serif", 22).into_font().color(&ink),
                    )))
                    .map_err(e)?;
            }
        }
        area.present().map_err(e)?;
        Ok(())
    }
}

/// The confusion matrix `<out>/<name>.{svg,png}` (scikit-learn's layout: row = gold).
pub fn confusion_matrix(
    out: &Path,
    name: &str,
    title: &str,
    names: &[String],
    counts: &[Vec<u64>],
) -> Result<Vec<PathBuf>> {
    register_font()?;
    write_chart(
        &ConfusionChart {
            title,
            names,
            counts,
        },
        out,
        name,
    )
}
