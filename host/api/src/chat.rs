//! `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's text generation, streamed or
//! not, through the model owner's plugin.
//!
//! The host checks the request (model, messages or prompt, `max_tokens` against the context,
//! sampling ranges, `stop`, `n = 1`) and hands the plugin a normalised body; the plugin applies
//! the chat template, generates token by token through `wasi:nn` and emits text as it goes
//! (`div:plugin/streaming.emit`). With `stream: true` every emitted piece becomes a
//! `chat.completion.chunk` (or `text_completion`) server-sent event at once, then the final chunk
//! with `finish_reason` and the host's receipt, a usage chunk when `stream_options.include_usage`
//! asks, and `data: [DONE]`. A plugin that fails mid-stream ends the stream with an error event.
//!
//! The generation runs in a task of its own, so it ends (and is charged) the same way whether
//! the caller stays or leaves: when the caller goes, the next `emit` tells the plugin, which stops
//! within one token, and only the tokens generated are charged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

/// Which OpenAI route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`: messages in, a message out.
    Chat,
    /// `/v1/completions`: a prompt in, text out.
    Completion,
}

impl Kind {
    /// The route, as the plugin receives it.
    pub fn route(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request as OpenAI clients send it (fields this host does not act on are ignored, as
/// OpenAI's own API ignores what a model does not use).
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    /// The model's name.
    pub model: String,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Value>,
    /// Server-sent events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    response_format: Option<Value>,
}

impl GenerateRequest {
    /// Whether the caller asked for a usage chunk at the end of the stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// Checks the request and builds the plugin's body. `context` is the model's context length;
    /// `default_max` the owner's default for `max_tokens`.
    pub fn plugin_body(&self, kind: Kind, context: u32, default_max: u32) -> Result<Value, ApiError> {
        let mut body = serde_json::Map::new();
        match (kind, &self.messages, &self.prompt) {
            (Kind::Chat, Some(messages), _) => {
                if messages.is_empty() {
                    return Err(ApiError::invalid("messages", "invalid_messages", "messages is empty"));
                }
                let mut out = Vec::with_capacity(messages.len());
                for (i, m) in messages.iter().enumerate() {
                    out.push(message(i, m)?);
                }
                body.insert("messages".into(), Value::Array(out));
            }
            (Kind::Chat, None, _) => {
                return Err(ApiError::invalid("messages", "invalid_messages", "messages is required"));
            }
            (Kind::Completion, _, Some(p)) => {
                let text = match p {
                    Value::String(s) => s.clone(),
                    Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                        a[0].as_str().unwrap_or_default().to_string()
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            "prompt",
                            "invalid_prompt",
                            "prompt must be a string (one prompt per request)",
                        ));
                    }
                };
                if text.is_empty() {
                    return Err(ApiError::invalid("prompt", "invalid_prompt", "prompt is empty"));
                }
                body.insert("prompt".into(), Value::String(text));
            }
            (Kind::Completion, _, None) => {
                return Err(ApiError::invalid("prompt", "invalid_prompt", "prompt is required"));
            }
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                "unsupported_n",
                "this host generates one choice per request (n = 1)",
            ));
        }
        let limit = context.saturating_sub(1).max(1);
        let max = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max.min(limit),
            Some(m) if m >= 1 && m <= i64::from(limit) => m as u32,
            Some(m) => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    "invalid_max_tokens",
                    format!("max_tokens must be 1 to {limit} (this model's context); got {m}"),
                ));
            }
        };
        body.insert("max_tokens".into(), max.into());
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    "invalid_temperature",
                    "temperature must be 0 to 2",
                ));
            }
            body.insert("temperature".into(), t.into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    "invalid_top_p",
                    "top_p must be above 0 and at most 1",
                ));
            }
            body.insert("top_p".into(), p.into());
        }
        if let Some(seed) = self.seed {
            let seed = u32::try_from(seed).map_err(|_| {
                ApiError::invalid("seed", "invalid_seed", format!("seed must be 0 to {}", u32::MAX))
            })?;
            body.insert("seed".into(), seed.into());
        }
        let stops: Vec<String> = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "stop",
                    "invalid_stop",
                    "stop must be a string or a list of strings",
                ));
            }
        };
        if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::invalid(
                "stop",
                "invalid_stop",
                "at most 4 stop sequences, each 1 to 256 bytes",
            ));
        }
        body.insert("stop".into(), stops.into());
        if let Some(rf) = &self.response_format
            && let Some(grammar) = crate::grammar::from_response_format(rf)?
        {
            body.insert("grammar".into(), grammar.into());
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid(
                "stream_options",
                "invalid_stream_options",
                "stream_options needs stream: true",
            ));
        }
        Ok(Value::Object(body))
    }
}

/// Bytes of prompt text per token of context above which a prompt is refused before any work:
/// it could never fit (the backend refuses what is over, counted exactly, as well).
pub const BYTES_PER_TOKEN_BOUND: usize = 64;

impl GenerateRequest {
    /// Refuses a prompt far larger than the model's context before any work is done for it.
    pub fn check_size(&self, kind: Kind, context: u32) -> Result<(), ApiError> {
        let limit = (context as usize).saturating_mul(BYTES_PER_TOKEN_BOUND).max(4096);
        let (param, size) = match kind {
            Kind::Chat => {
                ("messages", self.messages.iter().flatten().map(|m| m.to_string().len()).sum::<usize>())
            }
            Kind::Completion => ("prompt", self.prompt.as_ref().map_or(0, |p| p.to_string().len())),
        };
        if size > limit {
            return Err(ApiError::invalid(
                param,
                "input_too_long",
                format!(
                    "{param} is {size} bytes; this model's context is {context} tokens, so more than {limit} bytes can never fit"
                ),
            ));
        }
        Ok(())
    }
}

/// One chat message: a role and text (a string, or OpenAI's list of text parts).
fn message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let bad =
        |what: String| ApiError::invalid("messages", "invalid_messages", format!("messages[{i}]: {what}"));
    let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("no role".into()))?;
    if !matches!(role, "system" | "developer" | "user" | "assistant") {
        return Err(bad(format!("role {role:?} is not one of system, developer, user, assistant")));
    }
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(bad("only text content parts are supported".into())),
                }
            }
            text
        }
        _ => return Err(bad("content must be text".into())),
    };
    Ok(json!({"role": role, "content": content}))
}

/// What the plugin answers.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Outcome {
    /// All generated text (after stop sequences).
    pub text: String,
    /// `stop`, `length`, or `cancelled` (the caller went away).
    pub finish_reason: String,
    /// Token counts.
    pub usage: Usage,
}

/// Token counts, as the plugin reports them.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub struct Usage {
    /// Tokens of the prompt (template included).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

impl Usage {
    /// OpenAI's usage object.
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Shapes answers and chunks for one request.
pub struct Shaper {
    /// Which route.
    pub kind: Kind,
    /// The response id (from the request id).
    pub id: String,
    /// The model's name.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
}

impl Shaper {
    /// A shaper for request `rid` on `model`.
    pub fn new(kind: Kind, rid: &str, model: &str) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
        Self { kind, id: format!("{prefix}-{rid}"), model: model.to_string(), created }
    }

    /// The whole answer (not streamed).
    pub fn answer(&self, o: &Outcome, receipt: Option<&div_meter::Receipt>) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "logprobs": null,
            }),
            Kind::Completion => {
                json!({"index": 0, "text": o.text, "finish_reason": o.finish_reason, "logprobs": null})
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": o.usage.to_json(),
        });
        if let Some(r) = receipt {
            v["receipt"] = serde_json::to_value(r).unwrap_or(Value::Null);
        }
        v
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The first chunk of a chat stream (the assistant's role), if the route has one.
    pub fn opening(&self) -> Option<Value> {
        (self.kind == Kind::Chat).then(|| {
            self.chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            )
        })
    }

    /// A chunk carrying `text`.
    pub fn delta(&self, text: &str) -> Value {
        match self.kind {
            Kind::Chat => {
                self.chunk(json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]))
            }
            Kind::Completion => self.chunk(json!([{"index": 0, "text": text, "finish_reason": null}])),
        }
    }

    /// The chunk that ends the choice, with the receipt.
    pub fn closing(&self, o: &Outcome, receipt: Option<&div_meter::Receipt>) -> Value {
        let mut v = match self.kind {
            Kind::Chat => self.chunk(json!([{"index": 0, "delta": {}, "finish_reason": o.finish_reason}])),
            Kind::Completion => {
                self.chunk(json!([{"index": 0, "text": "", "finish_reason": o.finish_reason}]))
            }
        };
        if let Some(r) = receipt {
            v["receipt"] = serde_json::to_value(r).unwrap_or(Value::Null);
        }
        v
    }

    /// The usage chunk (`stream_options.include_usage`): no choices, the usage.
    pub fn usage(&self, o: &Outcome) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = o.usage.to_json();
        v
    }
}

/// One server-sent event.
pub fn event(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The stream's last line.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A response body fed by a channel of ready SSE events; dropping it (the caller left) closes
/// the channel, which the sender notices at its next event.
pub struct EventBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// A streamed answer over `rx`.
pub fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let mut r = (StatusCode::OK, axum::body::Body::new(EventBody(rx))).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Set while the caller of a non-streamed request is still waiting; the plugin's `emit` reads
/// it, so a caller who hangs up stops the generation within one token here too.
#[derive(Clone)]
pub struct Waiting(pub Arc<AtomicBool>);

impl Waiting {
    /// A caller who is waiting.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    /// Whether the caller still waits.
    pub fn still(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Waiting {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks the caller gone when the handler's future is dropped.
pub struct HangUp(pub Waiting);

impl Drop for HangUp {
    fn drop(&mut self) {
        self.0.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> GenerateRequest {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_chat_request_is_normalised_for_the_plugin() {
        let r = req(json!({
            "model": "m", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 16, "temperature": 0, "seed": 7, "stop": "\n", "stream": true,
            "stream_options": {"include_usage": true}, "user": "ignored",
        }));
        assert!(r.include_usage());
        let b = r.plugin_body(Kind::Chat, 2048, 256).unwrap_or_default();
        assert_eq!(b["messages"][1], json!({"role": "user", "content": "Hi"}));
        assert_eq!(
            (b["max_tokens"].clone(), b["seed"].clone(), b["stop"].clone()),
            (json!(16), json!(7), json!(["\n"]))
        );
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let cases = [
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}), "top_p"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -1}), "seed"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {}}),
                "stream_options",
            ),
        ];
        for (body, param) in cases {
            let e = req(body.clone()).plugin_body(Kind::Chat, 2048, 256).err();
            assert_eq!(
                e.map(|e| (e.status, e.param)),
                Some((StatusCode::BAD_REQUEST, Some(param))),
                "{body}"
            );
        }
        let e =
            req(json!({"model": "m", "prompt": ["a", "b"]})).plugin_body(Kind::Completion, 2048, 256).err();
        assert_eq!(e.and_then(|e| e.param), Some("prompt"));
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let s = Shaper::new(Kind::Chat, "r1", "gemma");
        let o = Outcome {
            text: "Hi".into(),
            finish_reason: "stop".into(),
            usage: Usage { prompt_tokens: 3, completion_tokens: 2 },
        };
        assert_eq!(s.delta("Hi")["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(s.closing(&o, None)["choices"][0]["finish_reason"], "stop");
        assert_eq!(s.usage(&o)["usage"]["total_tokens"], 5);
        assert_eq!(s.answer(&o, None)["choices"][0]["message"]["content"], "Hi");
        assert_eq!(&event(&json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
        let c = Shaper::new(Kind::Completion, "r2", "gemma");
        assert_eq!(c.delta("x")["object"], "text_completion");
        assert!(c.opening().is_none());
    }
}
