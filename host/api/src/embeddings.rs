//! `POST /v1/embeddings`, shaped exactly as OpenAI's: `input` is a string, an array of strings, an
//! array of token ids, or an array of token-id arrays; `encoding_format` is `float` or `base64`
//! (little-endian f32, as the OpenAI client libraries decode it); `dimensions` is accepted only
//! when it equals the model's own.

use base64::Engine as _;
use div_runtime::Input;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// Most inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    /// The model's name.
    pub model: String,
    /// What to embed.
    pub input: Value,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Output dimensions; only the model's own are supported.
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// The caller's end-user id (accepted, not used).
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// How vectors are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON numbers.
    Float,
    /// base64 of little-endian f32.
    Base64,
}

impl EmbeddingsRequest {
    /// The encoding asked for.
    pub fn encoding(&self) -> Result<Encoding, ApiError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(other) => Err(ApiError::invalid(
                "encoding_format",
                "invalid_value",
                format!("encoding_format must be 'float' or 'base64', not '{other}'"),
            )),
        }
    }

    /// Checks `dimensions` against the model's.
    pub fn check_dimensions(&self, model_dims: Option<u32>) -> Result<(), ApiError> {
        match (self.dimensions, model_dims) {
            (None, _) => Ok(()),
            (Some(d), Some(m)) if d == u64::from(m) => Ok(()),
            (Some(d), m) => Err(ApiError::invalid(
                "dimensions",
                "unsupported_parameter",
                match m {
                    Some(m) => format!("this model returns {m} dimensions and cannot shorten them; got {d}"),
                    None => "this model does not support 'dimensions'".to_string(),
                },
            )),
        }
    }

    /// The inputs as the plugin takes them.
    pub fn inputs(&self) -> Result<Vec<Input>, ApiError> {
        let bad = |m: String| ApiError::invalid("input", "invalid_input", m);
        let tokens = |v: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|t| {
                    t.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                        bad(format!("{at}: token ids must be non-negative integers below 2^32"))
                    })
                })
                .collect()
        };
        let inputs = match &self.input {
            Value::String(s) => vec![Input::Text(s.clone())],
            Value::Array(items) if items.is_empty() => {
                return Err(bad("input must not be an empty array".into()));
            }
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![Input::Tokens(tokens(items, "input")?)]
            }
            Value::Array(items) => {
                if items.len() > MAX_INPUTS {
                    return Err(bad(format!("at most {MAX_INPUTS} inputs per request; got {}", items.len())));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Value::String(s) => Ok(Input::Text(s.clone())),
                        Value::Array(t) if !t.is_empty() => {
                            Ok(Input::Tokens(tokens(t, &format!("input[{i}]"))?))
                        }
                        _ => {
                            Err(bad(format!("input[{i}] must be a string or a non-empty array of token ids")))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            _ => return Err(bad("input must be a string, an array of strings, or token ids".into())),
        };
        for (i, input) in inputs.iter().enumerate() {
            if let Input::Text(s) = input
                && s.is_empty()
            {
                return Err(bad(format!("input[{i}] is an empty string")));
            }
        }
        Ok(inputs)
    }
}

/// One vector in the response.
#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Value,
}

/// `usage` in the response.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// Tokens the model saw.
    pub prompt_tokens: u32,
    /// Same as `prompt_tokens` for embeddings.
    pub total_tokens: u32,
}

/// The response body.
#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: Usage,
    /// The host's signed receipt for a paid request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<div_meter::Receipt>,
    /// Whether the answer came from the shared result cache (`None`: the model is not cached).
    #[serde(skip)]
    pub cached: Option<bool>,
}

impl EmbeddingsResponse {
    /// Shapes the plugin's vectors.
    pub fn new(model: &str, vectors: Vec<Vec<f32>>, prompt_tokens: u32, encoding: Encoding) -> Self {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| EmbeddingData {
                object: "embedding",
                index,
                embedding: match encoding {
                    Encoding::Float => Value::Array(
                        v.into_iter()
                            .map(|x| {
                                serde_json::Number::from_f64(f64::from(x)).map_or(Value::Null, Value::Number)
                            })
                            .collect(),
                    ),
                    Encoding::Base64 => {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                },
            })
            .collect();
        Self {
            object: "list",
            data,
            model: model.to_string(),
            usage: Usage { prompt_tokens, total_tokens: prompt_tokens },
            receipt: None,
            cached: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(input: Value) -> EmbeddingsRequest {
        EmbeddingsRequest { model: "m".into(), input, encoding_format: None, dimensions: None, user: None }
    }

    #[test]
    fn every_openai_input_shape_is_understood() {
        let dbg = |v: Value| format!("{:?}", req(v).inputs().ok());
        assert_eq!(dbg(json!("hi")), format!("{:?}", Some(vec![Input::Text("hi".into())])));
        assert_eq!(req(json!(["a", "b"])).inputs().map(|v| v.len()).ok(), Some(2));
        assert_eq!(
            dbg(json!([101, 7592, 102])),
            format!("{:?}", Some(vec![Input::Tokens(vec![101, 7592, 102])]))
        );
        assert_eq!(req(json!([[101, 102], "x"])).inputs().map(|v| v.len()).ok(), Some(2));
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        for (input, needle) in [
            (json!(""), "empty string"),
            (json!([]), "empty array"),
            (json!(["ok", ""]), "input[1] is an empty string"),
            (json!([-1]), "non-negative"),
            (json!([["x"]]), "input[0]"),
            (json!({"a": 1}), "must be a string"),
            (json!([1.5]), "non-negative integers"),
        ] {
            let e = req(input.clone()).inputs().err().map(|e| e.message).unwrap_or_default();
            assert!(e.contains(needle), "{input}: {e}");
        }
        let many = Value::Array((0..=MAX_INPUTS).map(|_| json!("x")).collect());
        assert!(req(many).inputs().is_err());
    }

    #[test]
    fn dimensions_and_encoding_are_checked() {
        let mut r = req(json!("x"));
        r.dimensions = Some(384);
        assert!(r.check_dimensions(Some(384)).is_ok());
        r.dimensions = Some(128);
        assert_eq!(r.check_dimensions(Some(384)).err().map(|e| e.code), Some("unsupported_parameter"));
        r.encoding_format = Some("hex".into());
        assert_eq!(r.encoding().err().map(|e| e.param), Some(Some("encoding_format")));
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let r = EmbeddingsResponse::new("m", vec![vec![1.0, -2.5]], 3, Encoding::Base64);
        let v = serde_json::to_value(&r).unwrap_or_default();
        let b64 = v["data"][0]["embedding"].as_str().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }
}
