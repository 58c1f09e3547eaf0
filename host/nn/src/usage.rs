//! What a backend measured of one request, where the plugin cannot touch it.
//!
//! The plugin belongs to the model's owner, who is paid by the tokens a request used: token
//! counts the plugin reports are the payee's word. So the backend counts them itself, into the
//! request's [`RequestUsage`], which the host reads after the call to charge and to answer
//! `usage`. A backend also records here when it refused an input for the caller's own fault
//! (a prompt longer than the context), so the host answers 400 naming the field instead of
//! blaming the plugin or the backend. And a backend that makes the request's thread wait for work
//! done elsewhere (text generation: the batch worker decodes every request's next token) says so
//! through [`RequestUsage::waiting`], so the host's fair share of cores does not count a sandbox
//! that is only waiting as one using a core.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// An input the backend refused because of what the caller sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The request field at fault (`messages`, `prompt`, `input`).
    pub param: &'static str,
    /// What was wrong, for the caller.
    pub message: String,
}

/// Told when a request's thread waits on work done elsewhere, and when it runs again.
pub trait Waiting: Send + Sync {
    /// The thread starts waiting (it uses no core until [`Waiting::end`]).
    fn begin(&self);
    /// The thread runs again.
    fn end(&self);
}

/// One request's measured usage.
#[derive(Default)]
pub struct RequestUsage {
    prompt_tokens: AtomicU32,
    generated_tokens: AtomicU32,
    refusal: Mutex<Option<Refusal>>,
    waiting: OnceLock<Box<dyn Waiting>>,
}

impl std::fmt::Debug for RequestUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestUsage")
            .field("tokens", &self.tokens())
            .field("refusal", &self.refusal())
            .finish_non_exhaustive()
    }
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

    /// Whom to tell when this request's thread waits (set once, by the host, per request).
    pub fn set_waiting(&self, w: Box<dyn Waiting>) {
        let _ = self.waiting.set(w);
    }

    /// Runs `f`, a wait on work done elsewhere, telling the host the thread uses no core meanwhile.
    /// The end is told even if `f` unwinds, so a sandbox is never left counted as waiting.
    pub fn waiting<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Ends<'a>(&'a dyn Waiting);
        impl Drop for Ends<'_> {
            fn drop(&mut self) {
                self.0.end();
            }
        }
        let Some(w) = self.waiting.get() else { return f() };
        w.begin();
        let _ends = Ends(w.as_ref());
        f()
    }
}
