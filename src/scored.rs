//! The files `eval` and `predict` write from a scored split: `predict`'s CSV, the
//! misclassified rows (`--errors`), and `eval`'s error analysis (scikit-learn's
//! classification report, the confusion matrix as CSV and picture).
use crate::eval::EvalResult;
use crate::labels::{LabelSpec, ProblemType};
use crate::plot;
use crate::runio;
use crate::threshold::Decision;
use anyhow::Result;
use std::path::Path;

/// A CSV field, quoted where it holds a comma, a quote or a line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `predict`'s CSV: `index,prediction,prob_0…prob_{K-1}` (the label name predicted; for
/// multi-label the names over their threshold (0.5 by default), `|`-joined, and one
/// probability per label), or
/// `index,prediction` for regression.
pub fn predictions_csv(spec: &LabelSpec, decision: &Decision, r: &EvalResult) -> String {
    if r.pairs {
        // A reward model on preference pairs: each side's reward.
        let mut text = String::from("index,reward_chosen,reward_rejected\n");
        for (idx, p) in r.idx.iter().zip(&r.probs) {
            text.push_str(&format!("{idx},{:.6},{:.6}\n", p[0], p[1]));
        }
        return text;
    }
    if r.rewards {
        let mut text = String::from("index,reward\n");
        for (idx, p) in r.idx.iter().zip(&r.probs) {
            text.push_str(&format!("{idx},{:.6}\n", p[0]));
        }
        return text;
    }
    let flags = decision.flags(&r.probs);
    let regression = spec.problem_type == ProblemType::Regression;
    let mut text = String::from("index,prediction");
    if !regression {
        for c in 0..spec.num_labels() {
            text.push_str(&format!(",prob_{c}"));
        }
    }
    text.push('\n');
    for (((idx, pred), probs), on) in r.idx.iter().zip(&r.pred).zip(&r.probs).zip(&flags) {
        let shown = match spec.problem_type {
            ProblemType::SingleLabel => spec
                .names
                .get(*pred as usize)
                .cloned()
                .unwrap_or_else(|| pred.to_string()),
            ProblemType::MultiLabel => spec
                .names
                .iter()
                .zip(on)
                .filter(|(_, &f)| f)
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join("|"),
            ProblemType::Regression => format!("{:.6}", probs[0]),
        };
        text.push_str(&format!("{idx},{}", csv_field(&shown)));
        if !regression {
            for p in probs {
                text.push_str(&format!(",{p:.6}"));
            }
        }
        text.push('\n');
    }
    text
}

/// `predict --windows`: `index,window,logit_0…logit_{K-1}`, a row per window of a chunked
/// split (the logits `chunk_aggregate` combined).
pub fn windows_csv(r: &EvalResult) -> Result<String> {
    let Some(w) = &r.windows else {
        anyhow::bail!("--windows: no text of this split was cut into windows (long_text: chunk, and texts over max_length)");
    };
    let k = w.logits.first().map_or(0, Vec::len);
    let mut text = String::from("index,window");
    for c in 0..k {
        text.push_str(&format!(",logit_{c}"));
    }
    text.push('\n');
    for ((idx, win), row) in w.idx.iter().zip(&w.window).zip(&w.logits) {
        text.push_str(&format!("{idx},{win}"));
        for v in row {
            text.push_str(&format!(",{v:.9}"));
        }
        text.push('\n');
    }
    Ok(text)
}

/// `eval` on a labelled single-label split: scikit-learn's `classification_report` (printed,
/// and in eval-SPLIT.json), the confusion matrix as `confusion-SPLIT.csv` (row = gold, column
/// = predicted, scikit-learn's layout) and as a picture beside it.
pub fn error_analysis(
    dir: &Path,
    split: &str,
    spec: &LabelSpec,
    r: &EvalResult,
    json: &mut serde_json::Value,
) -> Result<()> {
    let names = &spec.names;
    let k = spec.num_labels();
    let report = crate::metrics::classification_report(&r.pred, &r.gold, k);
    print!("{}", report.text(names));
    json["classification_report"] = report.to_json(names);
    let counts = crate::metrics::confusion(&r.pred, &r.gold, k);
    json["confusion"] = serde_json::json!(counts);
    let mut csv = String::from("gold\\predicted");
    for n in names {
        csv.push(',');
        csv.push_str(&csv_field(n));
    }
    csv.push('\n');
    for (n, row) in names.iter().zip(&counts) {
        csv.push_str(&csv_field(n));
        for c in row {
            csv.push_str(&format!(",{c}"));
        }
        csv.push('\n');
    }
    let stem = format!("confusion-{split}");
    let path = dir.join(format!("{stem}.csv"));
    runio::write_text(&path, &csv)?;
    println!("wrote {}", path.display());
    // A picture that cannot be drawn (no font) is a warning, not a lost evaluation.
    let title = format!("Confusion on {split} ({} rows)", r.gold.len());
    if let Err(e) = plot::confusion_matrix(dir, &stem, &title, names, &counts) {
        eprintln!("warning: confusion matrix not drawn: {e:#}");
    }
    Ok(())
}

/// `predict --errors FILE`: the rows whose predicted label(s) differ from the gold ones, with
/// the text the model read (decoded), the gold and predicted names and the predicted label's
/// probability (multi-label: every label's, `|`-joined).
pub fn errors_csv(
    spec: &LabelSpec,
    decision: &Decision,
    r: &EvalResult,
    texts: &[String],
    split: &str,
) -> Result<(String, usize)> {
    let names = |flags: &[bool]| -> String {
        spec.names
            .iter()
            .zip(flags)
            .filter(|(_, &f)| f)
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join("|")
    };
    let mut csv = String::from("index,text,label,prediction,probability\n");
    let mut n = 0;
    match spec.problem_type {
        ProblemType::SingleLabel => {
            anyhow::ensure!(
                !r.gold.is_empty(),
                "--errors: split `{split}` has no labels"
            );
            for (i, (&p, &g)) in r.pred.iter().zip(&r.gold).enumerate() {
                if p != g {
                    n += 1;
                    let (pn, gn) = (&spec.names[p as usize], &spec.names[g as usize]);
                    csv.push_str(&format!(
                        "{},{},{},{},{:.6}\n",
                        r.idx[i],
                        csv_field(&texts[i]),
                        csv_field(gn),
                        csv_field(pn),
                        r.probs[i][p as usize]
                    ));
                }
            }
        }
        ProblemType::MultiLabel => {
            anyhow::ensure!(
                !r.gold_flags.is_empty(),
                "--errors: split `{split}` has no labels"
            );
            let flags = decision.flags(&r.probs);
            for (i, (p, g)) in flags.iter().zip(&r.gold_flags).enumerate() {
                if p != g {
                    n += 1;
                    let probs: Vec<String> = r.probs[i].iter().map(|x| format!("{x:.6}")).collect();
                    csv.push_str(&format!(
                        "{},{},{},{},{}\n",
                        r.idx[i],
                        csv_field(&texts[i]),
                        csv_field(&names(g)),
                        csv_field(&names(p)),
                        probs.join("|")
                    ));
                }
            }
        }
        ProblemType::Regression => {
            anyhow::bail!("--errors: a regression task has no misclassified rows")
        }
    }
    Ok((csv, n))
}
