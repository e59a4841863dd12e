//! The demo's other problem types, written beside the paraphrase set by `demo-assets` (in
//! `tasks/`), in the words of the demo's vocabulary so its tokenizer and tiny model serve
//! them too. Each is a `task: custom` data set in a different format, column naming and
//! label type:
//! - `topic/` (CSV, multi-class, string labels): which measure a headline reports
//!   (`shares`, `profit`, `sales`), columns `id,headline,topic`;
//! - `tags/` (JSONL, multi-label, lists of names): the measures a one- or two-clause
//!   headline mentions, columns `text`, `tags`;
//! - `move/` (JSONL, regression, a float): the signed size of the move, +2/-2 for a strong
//!   verb, +1/-1 otherwise, columns `text`, `score`;
//! - `long/` (JSONL, binary, long documents): five clauses about shares and sales, one of
//!   which, placed fourth or fifth (past the first [`LONG_PAST_TOKENS`] tokens), is about
//!   profit in a `profit` document and about shares or sales in a `none` one; columns `text`,
//!   `label`. Only a model that reads past the start can tell them apart;
//! - `preference/` (JSONL, TRL's preference format with an explicit prompt): a prompt asking
//!   for a gain, the `chosen` headline reporting a rise and the `rejected` one a fall;
//!   columns `prompt`, `chosen`, `rejected`.
//!
//! Everything comes from a fixed seed and is byte-identical on every run.
use crate::runio::write_text;
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::Path;

const SEED: u64 = 20_051_200;
pub const N_TRAIN: usize = 240;
pub const N_DEV: usize = 80;

const COMPANIES: [&str; 8] = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Contoso",
    "Fabrikam",
    "Northwind",
];
/// Subject phrasings per measure (`{}`: the company), and the measure's label name.
const MEASURES: [(&str, [&str; 2]); 3] = [
    ("shares", ["Shares of {}", "{}'s stock"]),
    ("profit", ["Profit at {}", "Earnings at {}"]),
    ("sales", ["Sales at {}", "Revenue at {}"]),
];
/// (verb, signed size).
const MOVES: [(&str, f64); 8] = [
    ("surged", 2.0),
    ("soared", 2.0),
    ("rose", 1.0),
    ("climbed", 1.0),
    ("sank", -2.0),
    ("slumped", -2.0),
    ("fell", -1.0),
    ("slid", -1.0),
];
const TIMES: [&str; 4] = ["on Monday", "on Friday", "last week", "in early trading"];

/// One clause: (text, measure index, signed size).
fn clause(rng: &mut ChaCha8Rng) -> (String, usize, f64) {
    let m = rng.gen_range(0..MEASURES.len());
    let (text, size) = clause_about(rng, m);
    (text, m, size)
}

/// One clause about measure `m`: (text, signed size).
fn clause_about(rng: &mut ChaCha8Rng, m: usize) -> (String, f64) {
    let subject = MEASURES[m].1[rng.gen_range(0..2)]
        .replace("{}", COMPANIES[rng.gen_range(0..COMPANIES.len())]);
    let (verb, size) = MOVES[rng.gen_range(0..MOVES.len())];
    let pct = rng.gen_range(1..10);
    let time = TIMES[rng.gen_range(0..TIMES.len())];
    (format!("{subject} {verb} {pct} percent {time}"), size)
}

/// The demo tokenizer reads the first three clauses of a `long/` document (after the default
/// template's ` Sentence: ` and BOS) in more tokens than this: a `max_length` up to it never
/// sees the deciding clause.
pub const LONG_PAST_TOKENS: usize = 32;
const PROFIT: usize = 1;

/// One `preference/` pair: a clause whose verb rises (chosen) and one whose verb falls.
fn preference_pair(rng: &mut ChaCha8Rng) -> (String, String) {
    loop {
        let (a, _, sa) = clause(rng);
        let (b, _, sb) = clause(rng);
        if sa > 0.0 && sb < 0.0 {
            return (format!("{a}."), format!("{b}."));
        }
        if sa < 0.0 && sb > 0.0 {
            return (format!("{b}."), format!("{a}."));
        }
    }
}

/// One `long/` document: (text, label).
fn long_document(rng: &mut ChaCha8Rng) -> (String, &'static str) {
    let filler = |rng: &mut ChaCha8Rng| {
        let m = [0, 2][rng.gen_range(0..2)];
        clause_about(rng, m).0
    };
    let mut clauses: Vec<String> = (0..4).map(|_| filler(rng)).collect();
    let profit = rng.gen_bool(0.5);
    let deciding = if profit {
        clause_about(rng, PROFIT).0
    } else {
        filler(rng)
    };
    clauses.insert(rng.gen_range(3..=4), deciding);
    let text = clauses.join(". ") + ".";
    (text, if profit { "profit" } else { "none" })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `out/tasks/{topic,tags,move,long,preference}/{train,validation}.*`.
pub fn write_demo_tasks(out: &Path) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    // Its own stream: the other tasks' bytes do not change with it.
    let mut long_rng = ChaCha8Rng::seed_from_u64(SEED + 1);
    let mut pref_rng = ChaCha8Rng::seed_from_u64(SEED + 2);
    for (split, n) in [("train", N_TRAIN), ("validation", N_DEV)] {
        let mut topic = String::from("id,headline,topic\n");
        let mut tags = String::new();
        let mut moves = String::new();
        let mut long = String::new();
        let mut preference = String::new();
        for i in 0..n {
            let (text, label) = long_document(&mut long_rng);
            long.push_str(&format!("{}\n", json!({"text": text, "label": label})));
            let (chosen, rejected) = preference_pair(&mut pref_rng);
            let row = json!({
                "prompt": "Which headline reports a gain? ",
                "chosen": chosen,
                "rejected": rejected,
            });
            preference.push_str(&format!("{row}\n"));

            let (text, m, _) = clause(&mut rng);
            topic.push_str(&format!(
                "{},{},{}\n",
                1000 + i,
                csv_field(&format!("{text}.")),
                MEASURES[m].0
            ));

            let (a, ma, _) = clause(&mut rng);
            let mut names = vec![MEASURES[ma].0];
            let text = if rng.gen_bool(0.5) {
                let (b, mb, _) = clause(&mut rng);
                if !names.contains(&MEASURES[mb].0) {
                    names.push(MEASURES[mb].0);
                }
                format!("{a}, and {b}.")
            } else {
                format!("{a}.")
            };
            tags.push_str(&format!("{}\n", json!({"text": text, "tags": names})));

            let (text, _, size) = clause(&mut rng);
            moves.push_str(&format!(
                "{}\n",
                json!({"text": format!("{text}."), "score": size})
            ));
        }
        let dir = out.join("tasks");
        write_text(&dir.join("topic").join(format!("{split}.csv")), &topic)?;
        write_text(&dir.join("tags").join(format!("{split}.jsonl")), &tags)?;
        write_text(&dir.join("move").join(format!("{split}.jsonl")), &moves)?;
        write_text(&dir.join("long").join(format!("{split}.jsonl")), &long)?;
        write_text(
            &dir.join("preference").join(format!("{split}.jsonl")),
            &preference,
        )?;
    }
    Ok(())
}
