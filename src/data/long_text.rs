//! Texts longer than `max_length`: cut on the right or the left (transformers'
//! `truncation_side`), keep the head and the tail, or cut into overlapping windows that each
//! start with the template's prompt part; how many inputs were cut and by how much; and how a
//! document's windows' logits become one prediction.
//!
//! A tokenised text is seen as four parts: the special tokens the tokenizer's post-processor
//! puts before the text (`lead`, Llama-3's `<|begin_of_text|>`) and after it (`trail`), the
//! tokens of the template's prompt part (everything before the first text column, such as
//! `"Does sentence 1 mean … Sentence 1: "`), and the rest (`body`). Cutting always keeps the
//! special tokens, as transformers' truncation does: they are added after the text is cut.
use crate::labels::ProblemType;
use anyhow::{bail, Result};

/// Which end `long_text: truncate` cuts (transformers' `tokenizer.truncation_side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Right,
    Left,
}

/// What happens to a text longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Cut at one end (transformers' `truncation=True`).
    Truncate,
    /// Keep the prompt part, the body's first `head_tokens` and its last tokens.
    HeadTail,
    /// Windows of `max_length`, `stride` tokens of overlap, each led by the prompt part.
    Chunk,
}

/// How `eval`, `predict` and `serve` combine a document's windows into one prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The mean of the windows' logits.
    MeanLogits,
    /// The window the model is surest of (the highest top probability) speaks for the
    /// document; per label, the most probable window for multi-label.
    MaxProb,
}

impl Side {
    pub fn parse(s: &str) -> Result<Side> {
        match s {
            "right" => Ok(Side::Right),
            "left" => Ok(Side::Left),
            _ => bail!("`{s}` is not one of right, left"),
        }
    }
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "truncate" => Ok(Mode::Truncate),
            "head_tail" => Ok(Mode::HeadTail),
            "chunk" => Ok(Mode::Chunk),
            _ => bail!("`{s}` is not one of truncate, head_tail, chunk"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Truncate => "truncate",
            Mode::HeadTail => "head_tail",
            Mode::Chunk => "chunk",
        }
    }
}

impl Aggregate {
    pub fn parse(s: &str) -> Result<Aggregate> {
        match s {
            "mean_logits" => Ok(Aggregate::MeanLogits),
            "max_prob" => Ok(Aggregate::MaxProb),
            _ => bail!("`{s}` is not one of mean_logits, max_prob"),
        }
    }
}

/// The settings: `max_length`, `truncation_side`, `long_text`, `chunk_stride`, `head_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongText {
    /// None: nothing is cut.
    pub max_length: Option<usize>,
    pub side: Side,
    pub mode: Mode,
    /// Tokens two neighbouring windows share.
    pub stride: usize,
    /// `head_tail`: body tokens kept from the start (None: a quarter of the room, the split
    /// Sun et al. 2019 found best for BERT: 128 of 510 from the head).
    pub head_tokens: Option<usize>,
}

impl LongText {
    /// Cut on the right at `max_length` (transformers' default).
    pub fn truncate(max_length: Option<usize>) -> LongText {
        LongText {
            max_length,
            side: Side::Right,
            mode: Mode::Truncate,
            stride: 0,
            head_tokens: None,
        }
    }
}

/// A tokenised text in its four parts (see the module's comment).
#[derive(Debug, Clone, PartialEq)]
pub struct Parts {
    pub lead: Vec<i64>,
    pub prefix: Vec<i64>,
    pub body: Vec<i64>,
    pub trail: Vec<i64>,
}

impl Parts {
    /// Splits `ids`: tokens without a sequence id are the post-processor's; of the text's own
    /// tokens, the leading run that ends within the first `prefix_bytes` bytes of the text is
    /// the prompt part (a token that straddles the boundary belongs to the body).
    pub fn split(
        ids: &[i64],
        sequence_ids: &[Option<usize>],
        offsets: &[(usize, usize)],
        prefix_bytes: usize,
    ) -> Parts {
        let text: Vec<usize> = (0..ids.len())
            .filter(|&i| sequence_ids[i].is_some())
            .collect();
        let (Some(&first), Some(&last)) = (text.first(), text.last()) else {
            return Parts {
                lead: ids.to_vec(),
                prefix: Vec::new(),
                body: Vec::new(),
                trail: Vec::new(),
            };
        };
        let n_prefix = (first..=last)
            .take_while(|&i| offsets[i].1 <= prefix_bytes)
            .count();
        Parts {
            lead: ids[..first].to_vec(),
            prefix: ids[first..first + n_prefix].to_vec(),
            body: ids[first + n_prefix..=last].to_vec(),
            trail: ids[last + 1..].to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.lead.len() + self.prefix.len() + self.body.len() + self.trail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn join(&self, text: &[&[i64]]) -> Vec<i64> {
        let mut out = self.lead.clone();
        for t in text {
            out.extend_from_slice(t);
        }
        out.extend_from_slice(&self.trail);
        out
    }
}

impl LongText {
    /// The rows the model reads for one text: one, or (`chunk`) one per window.
    pub fn fit(&self, p: &Parts) -> Result<Vec<Vec<i64>>> {
        let whole = p.join(&[&p.prefix, &p.body]);
        let Some(max) = self.max_length else {
            return Ok(vec![whole]);
        };
        if whole.len() <= max {
            return Ok(vec![whole]);
        }
        let special = p.lead.len() + p.trail.len();
        let Some(room) = max.checked_sub(special).filter(|&r| r > 0) else {
            bail!(
                "max_length {max} leaves no room for text beside the tokenizer's {special} special token(s)"
            );
        };
        let text: Vec<i64> = [p.prefix.as_slice(), &p.body].concat();
        match self.mode {
            Mode::Truncate => Ok(vec![match self.side {
                Side::Right => p.join(&[&text[..room]]),
                Side::Left => p.join(&[&text[text.len() - room..]]),
            }]),
            Mode::HeadTail => {
                let room = self.body_room(max, p)?;
                let head = self.head_tokens.unwrap_or(room / 4).min(room);
                let tail = room - head;
                Ok(vec![p.join(&[
                    &p.prefix,
                    &p.body[..head],
                    &p.body[p.body.len() - tail..],
                ])])
            }
            Mode::Chunk => {
                let room = self.body_room(max, p)?;
                if self.stride >= room {
                    bail!(
                        "chunk_stride {} must be smaller than the {room} body tokens a window of \
                         max_length {max} holds after the prompt part and special tokens",
                        self.stride
                    );
                }
                let step = room - self.stride;
                let mut windows = Vec::new();
                let mut start = 0;
                loop {
                    let end = (start + room).min(p.body.len());
                    windows.push(p.join(&[&p.prefix, &p.body[start..end]]));
                    if end == p.body.len() {
                        return Ok(windows);
                    }
                    start += step;
                }
            }
        }
    }

    /// The body tokens a row of `max` holds after the special tokens and the prompt part.
    fn body_room(&self, max: usize, p: &Parts) -> Result<usize> {
        let fixed = p.lead.len() + p.trail.len() + p.prefix.len();
        match max.checked_sub(fixed).filter(|&r| r > 0) {
            Some(r) => Ok(r),
            None => bail!(
                "long_text: {} needs max_length above the {fixed} tokens of the prompt part and \
                 special tokens; max_length is {max}",
                self.mode.name()
            ),
        }
    }
}

/// How many of a split's inputs were longer than `max_length`, and what cutting did to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    pub inputs: usize,
    /// Inputs longer than `max_length`.
    pub over: usize,
    pub longest: usize,
    /// Tokens of the over-long inputs beyond `max_length`, summed.
    pub excess: usize,
    /// Rows the model reads (more than `inputs` with `chunk`).
    pub rows: usize,
}

impl Counted {
    pub fn add(&mut self, full_len: usize, max_length: Option<usize>, rows: usize) {
        self.inputs += 1;
        self.rows += rows;
        self.longest = self.longest.max(full_len);
        if let Some(max) = max_length.filter(|&m| full_len > m) {
            self.over += 1;
            self.excess += full_len - max;
        }
    }

    /// One console line, when anything was long: `train: 37 of 240 inputs are over
    /// max_length 64 tokens (longest 180, 45 over on average); chunk reads them as …`.
    pub fn line(&self, what: &str, lt: &LongText) -> Option<String> {
        let max = lt.max_length?;
        if self.over == 0 {
            return None;
        }
        let mean = self.excess as f64 / self.over as f64;
        let done = match lt.mode {
            Mode::Truncate => format!(
                "truncated on the {} (long_text: head_tail or chunk keep more)",
                match lt.side {
                    Side::Right => "right",
                    Side::Left => "left",
                }
            ),
            Mode::HeadTail => "kept as head and tail".to_string(),
            Mode::Chunk => format!(
                "cut into windows: {} rows for {} inputs (chunk_stride {})",
                self.rows, self.inputs, lt.stride
            ),
        };
        Some(format!(
            "{what}: {} of {} inputs are over max_length {max} tokens (longest {}, {mean:.1} over on average); {done}",
            self.over, self.inputs, self.longest
        ))
    }
}

/// One document's logits from its windows' (`rows`, each of the same length).
pub fn aggregate(rows: &[Vec<f64>], problem: ProblemType, how: Aggregate) -> Result<Vec<f64>> {
    let Some(first) = rows.first() else {
        bail!("a document without windows");
    };
    if rows.len() == 1 {
        return Ok(first.clone());
    }
    let k = first.len();
    match (how, problem) {
        (Aggregate::MeanLogits, _) => Ok((0..k)
            .map(|c| rows.iter().map(|r| r[c]).sum::<f64>() / rows.len() as f64)
            .collect()),
        (Aggregate::MaxProb, ProblemType::SingleLabel) => {
            // The top softmax probability of a row: 1 / Σ exp(l - max l).
            let top = |r: &Vec<f64>| {
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                1.0 / r.iter().map(|v| (v - m).exp()).sum::<f64>()
            };
            let mut best = first;
            for r in &rows[1..] {
                if top(r) > top(best) {
                    best = r;
                }
            }
            Ok(best.clone())
        }
        // The sigmoid is increasing: the most probable window per label has the largest logit.
        (Aggregate::MaxProb, ProblemType::MultiLabel) => Ok((0..k)
            .map(|c| rows.iter().map(|r| r[c]).fold(f64::NEG_INFINITY, f64::max))
            .collect()),
        (Aggregate::MaxProb, ProblemType::Regression) => {
            bail!("chunk_aggregate: max_prob has no meaning for regression; use mean_logits")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(prefix: usize, body: usize) -> Parts {
        Parts {
            lead: vec![-1],
            prefix: (100..100 + prefix as i64).collect(),
            body: (0..body as i64).collect(),
            trail: vec![-2],
        }
    }

    fn lt(mode: Mode, max: usize, stride: usize) -> LongText {
        LongText {
            mode,
            stride,
            ..LongText::truncate(Some(max))
        }
    }

    #[test]
    fn split_finds_specials_and_the_prompt_part() {
        // BOS, "Q:" (0..2), " a" (2..4, straddles a 3-byte prompt part), " b" (4..6), EOS.
        let ids = [1, 10, 11, 12, 2];
        let seq = [None, Some(0), Some(0), Some(0), None];
        let offsets = [(0, 0), (0, 2), (2, 4), (4, 6), (0, 0)];
        let p = Parts::split(&ids, &seq, &offsets, 3);
        assert_eq!(p.lead, vec![1]);
        assert_eq!(p.prefix, vec![10]);
        assert_eq!(p.body, vec![11, 12]);
        assert_eq!(p.trail, vec![2]);
        let empty = Parts::split(&[1], &[None], &[(0, 0)], 3);
        assert_eq!(empty.lead, vec![1]);
        assert_eq!(empty.len(), 1);
    }

    #[test]
    fn truncation_keeps_the_special_tokens_and_cuts_either_end() {
        let p = parts(2, 6);
        let right = lt(Mode::Truncate, 6, 0).fit(&p).unwrap();
        assert_eq!(right, vec![vec![-1, 100, 101, 0, 1, -2]]);
        let left = LongText {
            side: Side::Left,
            ..lt(Mode::Truncate, 6, 0)
        };
        assert_eq!(left.fit(&p).unwrap(), vec![vec![-1, 2, 3, 4, 5, -2]]);
        // What fits is left whole.
        assert_eq!(lt(Mode::Chunk, 10, 1).fit(&p).unwrap()[0].len(), 10);
        assert!(lt(Mode::Truncate, 2, 0).fit(&p).is_err());
    }

    #[test]
    fn head_tail_keeps_the_prompt_part_the_head_and_the_tail() {
        let p = parts(2, 20);
        // Room for 8 body tokens: 2 from the head (a quarter), 6 from the tail.
        let r = lt(Mode::HeadTail, 12, 0).fit(&p).unwrap();
        assert_eq!(
            r,
            vec![vec![-1, 100, 101, 0, 1, 14, 15, 16, 17, 18, 19, -2]]
        );
        let h = LongText {
            head_tokens: Some(5),
            ..lt(Mode::HeadTail, 12, 0)
        };
        assert_eq!(
            h.fit(&p).unwrap(),
            vec![vec![-1, 100, 101, 0, 1, 2, 3, 4, 17, 18, 19, -2]]
        );
    }

    #[test]
    fn chunks_overlap_by_the_stride_and_cover_the_body() {
        let p = parts(2, 11);
        // Room 5, stride 2: windows start at 0, 3, 6 (ends 5, 8, 11).
        let w = lt(Mode::Chunk, 9, 2).fit(&p).unwrap();
        assert_eq!(w.len(), 3);
        for (i, win) in w.iter().enumerate() {
            assert_eq!(&win[..3], &[-1, 100, 101]);
            assert_eq!(*win.last().unwrap(), -2);
            let start = 3 * i as i64;
            assert_eq!(&win[3..8], &(start..start + 5).collect::<Vec<_>>()[..]);
        }
        // The first window is what right truncation reads.
        assert_eq!(w[0], lt(Mode::Truncate, 9, 0).fit(&p).unwrap()[0]);
        assert!(lt(Mode::Chunk, 9, 5).fit(&p).is_err());
        assert!(lt(Mode::Chunk, 4, 0).fit(&p).is_err());
    }

    #[test]
    fn counts_what_is_over() {
        let mut c = Counted::default();
        c.add(10, Some(8), 2);
        c.add(5, Some(8), 1);
        c.add(20, Some(8), 3);
        assert_eq!(
            (c.inputs, c.over, c.longest, c.excess, c.rows),
            (3, 2, 20, 14, 6)
        );
        let line = c.line("train", &lt(Mode::Chunk, 8, 1)).unwrap();
        assert!(line.contains("2 of 3 inputs"), "{line}");
        assert!(line.contains("7.0 over"), "{line}");
        assert!(Counted::default()
            .line("x", &lt(Mode::Chunk, 8, 1))
            .is_none());
    }

    #[test]
    fn aggregation_means_logits_or_takes_the_surest_window() {
        let rows = vec![vec![0.0, 1.0], vec![3.0, -1.0], vec![0.5, 0.5]];
        let mean = aggregate(&rows, ProblemType::SingleLabel, Aggregate::MeanLogits).unwrap();
        assert!((mean[0] - 3.5 / 3.0).abs() < 1e-12 && (mean[1] - 0.5 / 3.0).abs() < 1e-12);
        let max = aggregate(&rows, ProblemType::SingleLabel, Aggregate::MaxProb).unwrap();
        assert_eq!(max, vec![3.0, -1.0]);
        let multi = aggregate(&rows, ProblemType::MultiLabel, Aggregate::MaxProb).unwrap();
        assert_eq!(multi, vec![3.0, 1.0]);
        assert!(aggregate(&rows, ProblemType::Regression, Aggregate::MaxProb).is_err());
    }
}
