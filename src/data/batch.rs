//! Tokenisation (a Hugging Face `tokenizer.json`), padding into tensors, and the order of
//! batches in an epoch.
use super::formats::Example;
use super::long_text::{Counted, LongText, Mode, Parts};
use super::prompt::render;
use crate::labels::Target;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use tch::Tensor;
use tokenizers::Tokenizer;

/// Names tried, in order, when `tokenizer_config.json` does not name the eos token.
pub const KNOWN_EOS_NAMES: [&str; 4] = ["<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"];

/// A fast tokenizer loaded from `<dir>/tokenizer.json`, encoding like
/// `AutoTokenizer.from_pretrained(dir)(texts, truncation=True, max_length=...)`, and fitting
/// longer texts to `max_length` as `long_text` says.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    long: LongText,
    pad_id: i64,
    eos_token: String,
    max_id: i64,
    path: PathBuf,
}

impl TextEncoder {
    /// Loads `<tokenizer_dir>/tokenizer.json`. Padding and truncation settings stored in the
    /// file are dropped (we pad ourselves, and cut in [`LongText::fit`], which needs the whole
    /// text); `max_length` truncates on the right, special tokens included, as HF's
    /// `truncation=True` does, until [`Self::set_long_text`] says otherwise.
    ///
    /// The pad id is the eos id (the reference sets `tokenizer.pad_token = eos_token`). The
    /// eos token is `eos_token` of `<dir>/tokenizer_config.json` (a string or `{"content": ..}`)
    /// when that file names one, else the first of [`KNOWN_EOS_NAMES`] the vocabulary holds.
    pub fn from_dir(tokenizer_dir: &Path, max_length: Option<usize>) -> Result<Self> {
        let path = tokenizer_dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "no tokenizer file {} (the tokenizer folder must hold a Hugging Face \
                 fast-tokenizer tokenizer.json)",
                path.display()
            );
        }
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        if max_length == Some(0) {
            bail!("max_length must be at least 1");
        }
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: bad truncation settings: {e}", path.display()))?;
        let eos_token = find_eos(tokenizer_dir, &tokenizer)?;
        let pad_id = tokenizer
            .token_to_id(&eos_token)
            .ok_or_else(|| anyhow!("{}: no token '{eos_token}'", path.display()))?
            as i64;
        let max_id = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .ok_or_else(|| anyhow!("{}: empty vocabulary", path.display()))?
            as i64;
        Ok(Self {
            tokenizer,
            long: LongText::truncate(max_length),
            pad_id,
            eos_token,
            max_id,
            path,
        })
    }

    /// How over-long texts are fitted (its `max_length` is the one given to `from_dir`).
    pub fn set_long_text(&mut self, long: LongText) {
        self.long = LongText {
            max_length: self.long.max_length,
            ..long
        };
    }

    pub fn long_text(&self) -> &LongText {
        &self.long
    }

    /// Token ids with the special tokens of the post-processor (Llama-3: `<|begin_of_text|>`),
    /// cut to one row (with `long_text: chunk`, its first window: a right truncation).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let mut rows = self.encode_many(vec![text.to_string()])?;
        rows.pop()
            .ok_or_else(|| anyhow!("{}: no encoding", self.path.display()))
    }

    /// Encodes many texts in parallel; same result as `encode` on each.
    pub fn encode_many(&self, texts: Vec<String>) -> Result<Vec<Vec<i64>>> {
        let one_row = match self.long.mode {
            Mode::Chunk => LongText {
                mode: Mode::Truncate,
                ..LongText::truncate(self.long.max_length)
            },
            _ => self.long,
        };
        let (rows, _) = self.fit_many(texts, 0, &one_row)?;
        Ok(rows.into_iter().map(|mut r| r.swap_remove(0)).collect())
    }

    /// Each text's rows (one, or one per `chunk` window, each led by the text's first
    /// `prefix_bytes` bytes: the template's prompt part), and what was cut.
    pub fn encode_fitted(
        &self,
        texts: Vec<String>,
        prefix_bytes: usize,
    ) -> Result<(Vec<Vec<Vec<i64>>>, Counted)> {
        self.fit_many(texts, prefix_bytes, &self.long)
    }

    /// [`Self::encode_fitted`] with other settings than the encoder's own.
    pub fn fit_many(
        &self,
        texts: Vec<String>,
        prefix_bytes: usize,
        long: &LongText,
    ) -> Result<(Vec<Vec<Vec<i64>>>, Counted)> {
        self.fit_many_with(texts, prefix_bytes, long, true)
    }

    /// The folder of the tokenizer (where its `tokenizer_config.json` and chat template are).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn fit_many_with(
        &self,
        texts: Vec<String>,
        prefix_bytes: usize,
        long: &LongText,
        add_special_tokens: bool,
    ) -> Result<(Vec<Vec<Vec<i64>>>, Counted)> {
        let encs = self
            .tokenizer
            .encode_batch(texts, add_special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode texts: {e}", self.path.display()))?;
        let mut counted = Counted::default();
        let mut out = Vec::with_capacity(encs.len());
        for e in &encs {
            let ids: Vec<i64> = e.get_ids().iter().map(|&i| i as i64).collect();
            let parts = Parts::split(&ids, &e.get_sequence_ids(), e.get_offsets(), prefix_bytes);
            let rows = long
                .fit(&parts)
                .with_context(|| format!("tokenizer {}", self.path.display()))?;
            counted.add(ids.len(), long.max_length, rows.len());
            out.push(rows);
        }
        Ok((out, counted))
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Pads with `id` instead of the EOS token (a model whose config names its pad token).
    pub fn set_pad_id(&mut self, id: i64) {
        self.pad_id = id;
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The largest token id (the embedding must have more rows than this).
    pub fn max_id(&self) -> i64 {
        self.max_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(|i| i as i64)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

fn find_eos(dir: &Path, tokenizer: &Tokenizer) -> Result<String> {
    let cfg_path = dir.join("tokenizer_config.json");
    if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
        if let Some(name) = super::chat::token_text(cfg.get("eos_token")) {
            if tokenizer.token_to_id(&name).is_none() {
                bail!(
                    "{} names eos_token '{name}', which tokenizer.json does not have",
                    cfg_path.display()
                );
            }
            return Ok(name);
        }
    }
    KNOWN_EOS_NAMES
        .iter()
        .find(|n| tokenizer.token_to_id(n).is_some())
        .map(|n| n.to_string())
        .ok_or_else(|| {
            anyhow!(
                "cannot tell the eos (= pad) token of the tokenizer in {}: tokenizer_config.json \
                 names no eos_token and the vocabulary has none of {}",
                dir.display(),
                KNOWN_EOS_NAMES.join(", ")
            )
        })
}

/// One tokenised example (or, with `long_text: chunk`, one window of it).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub label: Option<Target>,
    pub idx: i64,
    /// The window's place in its document: a document's windows follow each other, and a
    /// new document starts at every 0.
    pub window: u32,
    /// A preference pair's rejected text (`ids` holds the chosen one).
    pub rejected: Option<Vec<i64>>,
}

/// The texts' rows, each with its example's target and idx: one per text, or one per
/// window.
fn fitted(
    enc: &TextEncoder,
    texts: Vec<String>,
    prefix_bytes: usize,
    rows_of: impl Iterator<Item = (Option<Target>, i64)>,
) -> Result<(Vec<Encoded>, Counted)> {
    let (windows, counted) = enc.encode_fitted(texts, prefix_bytes)?;
    let mut out = Vec::with_capacity(counted.rows);
    for (rows, (label, idx)) in windows.into_iter().zip(rows_of) {
        for (w, ids) in rows.into_iter().enumerate() {
            out.push(Encoded {
                ids,
                label: label.clone(),
                idx,
                window: w as u32,
                rejected: None,
            });
        }
    }
    Ok((out, counted))
}

/// `render(prompt, ex)` then encode, for every example; and what was cut.
pub fn encode_examples(
    enc: &TextEncoder,
    examples: &[Example],
    prompt: &str,
) -> Result<(Vec<Encoded>, Counted)> {
    let texts: Vec<String> = examples.iter().map(|ex| render(prompt, ex)).collect();
    let prefix = super::prompt::prompt_part(prompt).len();
    let rows = examples
        .iter()
        .map(|ex| (ex.label.map(Target::Class), ex.idx));
    fitted(enc, texts, prefix, rows)
}

/// TRL's preference pairs (`[prompt, chosen, rejected]` texts): `prompt + chosen` and
/// `prompt + rejected`, each with the EOS token appended unless it already ends with it, as
/// `RewardTrainer` renders non-conversational data; both cut as `long_text: truncate` says.
fn encode_pairs(
    enc: &TextEncoder,
    examples: &[super::examples::TaskExample],
    targets: Vec<Option<Target>>,
) -> Result<(Vec<Encoded>, Counted)> {
    if enc.long_text().mode == Mode::Chunk {
        bail!("key `long_text`: a preference pair is read whole or cut, not chunked");
    }
    let eos = enc.eos_token().to_string();
    let with_eos = |t: &str| {
        if t.ends_with(&eos) {
            t.to_string()
        } else {
            format!("{t}{eos}")
        }
    };
    let conversational = examples.first().is_some_and(|e| e.conversational);
    if examples.iter().any(|e| e.conversational != conversational) {
        bail!("preference rows mix plain texts with conversations (lists of messages)");
    }
    // The conversational form renders `prompt + chosen` (messages) through the chat template,
    // whose text already holds the special tokens it wants.
    let template = match conversational {
        true => Some(super::chat::ChatTemplate::from_dir(enc.dir())?.ok_or_else(|| {
            anyhow!(
                "conversational preference data needs the tokenizer's chat template, and {} has none \
                 (tokenizer_config.json `chat_template` or chat_template.jinja)",
                enc.dir().display()
            )
        })?),
        false => None,
    };
    let plain = examples.iter().any(|e| e.texts.len() == 2);
    if plain {
        return encode_responses(enc, examples, template.as_ref(), &with_eos);
    }
    let mut texts = Vec::with_capacity(2 * examples.len());
    for ex in examples {
        let [prompt, chosen, rejected] = ex.texts.as_slice() else {
            bail!(
                "{}: a preference pair needs chosen and rejected texts",
                ex.where_
            );
        };
        match &template {
            Some(t) => {
                let render = |side: &str| -> Result<String> {
                    let mut messages = super::chat::parse_messages(prompt)?;
                    messages.extend(super::chat::parse_messages(side)?);
                    t.render(&messages, false)
                };
                texts.push(render(chosen).with_context(|| ex.where_.clone())?);
                texts.push(render(rejected).with_context(|| ex.where_.clone())?);
            }
            None => {
                texts.push(format!("{prompt}{}", with_eos(chosen)));
                texts.push(format!("{prompt}{}", with_eos(rejected)));
            }
        }
    }
    let (rows, counted) = enc.fit_many_with(texts, 0, enc.long_text(), !conversational)?;
    let mut out = Vec::with_capacity(examples.len());
    let mut rows = rows.into_iter().map(|mut r| r.swap_remove(0));
    for (ex, label) in examples.iter().zip(targets) {
        let (Some(ids), Some(rejected)) = (rows.next(), rows.next()) else {
            bail!("{}: no encoding", ex.where_);
        };
        out.push(Encoded {
            ids,
            label,
            idx: ex.idx,
            window: 0,
            rejected: Some(rejected),
        });
    }
    Ok((out, counted))
}

/// A reward model's plain rows (`[prompt, text]` texts): each rendered as one side of a pair
/// is, one row each, without a target.
fn encode_responses(
    enc: &TextEncoder,
    examples: &[super::examples::TaskExample],
    template: Option<&super::chat::ChatTemplate>,
    with_eos: &dyn Fn(&str) -> String,
) -> Result<(Vec<Encoded>, Counted)> {
    let mut texts = Vec::with_capacity(examples.len());
    for ex in examples {
        let [prompt, text] = ex.texts.as_slice() else {
            bail!("{}: rows of responses and of pairs in one file", ex.where_);
        };
        texts.push(match template {
            Some(t) => {
                let mut messages = super::chat::parse_messages(prompt)?;
                messages.extend(super::chat::parse_messages(text)?);
                t.render(&messages, false)
                    .with_context(|| ex.where_.clone())?
            }
            None => format!("{prompt}{}", with_eos(text)),
        });
    }
    let (rows, counted) = enc.fit_many_with(texts, 0, enc.long_text(), template.is_none())?;
    let out = rows
        .into_iter()
        .zip(examples)
        .map(|(mut r, ex)| Encoded {
            ids: r.swap_remove(0),
            label: None,
            idx: ex.idx,
            window: 0,
            rejected: None,
        })
        .collect();
    Ok((out, counted))
}

/// A task's texts rendered through its template, then encoded, with their targets; and
/// what was cut.
pub fn encode_task_examples(
    enc: &TextEncoder,
    task: &crate::task::Task,
    prompt: &str,
    examples: &[super::examples::TaskExample],
    targets: Vec<Option<Target>>,
) -> Result<(Vec<Encoded>, Counted)> {
    if task.is_preference() {
        return encode_pairs(enc, examples, targets);
    }
    let texts: Vec<String> = examples
        .iter()
        .map(|ex| crate::task::render(&task.template, prompt, &task.text_columns, &ex.texts))
        .collect();
    let prefix = crate::task::prompt_part(&task.template, prompt, &task.text_columns).len();
    let rows = targets.into_iter().zip(examples.iter().map(|ex| ex.idx));
    fitted(enc, texts, prefix, rows)
}

/// A padded batch on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// i64 [B, T]
    pub input_ids: Tensor,
    /// i64 [B, T], 1 on real tokens, 0 on padding
    pub attention_mask: Tensor,
    /// i64 [B] class ids, f32 [B, K] multi-hot rows or f32 [B] values; `None` unless every
    /// row has a target (of one kind)
    pub labels: Option<Tensor>,
    pub idx: Vec<i64>,
    /// Real (unpadded) tokens in the batch.
    pub n_tokens: i64,
}

/// Right-pads every row to the longest with `pad_id` (HF `padding=True`, padding side right).
/// Preference pairs give two rows each: every chosen text, then every rejected one (TRL's
/// `DataCollatorForPreference`).
pub fn collate(items: &[&Encoded], pad_id: i64) -> Batch {
    let texts: Vec<&[i64]> = match items.first().and_then(|e| e.rejected.as_ref()) {
        Some(_) => items
            .iter()
            .map(|e| e.ids.as_slice())
            .chain(items.iter().map(|e| e.rejected.as_deref().unwrap_or(&[])))
            .collect(),
        None => items.iter().map(|e| e.ids.as_slice()).collect(),
    };
    let b = texts.len();
    let t = texts.iter().map(|e| e.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    for (r, e) in texts.iter().enumerate() {
        ids[r * t..r * t + e.len()].copy_from_slice(e);
        mask[r * t..r * t + e.len()].fill(1);
    }
    let shape = [b as i64, t as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        attention_mask: Tensor::from_slice(&mask).view(shape),
        labels: target_tensor(items),
        idx: items.iter().map(|e| e.idx).collect(),
        n_tokens: texts.iter().map(|e| e.len() as i64).sum(),
    }
}

/// The targets of `items` as one tensor, when all have one of the same kind.
pub fn target_tensor(items: &[&Encoded]) -> Option<Tensor> {
    let targets: Vec<&Target> = items
        .iter()
        .map(|e| e.label.as_ref())
        .collect::<Option<_>>()?;
    match targets.first()? {
        Target::Class(_) => {
            let v: Vec<i64> = targets.iter().map(|t| t.class()).collect::<Option<_>>()?;
            Some(Tensor::from_slice(&v))
        }
        Target::Multi(first) => {
            let k = first.len();
            let mut v = Vec::with_capacity(k * targets.len());
            for t in &targets {
                match t {
                    Target::Multi(row) if row.len() == k => v.extend_from_slice(row),
                    _ => return None,
                }
            }
            Some(Tensor::from_slice(&v).view([targets.len() as i64, k as i64]))
        }
        Target::Value(_) => {
            let v: Vec<f32> = targets
                .iter()
                .map(|t| match t {
                    Target::Value(x) => Some(*x as f32),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            Some(Tensor::from_slice(&v))
        }
    }
}

/// Batches (of example indices) for each bucketing chunk: length-bucketing sorts this many
/// batches' worth of examples by length at a time.
pub const BUCKET_CHUNK_BATCHES: usize = 50;

/// Batches of indices for one epoch. shuffle: Some(seed) → a permutation from a seeded RNG
/// (ChaCha8, seed mixed with epoch), None → in order.
/// bucket: Some(lengths) → length-bucketed batching (sort within chunks of
/// [`BUCKET_CHUNK_BATCHES`] batches by length, longest first, then shuffle the batches when
/// shuffling), None → plain. The last batch may be short; every index appears exactly once.
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    shuffle: Option<u64>,
    epoch: usize,
    bucket_lengths: Option<&[usize]>,
) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch_size must be positive");
    let mut rng = shuffle.map(|seed| {
        // splitmix-style mixing so that (seed, epoch) pairs do not collide trivially.
        let mixed = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ChaCha8Rng::seed_from_u64(mixed)
    });
    let mut order: Vec<usize> = (0..n).collect();
    if let Some(rng) = rng.as_mut() {
        order.shuffle(rng);
    }
    let Some(lengths) = bucket_lengths else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    assert_eq!(lengths.len(), n, "one length per example");
    let mut batches = Vec::new();
    for chunk in order.chunks(batch_size * BUCKET_CHUNK_BATCHES) {
        let mut chunk = chunk.to_vec();
        // Stable sort: ties keep the (shuffled) order.
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    if let Some(rng) = rng.as_mut() {
        batches.shuffle(rng);
    }
    batches
}
