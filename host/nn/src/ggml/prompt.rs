//! Prompts to tokens: a conversation rendered with the model's chat template, where only the
//! template's own text may become control tokens, and plain completion prompts.
//!
//! llama.cpp's own tokenizer, asked to parse special tokens, would turn any `<|im_end|>` a user
//! typed into a control token and let them forge a turn. So the rendered prompt is cut into
//! fragments as llama.cpp cuts it (control-token texts, longest first), but only inside the
//! template's pieces; message text stays text. Adjacent text fragments are joined again before
//! tokenizing, so an honest prompt gets exactly the tokens llama.cpp gives the whole text.

use llama_cpp_2::token::LlamaToken;

use super::GgmlGraph;
use crate::NnError;
use crate::template::{ChatMessage, Segment};

/// A piece of a prompt on its way to tokens.
enum Fragment {
    /// Text, tokenized as text.
    Raw(Vec<u8>),
    /// A control token the template wrote.
    Special(LlamaToken),
}

impl GgmlGraph {
    /// Cuts template text at the control tokens it names (longest first, as llama.cpp does).
    fn partition(&self, text: &[u8], out: &mut Vec<Fragment>) {
        let mut frags = vec![Fragment::Raw(text.to_vec())];
        for (special, token) in &self.0.specials {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Raw(raw) = f else {
                    next.push(f);
                    continue;
                };
                let mut rest: &[u8] = &raw;
                while let Some(i) = find(rest, special) {
                    if i > 0 {
                        next.push(Fragment::Raw(rest[..i].to_vec()));
                    }
                    next.push(Fragment::Special(*token));
                    rest = &rest[i + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Raw(rest.to_vec()));
                }
            }
            frags = next;
        }
        out.extend(frags);
    }

    /// The prompt tokens of a conversation: rendered with the model's chat template, template
    /// text tokenized with its special tokens, message text as plain text.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<LlamaToken>, NnError> {
        let template = self.0.template.as_ref().ok_or_else(|| {
            NnError::InvalidInput(
                "this model has no chat template (the GGUF has none and the manifest sets no \
                 `extra.chat_template`): use /v1/completions"
                    .into(),
            )
        })?;
        let segments = template.render(messages, true).map_err(NnError::InvalidInput)?;
        // the fragments llama.cpp would make of the whole rendered text, except that control
        // tokens are only looked for in the template's own text; adjacent text (template and
        // message) is joined again, so the tokens are exactly those of the whole prompt
        let mut frags: Vec<Fragment> = Vec::new();
        for seg in &segments {
            match seg {
                Segment::Template(t) => self.partition(t.as_bytes(), &mut frags),
                Segment::Content(c) => frags.push(Fragment::Raw(c.as_bytes().to_vec())),
            }
        }
        let mut merged: Vec<Fragment> = Vec::with_capacity(frags.len());
        for f in frags {
            match (merged.last_mut(), f) {
                (Some(Fragment::Raw(prev)), Fragment::Raw(more)) => prev.extend_from_slice(&more),
                (_, f) => merged.push(f),
            }
        }
        let vocab = self.0.model.vocab();
        let bos = vocab.bos();
        let mut tokens = Vec::new();
        // BOS as the model wants it, unless the template wrote it itself
        if vocab.should_add_bos() && !matches!(merged.first(), Some(Fragment::Special(t)) if *t == bos) {
            tokens.push(bos);
        }
        for f in &merged {
            match f {
                Fragment::Raw(text) => vocab.tokenize_into(text, &mut tokens, false, false),
                Fragment::Special(t) => tokens.push(*t),
            }
        }
        Ok(tokens)
    }

    /// The prompt tokens of a completion: plain text (no control tokens), after BOS.
    pub fn prompt_tokens(&self, prompt: &[u8]) -> Vec<LlamaToken> {
        self.0.model.vocab().tokenize(prompt, true, false)
    }
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}
