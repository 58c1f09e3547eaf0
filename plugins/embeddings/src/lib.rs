//! Sentence embeddings for BERT-style encoders such as all-MiniLM-L6-v2.
//!
//! 1. `initialize` (once per model, snapshotted by the host) parses the model's own
//!    `tokenizer.json` with the `tokenizers` library, so requests start with it ready.
//! 2. `embed` tokenizes each text (truncated to the model's `max-seq-len`), pads the batch,
//!    builds `input_ids`/`attention_mask`/`token_type_ids` as i64 tensors, runs the graph the host
//!    registered under the model's name, mean-pools `last_hidden_state` over the attention mask
//!    and L2-normalises: what sentence-transformers does for this model.
//!
//! Token-array inputs are taken as the model's input ids verbatim (special tokens included).
//! With `"tokenizer": "host"` in the model's extra settings, texts are tokenized by the host's
//! native tokenizer on the same `tokenizer.json` (`host.tokenize`) instead of inside the plugin.

use std::sync::OnceLock;

use div_plugin::nn::{Graph, Tensor};
use div_plugin::{Embeddings, Input, Level, Plugin, PluginError};
use tokenizers::{Tokenizer, TruncationParams};

static TOKENIZER: OnceLock<Result<Tokenizer, String>> = OnceLock::new();

fn tokenizer() -> Result<&'static Tokenizer, PluginError> {
    TOKENIZER
        .get_or_init(|| {
            let bytes =
                div_plugin::asset("tokenizer.json").ok_or("the model package has no tokenizer.json")?;
            let mut t = Tokenizer::from_bytes(&bytes).map_err(|e| format!("tokenizer.json: {e}"))?;
            let max = div_plugin::model_config().max_seq_len as usize;
            t.with_padding(None);
            t.with_truncation(Some(TruncationParams { max_length: max, ..Default::default() }))
                .map_err(|e| format!("truncation: {e}"))?;
            Ok(t)
        })
        .as_ref()
        .map_err(|e| PluginError::Internal(e.clone()))
}

struct Embedder;

impl Plugin for Embedder {
    fn initialize() {
        if let Err(e) = tokenizer() {
            div_plugin::log(Level::Error, &format!("initialize: {e:?}"));
        }
    }

    fn embed(inputs: Vec<Input>) -> Result<Embeddings, PluginError> {
        if inputs.is_empty() {
            return Err(PluginError::InvalidInput("input must not be empty".into()));
        }
        let config = div_plugin::model_config();
        let max = config.max_seq_len as usize;
        let host_tokens = config.extra.replace(' ', "").contains("\"tokenizer\":\"host\"");
        let mut host_ids = if host_tokens {
            let texts: Vec<String> = inputs
                .iter()
                .filter_map(|i| if let Input::Text(t) = i { Some(t.clone()) } else { None })
                .collect();
            div_plugin::host_tokenize(&texts, config.max_seq_len).map_err(PluginError::Internal)?.into_iter()
        } else {
            Vec::new().into_iter()
        };
        let mut rows: Vec<Vec<u32>> = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let ids = match input {
                Input::Text(_) if host_tokens => host_ids
                    .next()
                    .ok_or_else(|| PluginError::Internal("host tokenizer lost an input".into()))?,
                // ids only: `encode_fast` skips the character offsets `encode` would track
                Input::Text(text) => tokenizer()?
                    .encode_fast(text, true)
                    .map_err(|e| PluginError::Internal(format!("tokenize: {e}")))?
                    .get_ids()
                    .to_vec(),
                Input::Tokens(ids) => {
                    if ids.len() > max {
                        return Err(PluginError::InvalidInput(format!(
                            "input[{i}] has {} tokens; this model takes at most {max}",
                            ids.len()
                        )));
                    }
                    ids
                }
            };
            if ids.is_empty() {
                return Err(PluginError::InvalidInput(format!("input[{i}] has no tokens")));
            }
            rows.push(ids);
        }
        let prompt_tokens: usize = rows.iter().map(Vec::len).sum();
        let graph = Graph::by_name(&config.name)?;
        let mut vectors = Vec::with_capacity(rows.len());
        // hosts bound the size of one inference; sub-batches also pad less
        for chunk in rows.chunks(CHUNK) {
            vectors.extend(embed_chunk(&graph, chunk)?);
        }
        Ok(Embeddings { vectors, prompt_tokens: prompt_tokens as u32 })
    }
}

/// Rows per inference: at 256 tokens, 32 rows stay well inside a host's per-inference bound.
const CHUNK: usize = 32;

/// One padded batch through the graph, mean-pooled and normalised.
fn embed_chunk(graph: &Graph, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, PluginError> {
    let batch = rows.len();
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    for (r, row) in rows.iter().enumerate() {
        for (c, &t) in row.iter().enumerate() {
            ids[r * seq + c] = i64::from(t);
            mask[r * seq + c] = 1;
        }
    }
    let types = vec![0i64; batch * seq];
    let dims = [batch as u32, seq as u32];
    let outputs = graph.compute(vec![
        ("input_ids".into(), Tensor::i64(&dims, &ids)),
        ("attention_mask".into(), Tensor::i64(&dims, &mask)),
        ("token_type_ids".into(), Tensor::i64(&dims, &types)),
    ])?;
    let hidden = outputs
        .iter()
        .find(|o| o.name == "last_hidden_state")
        .or_else(|| outputs.first())
        .ok_or_else(|| PluginError::Backend("the graph returned no outputs".into()))?;
    let values = hidden
        .as_f32()
        .ok_or_else(|| PluginError::Backend(format!("expected an f32 output, got {:?}", hidden.ty)))?;
    if hidden.dims.len() != 3 || hidden.dims[0] as usize != batch || hidden.dims[1] as usize != seq {
        return Err(PluginError::Backend(format!("unexpected output shape {:?}", hidden.dims)));
    }
    let dim = hidden.dims[2] as usize;
    if values.len() != batch * seq * dim {
        return Err(PluginError::Backend(format!(
            "output has {} values, expected {}",
            values.len(),
            batch * seq * dim
        )));
    }
    Ok((0..batch)
        .map(|r| pool(&values[r * seq * dim..(r + 1) * seq * dim], &mask[r * seq..(r + 1) * seq], dim))
        .collect())
}

/// Mean over the positions the mask keeps, then L2-normalised.
fn pool(hidden: &[f32], mask: &[i64], dim: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dim];
    let mut count = 0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m != 0 {
            count += 1.0;
            for (s, h) in sum.iter_mut().zip(&hidden[pos * dim..(pos + 1) * dim]) {
                *s += h;
            }
        }
    }
    let count = count.max(1e-9);
    sum.iter_mut().for_each(|s| *s /= count);
    let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|s| *s /= norm);
    sum
}

div_plugin::export!(Embedder);
div_plugin::request_arena!(8 << 20);
