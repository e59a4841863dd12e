//! The prompt put in front of each sentence pair, and the text the model reads.
use super::formats::Example;
use anyhow::{bail, Result};

/// The named prompts of the experiment: name → text.
pub const PROMPTS: [(&str, &str); 4] = [
    ("none", ""),
    ("perfect", "Does sentence 1 mean the same as sentence 2?"),
    (
        "conflicting",
        "Bob sent a message to Alice, which one is better?",
    ),
    ("insufficient", "Cut the crap, what's your GPA?"),
];

/// The names of [`PROMPTS`], in order.
pub fn prompt_names() -> Vec<&'static str> {
    PROMPTS.iter().map(|(n, _)| *n).collect()
}

/// A prompt name (case-insensitive) → its text; any text with whitespace or punctuation →
/// itself, verbatim; the empty string → the empty prompt. A single bare word that names no
/// prompt is refused, since it is far more likely a mistyped name than a one-word prompt.
pub fn resolve_prompt(name_or_text: &str) -> Result<String> {
    let key = name_or_text.trim();
    if let Some((_, text)) = PROMPTS.iter().find(|(n, _)| n.eq_ignore_ascii_case(key)) {
        return Ok(text.to_string());
    }
    let bare_word = !key.is_empty() && key.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !bare_word {
        return Ok(name_or_text.to_string());
    }
    let lower = key.to_lowercase();
    let nearest = PROMPTS
        .iter()
        .map(|(n, _)| (crate::suggest::edit_distance(&lower, n), *n))
        .min()
        .map(|(_, n)| n)
        .unwrap_or("none");
    bail!(
        "unknown prompt name '{key}'; did you mean '{nearest}'? (known names: {}). \
         A literal prompt text must contain a space, e.g. \"Are these the same?\"",
        prompt_names().join(", ")
    )
}

/// The start of every [`render`]ed text, before the first sentence: what each `chunk`
/// window repeats.
pub fn prompt_part(prompt: &str) -> String {
    format!("{prompt} Sentence 1: ")
}

/// Exactly Python's `f"{prompt} Sentence 1: {s1} Sentence 2: {s2}"`; the empty prompt
/// leaves the leading space, as the reference does.
pub fn render(prompt: &str, ex: &Example) -> String {
    format!(
        "{prompt} Sentence 1: {} Sentence 2: {}",
        ex.sentence1, ex.sentence2
    )
}
