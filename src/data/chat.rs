//! Chat templates: the Jinja template a tokenizer ships (`tokenizer_config.json`'s
//! `chat_template`, or `chat_template.jinja` beside it) rendered as transformers'
//! `apply_chat_template` renders it: `trim_blocks` and `lstrip_blocks`, loop controls,
//! `raise_exception`, Python's string methods, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...) as variables. The rendered text is then tokenised without
//! adding special tokens, as `apply_chat_template(tokenize=True)` does.
use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A conversation from its JSON text (a list of `{"role", "content"}` objects).
pub fn parse_messages(json: &str) -> Result<Vec<Message>> {
    serde_json::from_str(json)
        .map_err(|e| anyhow!("not a list of {{\"role\", \"content\"}} messages ({e}): {json}"))
}

/// A special token as `tokenizer_config.json` names it: a string, or `{"content": ...}`.
pub fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A tokenizer's chat template and the special tokens it may name.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    specials: BTreeMap<String, String>,
    from: String,
}

const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    /// The template of the tokenizer in `dir`, if it has one: `chat_template.jinja`
    /// (transformers 5 saves it there), else `tokenizer_config.json`'s `chat_template` (a
    /// string, or a list of `{"name", "template"}` of which `default` is used).
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let mut specials = BTreeMap::new();
        for k in SPECIAL_KEYS {
            if let Some(v) = token_text(cfg.get(k)) {
                specials.insert(k.to_string(), v);
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let (source, from) = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?;
            (text, jinja.display().to_string())
        } else {
            let from = format!("{} (key `chat_template`)", cfg_path.display());
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => (s.clone(), from),
                Some(serde_json::Value::Array(named)) => {
                    let default = named
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .ok_or_else(|| anyhow!("{from}: no template named `default`"))?;
                    (default.to_string(), from)
                }
                Some(other) => bail!("{from}: expected a string, got {other}"),
            }
        };
        let t = ChatTemplate {
            source,
            specials,
            from,
        };
        // A template that does not parse is named now, not at the first row.
        t.environment()?;
        Ok(Some(t))
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("{}: the chat template does not parse: {e:#}", self.from))?;
        Ok(env)
    }

    /// The conversation as the template writes it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let template = env
            .get_template("chat")
            .map_err(|e| anyhow!("{}: {e:#}", self.from))?;
        let mut ctx: BTreeMap<String, minijinja::Value> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            minijinja::Value::from_serialize(messages),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            minijinja::Value::from(add_generation_prompt),
        );
        template
            .render(ctx)
            .map_err(|e| anyhow!("{}: rendering a conversation failed: {e:#}", self.from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
            specials: [("bos_token".to_string(), "<s>".to_string())].into(),
            from: "test".into(),
        }
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_with_trimmed_blocks_python_methods_and_special_tokens() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}\n  [{{ m['role'] | upper }}] {{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
        );
        let m = msgs(&[("user", " hi "), ("assistant", "hello")]);
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<s>  [USER] hi\n  [ASSISTANT] hello\n"
        );
        assert!(t.render(&m, true).unwrap().ends_with("[ASSISTANT]"));
        let strict = template("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}");
        let e = format!("{:#}", strict.render(&m, false).unwrap_err());
        assert!(e.contains("system first"), "{e}");
        assert!(parse_messages(r#"[{"role": "user"}]"#).is_err());
    }
}
