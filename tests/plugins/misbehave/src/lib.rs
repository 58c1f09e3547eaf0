//! What this plugin does on `embed` is chosen by its model's `extra.mode`:
//!
//! - `trap`: panics (an `unreachable` trap under `panic = "abort"`),
//! - `loop`: spins forever,
//! - `oom`: allocates until the host refuses to grow its memory,
//! - `wrong-type`: sends `input_ids` as FP32 to a graph that takes I64,
//! - `huge`: sends one input of 40 000 elements, past the host's per-inference bound,
//! - `count`: returns how many calls this instance has seen (a fresh instance per request: 1),
//! - `huge-vector`: returns one vector of 25 million floats (100 MB),
//! - `huge-error`: fails with a 100 MB error message,
//! - `tokenize-flood`: asks the host to tokenize 4 MiB of text again and again, forever,
//! - `echo` (anything else): embeds correctly through the graph (the host's control case).
//!
//! On the text-generation routes (`handle`), `stream-trap` and `stream-loop` emit three pieces
//! and then trap or spin; `stream-flood` emits 64 KiB pieces for ever and ignores the caller
//! leaving; `big-answer` answers a 20 MB body; `liar` generates a few real tokens through the
//! model and then claims 2^32 − 1 tokens of usage (the host must bill what its backend counted);
//! anything else emits "echo" and answers a well-formed generation.
//!
//! The host must answer each with a JSON error within the deadline and keep serving.

use div_plugin::nn::{Graph, Tensor};
use div_plugin::{Embeddings, Input, Plugin, PluginError};

struct Misbehave;

static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn mode() -> String {
    let extra = div_plugin::model_config().extra;
    // {"mode":"loop"} — a tiny parser keeps this plugin free of dependencies
    extra.split("\"mode\"").nth(1).and_then(|r| r.split('"').nth(1)).unwrap_or("echo").to_string()
}

impl Plugin for Misbehave {
    fn handle(request: div_plugin::Request) -> Result<div_plugin::Response, PluginError> {
        let mode = mode();
        match mode.as_str() {
            "stream-flood" => {
                let piece = "x".repeat(64 << 10);
                loop {
                    // a misbehaving plugin ignores that the caller left; the host stops it
                    let _ = div_plugin::emit(&piece);
                }
            }
            "big-answer" => {
                return Ok(div_plugin::Response { status: 200, body: "x".repeat(20 << 20) });
            }
            "liar" => {
                let name = div_plugin::model_config().name;
                let opts = div_plugin::llm::Options { max_tokens: 4, ..Default::default() };
                let mut g = div_plugin::llm::Generation::chat(
                    &name,
                    r#"[{"role":"user","content":"Say hi."}]"#,
                    &opts,
                )?;
                let mut text = String::new();
                while let Some(piece) = g.next()? {
                    text.push_str(&piece);
                }
                let _ = div_plugin::emit(&text);
                return Ok(div_plugin::Response {
                    status: 200,
                    body: format!(
                        r#"{{"text":{:?},"finish_reason":"stop","usage":{{"prompt_tokens":4294967295,"completion_tokens":4294967295}}}}"#,
                        text
                    ),
                });
            }
            _ => {}
        }
        if mode.starts_with("stream-") {
            for piece in ["one ", "two ", "three "] {
                let _ = div_plugin::emit(piece);
            }
            if mode == "stream-trap" {
                panic!("the plugin gave up mid-stream");
            }
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let _ = div_plugin::emit("echo");
        Ok(div_plugin::Response {
            status: 200,
            body: format!(
                r#"{{"text":"echo","finish_reason":"stop","usage":{{"prompt_tokens":{},"completion_tokens":1}}}}"#,
                request.body.len().min(1000)
            ),
        })
    }

    fn embed(inputs: Vec<Input>) -> Result<Embeddings, PluginError> {
        match mode().as_str() {
            "trap" => panic!("the plugin gave up"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 16 << 20];
                    block[0] = 1;
                    hoard.push(std::hint::black_box(block));
                }
            }
            "huge-vector" => Ok(Embeddings { vectors: vec![vec![0.5f32; 25_000_000]], prompt_tokens: 1 }),
            "huge-error" => Err(PluginError::Internal("e".repeat(100 << 20))),
            "tokenize-flood" => {
                let texts: Vec<String> = (0..1000).map(|_| "vault ".repeat(660)).collect();
                loop {
                    let _ = std::hint::black_box(div_plugin::host_tokenize(&texts, 64));
                }
            }
            "count" => {
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Ok(Embeddings { vectors: vec![vec![n as f32]], prompt_tokens: 1 })
            }
            "huge" => {
                let graph = Graph::by_name(&div_plugin::model_config().name)?;
                graph.compute(vec![("input_ids".into(), Tensor::i64(&[1, 40_000], &vec![1; 40_000]))])?;
                Err(PluginError::Internal("the backend accepted an unbounded input".into()))
            }
            "wrong-type" => {
                let graph = Graph::by_name(&div_plugin::model_config().name)?;
                graph.compute(vec![("input_ids".into(), Tensor::f32(&[1, 2], &[101.0, 102.0]))])?;
                Err(PluginError::Internal("the backend accepted a wrong tensor type".into()))
            }
            _ => {
                let graph = Graph::by_name(&div_plugin::model_config().name)?;
                let mut vectors = Vec::new();
                let mut tokens = 0;
                for input in inputs {
                    let ids: Vec<i64> = match input {
                        Input::Tokens(t) => t.into_iter().map(i64::from).collect(),
                        Input::Text(s) => s.bytes().map(i64::from).collect(),
                    };
                    tokens += ids.len() as u32;
                    let out = graph
                        .compute(vec![("input_ids".into(), Tensor::i64(&[1, ids.len() as u32], &ids))])?;
                    let v = out
                        .first()
                        .and_then(|o| o.as_f32())
                        .ok_or_else(|| PluginError::Backend("no f32 output".into()))?;
                    vectors.push(v);
                }
                Ok(Embeddings { vectors, prompt_tokens: tokens })
            }
        }
    }
}

div_plugin::export!(Misbehave);
