//! The embedded demo: a synthetic MRPC-like data set, a byte-level BPE tokenizer trained on
//! it, and a tiny random-weight Llama in Hugging Face layout, so that `make train` works
//! with no downloads. Everything comes from fixed seeds and is byte-identical on every run.
//!
//! The data is made to be learnable by a frozen random Llama with LoRA on q/v and a linear
//! head: sentence 1 always reports a rise ("rose", "climbed", "higher", ...); a paraphrase
//! (label 1, ~68% as in MRPC) restates it with another rise word, another template, another
//! number format and subject phrasing; a non-paraphrase (label 0) reports a fall ("fell",
//! "slumped", "lower", ...), sometimes about another company too. So a bag of words over
//! sentence 2 decides the label, while the surface varies enough not to be memorised.
use crate::data::formats::Example;
use crate::data::prompt::{render, PROMPTS};
use crate::runio::{write_atomic, write_json, write_text};
use anyhow::{anyhow, Context, Result};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

/// The demo tokenizer's chat template (conversational preference data renders through it).
pub const DEMO_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
/// Llama-3's pre-tokenizer pattern (tokenizer.json of Meta-Llama-3-8B).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub const N_TRAIN: usize = 1600;
pub const N_DEV: usize = 300;
pub const N_TEST: usize = 300;
pub const TOKENIZER_VOCAB: usize = 1000;
const DATA_SEED: u64 = 20_050_000;
const WEIGHT_SEED: u64 = 1_234_567;
const P_PARAPHRASE: f64 = 0.68;

/// Architecture of the demo model (HF Llama field names).
pub const HIDDEN: usize = 64;
pub const INTERMEDIATE: usize = 176;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;

/// Writes `out/model/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}`
/// and `out/data/{train,dev,test}.tsv` (GLUE layout; test unlabelled with an index column),
/// and the other problem types' data sets in `out/tasks/` ([`crate::demo_tasks`]).
pub fn write_demo_assets(out: &Path) -> Result<()> {
    let (train, dev, test) = demo_dataset();
    let data = out.join("data");
    write_text(&data.join("train.tsv"), &glue_tsv(&train, true))?;
    write_text(&data.join("dev.tsv"), &glue_tsv(&dev, true))?;
    write_text(&data.join("test.tsv"), &glue_tsv(&test, false))?;

    let model = out.join("model");
    let corpus: Vec<String> = train
        .iter()
        .chain(&dev)
        .chain(&test)
        .enumerate()
        .map(|(k, ex)| render(PROMPTS[k % PROMPTS.len()].1, ex))
        .collect();
    let tokenizer = train_tokenizer(&corpus)?;
    let json = tokenizer
        .to_string(true)
        .map_err(|e| anyhow!("cannot serialise the demo tokenizer: {e}"))?;
    write_text(&model.join("tokenizer.json"), &json)?;
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| anyhow!("demo tokenizer lacks {BOS}"))?;
    let eos_id = tokenizer
        .token_to_id(EOS)
        .ok_or_else(|| anyhow!("demo tokenizer lacks {EOS}"))?;
    let vocab = tokenizer.get_vocab_size(true);
    write_json(
        &model.join("tokenizer_config.json"),
        &serde_json::json!({
            "bos_token": BOS,
            "eos_token": EOS,
            "clean_up_tokenization_spaces": true,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 512,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": DEMO_CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        &model.join("config.json"),
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab,
            "max_position_embeddings": 512,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "bfloat16",
            "initializer_range": 0.02,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "use_cache": true,
        }),
    )?;
    write_atomic(&model.join("model.safetensors"), &demo_weights(vocab)?)?;
    crate::demo_tasks::write_demo_tasks(out)
}

/// GLUE TSV text: `Quality #1 ID #2 ID #1 String #2 String`, or for an unlabelled split
/// `index #1 ID #2 ID ...` like GLUE's test.tsv.
fn glue_tsv(rows: &[Example], labelled: bool) -> String {
    let mut s = String::from(if labelled { "Quality" } else { "index" });
    s.push_str("\t#1 ID\t#2 ID\t#1 String\t#2 String\n");
    for ex in rows {
        let first = if labelled {
            ex.label.unwrap_or(0)
        } else {
            ex.idx
        };
        // Synthetic sentence ids, unique across splits like the MSR ones.
        let id = 1_000_000 + 2 * ex.idx + if labelled { 0 } else { 500_000 };
        s.push_str(&format!(
            "{first}\t{id}\t{}\t{}\t{}\n",
            id + 1,
            ex.sentence1,
            ex.sentence2
        ));
    }
    s
}

// ---------------------------------------------------------------- synthetic sentences

const COMPANIES: [&str; 32] = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Vandelay",
    "Soylent",
    "Cyberdyne",
    "Tyrell",
    "Wonka",
    "Oscorp",
    "Aperture",
    "Stark Industries",
    "Wayne Enterprises",
    "Massive Dynamic",
    "Pied Piper",
    "Dunder Mifflin",
    "Monarch",
    "Nakatomi",
    "Sterling Cooper",
    "Prestige Worldwide",
    "Blue Sun",
    "Virtucon",
    "Rekall",
    "Zorin",
    "Veridian",
    "Contoso",
    "Fabrikam",
    "Northwind",
    "Tailspin",
    "Gringotts",
    "Bluth",
];

/// Subject phrasings per measure; `{}` is the company.
const MEASURES: [&[&str]; 3] = [
    &["Shares of {}", "{} shares", "{}'s stock", "The stock of {}"],
    &[
        "Profit at {}",
        "{}'s profit",
        "{}'s quarterly profit",
        "Earnings at {}",
    ],
    &["Sales at {}", "{}'s sales", "Revenue at {}", "{}'s revenue"],
];

const UP_VERBS: [&str; 12] = [
    "rose",
    "climbed",
    "jumped",
    "gained",
    "advanced",
    "increased",
    "surged",
    "soared",
    "rallied",
    "grew",
    "edged up",
    "rebounded",
];
/// Few fall words on purpose: each is a separate token whose meaning a frozen random model
/// must learn from examples, and with a dozen of them a LoRA run needed many more epochs.
const DOWN_VERBS: [&str; 4] = ["fell", "dropped", "slid", "sank"];
const UP_ADJ: [&str; 2] = ["higher", "up"];
const DOWN_ADJ: [&str; 2] = ["lower", "down"];

const TIMES: [&str; 10] = [
    "on Monday",
    "on Tuesday",
    "on Wednesday",
    "on Thursday",
    "on Friday",
    "last week",
    "on Friday afternoon",
    "in the second quarter",
    "in the third quarter",
    "in early trading",
];

/// Each row: interchangeable phrasings of one reason.
const REASONS: [&[&str]; 8] = [
    &[
        "after the earnings report",
        "following the earnings report",
        "after it reported earnings",
    ],
    &[
        "after analysts raised their forecasts",
        "as analysts lifted their estimates",
    ],
    &[
        "as investors cheered the merger news",
        "on news of the merger",
        "after news of the merger broke",
    ],
    &[
        "amid strong holiday sales",
        "thanks to strong holiday demand",
    ],
    &[
        "after the company named a new chief executive",
        "after a new chief executive was appointed",
    ],
    &["as oil prices eased", "as the price of oil eased"],
    &[
        "after a court ruling in its favour",
        "following a favourable court ruling",
    ],
    &[
        "after the central bank cut interest rates",
        "following an interest rate cut by the central bank",
    ],
];

const SOURCES: [&[&str]; 4] = [
    &["analysts said", "Analysts said"],
    &["traders said", "Traders said"],
    &["the company said", "The company said"],
    &["market data showed", "Market data showed"],
];

const NUMBER_WORDS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// What a sentence says; the surface form is chosen separately.
#[derive(Clone)]
struct Fact {
    company: usize,
    measure: usize,
    up: bool,
    /// Tenths of a percent.
    change: u32,
    time: usize,
    reason: usize,
}

/// The words and phrasings of one rendering.
struct Surface {
    template: usize,
    subject: usize,
    word: usize,
    number_format: usize,
    reason_form: usize,
    source: usize,
}

fn pick<R: Rng>(rng: &mut R, n: usize) -> usize {
    rng.gen_range(0..n)
}

fn pick_other<R: Rng>(rng: &mut R, n: usize, not: usize) -> usize {
    let k = rng.gen_range(0..n - 1);
    if k >= not {
        k + 1
    } else {
        k
    }
}

fn number(change: u32, format: usize) -> String {
    let whole = change.is_multiple_of(10);
    let n = if whole {
        format!("{}", change / 10)
    } else {
        format!("{}.{}", change / 10, change % 10)
    };
    match format {
        0 => format!("{n} percent"),
        1 => format!("{n}%"),
        2 => format!("{n} per cent"),
        _ if whole && change / 10 <= 10 => {
            format!("{} percent", NUMBER_WORDS[(change / 10) as usize])
        }
        _ => format!("{n} percent"),
    }
}

fn lower_first(s: &str) -> String {
    // Company names stay capitalised; only a leading common word is lowered.
    for w in ["Shares", "Profit", "Earnings", "Sales", "Revenue", "The"] {
        if let Some(rest) = s.strip_prefix(w) {
            return format!("{}{rest}", w.to_lowercase());
        }
    }
    s.to_string()
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

const N_TEMPLATES: usize = 6;

fn realise(f: &Fact, s: &Surface) -> String {
    let subj = MEASURES[f.measure][s.subject].replace("{}", COMPANIES[f.company]);
    let verb = if f.up {
        UP_VERBS[s.word % UP_VERBS.len()]
    } else {
        DOWN_VERBS[s.word % DOWN_VERBS.len()]
    };
    let adj = if f.up {
        UP_ADJ[s.word % UP_ADJ.len()]
    } else {
        DOWN_ADJ[s.word % DOWN_ADJ.len()]
    };
    let num = number(f.change, s.number_format);
    let time = TIMES[f.time];
    let forms = REASONS[f.reason];
    let reason = forms[s.reason_form % forms.len()];
    let src = SOURCES[s.source];
    match s.template {
        0 => format!("{subj} {verb} {num} {time} {reason}."),
        1 => format!(
            "{}, {} {verb} {num} {reason}, {}.",
            upper_first(time),
            lower_first(&subj),
            src[0]
        ),
        2 => format!("{subj} {verb} by {num} {time}, {}, {reason}.", src[0]),
        3 => format!(
            "{}, {} {verb} {num} {time}.",
            upper_first(reason),
            lower_first(&subj)
        ),
        4 => format!(
            "{} that {} {verb} {num} {time} {reason}.",
            src[1],
            lower_first(&subj)
        ),
        _ => format!("{subj} closed {num} {adj} {time} {reason}."),
    }
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// One labelled pair; resampled until both sentences have 10-25 words.
fn make_pair<R: Rng>(rng: &mut R, paraphrase: bool) -> (String, String) {
    loop {
        let fact = Fact {
            company: pick(rng, COMPANIES.len()),
            measure: pick(rng, MEASURES.len()),
            up: true,
            change: if rng.gen_bool(0.7) {
                rng.gen_range(1..=30) * 10
            } else {
                rng.gen_range(5..=300)
            },
            time: pick(rng, TIMES.len()),
            reason: pick(rng, REASONS.len()),
        };
        let s1 = Surface {
            template: pick(rng, N_TEMPLATES),
            subject: pick(rng, 4),
            word: pick(rng, UP_VERBS.len()),
            number_format: pick(rng, 4),
            reason_form: pick(rng, 3),
            source: pick(rng, SOURCES.len()),
        };
        let mut fact2 = fact.clone();
        if !paraphrase {
            fact2.up = false;
            if rng.gen_bool(0.4) {
                fact2.company = pick_other(rng, COMPANIES.len(), fact.company);
            }
            if rng.gen_bool(0.3) {
                fact2.change = rng.gen_range(1..=30) * 10;
            }
        }
        let s2 = Surface {
            template: pick_other(rng, N_TEMPLATES, s1.template),
            subject: pick_other(rng, 4, s1.subject),
            word: pick_other(rng, UP_VERBS.len(), s1.word),
            number_format: pick_other(rng, 4, s1.number_format),
            reason_form: s1.reason_form + 1,
            source: pick(rng, SOURCES.len()),
        };
        let (a, b) = (realise(&fact, &s1), realise(&fact2, &s2));
        if (10..=25).contains(&words(&a)) && (10..=25).contains(&words(&b)) {
            return (a, b);
        }
    }
}

/// (train, dev, test) examples; test labels exist here but are not written (GLUE hides them).
pub fn demo_dataset() -> (Vec<Example>, Vec<Example>, Vec<Example>) {
    let mut rng = ChaCha8Rng::seed_from_u64(DATA_SEED);
    let mut split = |n: usize| -> Vec<Example> {
        (0..n)
            .map(|i| {
                let paraphrase = rng.gen_bool(P_PARAPHRASE);
                let (s1, s2) = make_pair(&mut rng, paraphrase);
                Example {
                    sentence1: s1,
                    sentence2: s2,
                    label: Some(i64::from(paraphrase)),
                    idx: i as i64,
                }
            })
            .collect()
    };
    let train = split(N_TRAIN);
    let dev = split(N_DEV);
    let test = split(N_TEST);
    (train, dev, test)
}

// ---------------------------------------------------------------- tokenizer

/// Byte-level BPE shaped like Llama-3's tokenizer.json: Llama-3 split regex + byte level
/// pre-tokenizer, byte-level decoder, bos prepended by a TemplateProcessing post-processor.
pub fn train_tokenizer(corpus: &[String]) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("bad pre-tokenizer pattern: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let alphabet = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(TOKENIZER_VOCAB)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(alphabet)
            .special_tokens(vec![
                AddedToken::from(BOS, true),
                AddedToken::from(EOS, true),
            ])
            .build(),
    );
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow!("cannot train the demo tokenizer: {e}"))?;
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| anyhow!("trained tokenizer lacks {BOS}"))?;
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| anyhow!("bad template: {e}"))?
        .try_pair(format!("{BOS} $A {BOS}:1 $B:1"))
        .map_err(|e| anyhow!("bad template: {e}"))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| anyhow!("bad template: {e}"))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::Sequence(PostSequence::new(
        vec![
            PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true)),
            PostProcessorWrapper::Template(template),
        ],
    ))));
    Ok(tokenizer)
}

// ---------------------------------------------------------------- weights

/// Standard normal samples (Box-Muller) from a seeded ChaCha8 stream.
struct Normal {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Normal {
    fn sample(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] keeps ln finite.
        let u1 = 1.0 - self.rng.gen::<f64>();
        let u2: f64 = self.rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// The HF Llama tensor names and shapes of the demo model, in a fixed order.
pub fn demo_tensor_shapes(vocab: usize) -> Vec<(String, Vec<usize>)> {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, HIDDEN])];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]));
        v.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
        ));
        v.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
        ));
        v.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTERMEDIATE],
        ));
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
    }
    v.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    v
}

/// model.safetensors bytes: normal(0, 0.02) matrices, unit norms, all bf16.
fn demo_weights(vocab: usize) -> Result<Vec<u8>> {
    let mut normal = Normal {
        rng: ChaCha8Rng::seed_from_u64(WEIGHT_SEED),
        spare: None,
    };
    let shapes = demo_tensor_shapes(vocab);
    let mut buffers = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let mut bytes = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let x = if is_norm {
                1.0
            } else {
                0.02 * normal.sample() as f32
            };
            bytes.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
        }
        buffers.push(bytes);
    }
    let mut views = Vec::with_capacity(shapes.len());
    for ((name, shape), bytes) in shapes.iter().zip(&buffers) {
        let view = TensorView::new(Dtype::BF16, shape.clone(), bytes)
            .with_context(|| format!("bad demo tensor {name}"))?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| anyhow!("cannot serialise the demo weights: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let mut n = Normal {
            rng: ChaCha8Rng::seed_from_u64(1),
            spare: None,
        };
        let xs: Vec<f64> = (0..20000).map(|_| n.sample()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn sentences_have_10_to_25_words_and_no_tabs() {
        let (train, dev, test) = demo_dataset();
        for ex in train.iter().chain(&dev).chain(&test) {
            for s in [&ex.sentence1, &ex.sentence2] {
                assert!((10..=25).contains(&words(s)), "{s}");
                assert!(!s.contains('\t') && !s.contains('\n'));
            }
        }
    }

    #[test]
    fn reason_rows_have_distinct_forms() {
        // make_pair relies on reason_form + 1 picking another phrasing (mod the row length).
        for row in REASONS {
            assert!(row.len() >= 2);
        }
    }
}
