//! Chat and text completion for instruction-tuned GGUF models on the host's `ggml` backend.
//!
//! The host validates the OpenAI request and hands this plugin a normalised body (route
//! `/v1/chat/completions` or `/v1/completions`):
//! `{"messages": [{"role", "content"}] | "prompt": "…", "max_tokens", "temperature", "top_p",
//! "seed", "stop": ["…"]}`. The plugin
//! 1. hands the conversation to the backend, which renders it with the model's own chat
//!    template (from the GGUF, or the manifest's `extra.chat_template`) so that only the
//!    template can write control tokens; a completion prompt goes as plain text,
//! 2. generates token by token through `wasi:nn` (one `compute` per token),
//! 3. holds back any text that could still become a stop sequence, cuts at the first stop, and
//!    emits everything else to the caller at once (`streaming.emit`),
//! 4. answers `{"text", "finish_reason": "stop" | "length", "usage": {"prompt_tokens",
//!    "completion_tokens"}}` (the host bills from its backend's own count, not from this).
//!
//! A `grammar` in the body (the host's translation of `response_format`) goes to the backend,
//! which constrains sampling with it: the answer is JSON of the requested shape.
//!
//! If the caller goes away mid-stream (`emit` fails) it stops at once and reports what was
//! generated, which is what the host charges.

use div_plugin::llm::{Generation, Options};
use div_plugin::{Plugin, PluginError, Request, Response};
use serde::Deserialize;

#[derive(Deserialize, serde::Serialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
    #[serde(default)]
    stop: Vec<String>,
    /// A grammar the output must follow (the host makes it from `response_format`).
    #[serde(default)]
    grammar: Option<String>,
}

/// The end of `text` that could still grow into a stop sequence: held back until it cannot.
fn holdback(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for k in (1..s.len()).rev() {
            if k <= text.len()
                && s.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&s[..k])
            {
                keep = keep.max(k);
                break;
            }
        }
    }
    keep
}

/// Where the earliest stop sequence starts in `text`, looking only where one could end after
/// byte `sent` (what was emitted never contains one).
fn find_stop(text: &str, sent: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let mut from = sent.saturating_sub(s.len());
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|i| from + i)
        })
        .min()
}

struct Chat;

impl Chat {
    fn run(body: Body) -> Result<serde_json::Value, PluginError> {
        let name = div_plugin::model_config().name;
        let options = Options {
            max_tokens: body.max_tokens.unwrap_or(256).max(1),
            temperature: body.temperature.unwrap_or(0.0),
            top_p: body.top_p.unwrap_or(1.0),
            seed: body.seed.unwrap_or(0),
            grammar: body.grammar.clone(),
        };
        let stops: Vec<String> = body.stop.into_iter().filter(|s| !s.is_empty()).collect();
        let mut g = match (&body.messages, &body.prompt) {
            (Some(m), None) => {
                let json = serde_json::to_string(m).map_err(|e| PluginError::Internal(e.to_string()))?;
                Generation::chat(&name, &json, &options)?
            }
            (None, Some(p)) => Generation::start(&name, p, &options)?,
            _ => return Err(PluginError::InvalidInput("give either messages or prompt".into())),
        };
        let mut text = String::new(); // everything generated (after the stop cut)
        let mut sent = 0; // bytes of `text` already emitted
        let mut finish = "length";
        let mut gone = false;
        while let Some(piece) = g.next()? {
            text.push_str(&piece);
            if let Some(i) = find_stop(&text, sent, &stops) {
                text.truncate(i);
                finish = "stop";
            }
            let safe = if finish == "stop" { text.len() } else { text.len() - holdback(&text, &stops) };
            if safe > sent {
                if div_plugin::emit(&text[sent..safe]).is_err() {
                    gone = true;
                    break;
                }
                sent = safe;
            }
            if finish == "stop" {
                break;
            }
            if g.finished() {
                let (_, generated) = g.usage();
                finish = if generated < options.max_tokens { "stop" } else { "length" };
            }
        }
        if !gone && sent < text.len() {
            // the held-back tail never became a stop sequence
            let _ = div_plugin::emit(&text[sent..]);
        }
        let (prompt_tokens, completion_tokens) = g.usage();
        Ok(serde_json::json!({
            "text": text,
            "finish_reason": if gone { "cancelled" } else { finish },
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }))
    }
}

impl Plugin for Chat {
    fn handle(request: Request) -> Result<Response, PluginError> {
        match request.route.as_str() {
            "/v1/chat/completions" | "/v1/completions" => {}
            other => return Err(PluginError::Unsupported(format!("no route {other}"))),
        }
        let body: Body = serde_json::from_str(&request.body)
            .map_err(|e| PluginError::InvalidInput(format!("body: {e}")))?;
        let out = Self::run(body)?;
        Ok(Response { status: 200, body: out.to_string() })
    }
}

div_plugin::export!(Chat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_wins_and_is_found_across_pieces() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x\n\n", 0, &stops), Some(4));
        assert_eq!(find_stop("é€ abc\n", 6, &stops), None);
        assert_eq!(find_stop("é€ abc\n\n", 9, &stops), Some(9));
    }

    #[test]
    fn only_a_possible_stop_prefix_is_held_back() {
        let stops = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(holdback("hello", &stops), 0);
        assert_eq!(holdback("hello\n", &stops), 1);
        assert_eq!(holdback("hello\n\nUse", &stops), 5);
        assert_eq!(holdback("the EN", &stops), 2);
    }
}
