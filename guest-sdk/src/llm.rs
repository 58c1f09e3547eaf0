//! Text generation over the host's `ggml` backend: a conversation or a prompt in, text out one
//! piece per step.
//!
//! The host's backend runs llama.cpp; each [`Generation::next`] is one `wasi:nn` `compute` and
//! returns the next piece of text (whole UTF-8 characters), so the plugin can check stop
//! sequences and post-process before it [`crate::emit`]s anything to the caller.
//!
//! [`Generation::chat`] hands the host the messages: it renders them with the model's own chat
//! template (the GGUF's, or the manifest's `extra.chat_template`), and only the template's
//! markers become control tokens, so a caller cannot forge a turn. [`Generation::start`] takes a
//! plain prompt (completion), tokenized as text.
//!
//! ```ignore
//! let mut g = Generation::start(&model_config().name, &prompt, &Options { max_tokens: 64, ..Default::default() })?;
//! while let Some(piece) = g.next()? {
//!     if div_plugin::emit(&piece).is_err() { break; } // the caller went away
//! }
//! let (prompt_tokens, completion_tokens) = g.usage();
//! ```

use crate::nn::{Context, Graph, NnError, Tensor, TensorType};

/// Sampling settings, as the backend takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 is greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f32,
    /// The sampler's seed.
    pub seed: u32,
    /// A llama.cpp grammar (GBNF) the output must follow; the host makes one from a request's
    /// `response_format` and passes it in the plugin's body as `grammar`.
    pub grammar: Option<String>,
}

impl Default for Options {
    /// 256 tokens, greedy, no grammar.
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0, grammar: None }
    }
}

impl Options {
    fn to_json(&self) -> String {
        let grammar = match &self.grammar {
            Some(g) => format!(r#","grammar":"{}""#, escape_json(g)),
            None => String::new(),
        };
        format!(
            r#"{{"max_tokens":{},"temperature":{},"top_p":{},"seed":{}{grammar}}}"#,
            self.max_tokens,
            finite(self.temperature),
            finite(self.top_p),
            self.seed
        )
    }
}

/// `s` as the inside of a JSON string.
fn escape_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn finite(v: f32) -> f32 {
    if v.is_finite() { v } else { 0.0 }
}

/// One generation in progress.
pub struct Generation {
    ctx: Context,
    first: Option<Vec<(String, Tensor)>>,
    done: bool,
    usage: (u32, u32),
}

impl Generation {
    /// Starts completing the plain-text `prompt` on the graph `name`.
    pub fn start(name: &str, prompt: &str, options: &Options) -> Result<Self, NnError> {
        Self::with_input(name, "prompt", prompt.as_bytes().to_vec(), options)
    }

    /// Starts answering a conversation on the graph `name`: `messages_json` is a JSON list of
    /// `{"role", "content"}`, rendered by the host with the model's own chat template.
    pub fn chat(name: &str, messages_json: &str, options: &Options) -> Result<Self, NnError> {
        Self::with_input(name, "messages", messages_json.as_bytes().to_vec(), options)
    }

    fn with_input(name: &str, input: &str, bytes: Vec<u8>, options: &Options) -> Result<Self, NnError> {
        let ctx = Graph::by_name(name)?.context()?;
        let o = options.to_json().into_bytes();
        let first = vec![
            (input.to_string(), Tensor::raw(&[bytes.len() as u32], TensorType::U8, bytes)),
            ("options".to_string(), Tensor::raw(&[o.len() as u32], TensorType::U8, o)),
        ];
        Ok(Self { ctx, first: Some(first), done: false, usage: (0, 0) })
    }

    /// The next piece of text, or `None` once the model has finished.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<String>, NnError> {
        if self.done {
            return Ok(None);
        }
        let outputs = self.ctx.compute(self.first.take().unwrap_or_default())?;
        let mut text = String::new();
        for o in outputs {
            match o.name.as_str() {
                "token" => text = String::from_utf8_lossy(&o.data).into_owned(),
                "done" => self.done = o.data.first() == Some(&1),
                "usage" if o.data.len() >= 8 => {
                    let p = i32::from_le_bytes([o.data[0], o.data[1], o.data[2], o.data[3]]);
                    let g = i32::from_le_bytes([o.data[4], o.data[5], o.data[6], o.data[7]]);
                    self.usage = (p.max(0) as u32, g.max(0) as u32);
                }
                _ => {}
            }
        }
        Ok(Some(text))
    }

    /// Whether the model has finished (end of text, `max_tokens`, or a full context).
    pub fn finished(&self) -> bool {
        self.done
    }

    /// (prompt tokens, generated tokens) so far.
    pub fn usage(&self) -> (u32, u32) {
        self.usage
    }
}
