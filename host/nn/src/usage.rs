//! What a backend measured of one request, where the plugin cannot touch it.
//!
//! The plugin belongs to the model's owner, who is paid by the tokens a request used: token
//! counts the plugin reports are the payee's word. So the backend counts them itself, into the
//! request's [`RequestUsage`], which the host reads after the call to charge and to answer
//! `usage`. A backend also records here when it refused an input for the caller's own fault
//! (a prompt longer than the context), so the host answers 400 naming the field instead of
//! blaming the plugin or the backend.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// An input the backend refused because of what the caller sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The request field at fault (`messages`, `prompt`, `input`).
    pub param: &'static str,
    /// What was wrong, for the caller.
    pub message: String,
}

/// One request's measured usage.
#[derive(Debug, Default)]
pub struct RequestUsage {
    prompt_tokens: AtomicU32,
    generated_tokens: AtomicU32,
    refusal: Mutex<Option<Refusal>>,
}

impl RequestUsage {
    /// Records a generation's prompt length and tokens generated so far (the latest counts).
    pub fn record(&self, prompt_tokens: u32, generated_tokens: u32) {
        self.prompt_tokens.store(prompt_tokens, Ordering::Relaxed);
        self.generated_tokens.store(generated_tokens, Ordering::Relaxed);
    }

    /// (prompt tokens, generated tokens) as measured.
    pub fn tokens(&self) -> (u32, u32) {
        (self.prompt_tokens.load(Ordering::Relaxed), self.generated_tokens.load(Ordering::Relaxed))
    }

    /// Records that the caller's input was refused.
    pub fn refuse(&self, param: &'static str, message: impl Into<String>) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Refusal { param, message: message.into() });
    }

    /// The refusal, if the backend refused the caller's input.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
