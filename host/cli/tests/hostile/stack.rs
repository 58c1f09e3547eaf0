//! The stack most attacks share: anvil with the contracts, three custodians, and one metering
//! host serving, besides the honest `tiny-paid`, models whose plugins misbehave on purpose
//! (published by the operator's allowed owner, so the host serves them).

use std::sync::Arc;

use alloy::primitives::B256;
use serde_json::json;

use crate::rig::paid::Paid;
use crate::rig::{HOST, Rig, chat_wasm, misbehave_wasm};

/// Started on first use, stopped at the end of the run.
#[derive(Default)]
pub struct Shared(tokio::sync::Mutex<Option<Arc<Stack>>>);

impl Shared {
    /// The stack, started if it is not yet.
    pub async fn get(&self) -> anyhow::Result<Arc<Stack>> {
        let mut g = self.0.lock().await;
        if let Some(s) = g.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(Stack::start().await?);
        *g = Some(s.clone());
        Ok(s)
    }

    /// Ends the stack's processes.
    pub async fn stop(&self) {
        self.0.lock().await.take();
    }
}

/// The shared stack.
pub struct Stack {
    pub paid: Paid,
    pub models: Vec<(&'static str, B256)>,
}

/// The host's flags for the shared stack.
pub const HOST_FLAGS: &[&str] = &[
    "--rate-limit",
    "20",
    "--max-keys-per-user",
    "4",
    "--stream-stall-secs",
    "3",
    "--plugin-deadline-ms",
    "3000",
];

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let rig = Rig::start("stack").await?;
        let host = [rig.chain.keys[HOST].address()];
        let tiny = |name: &str, set: serde_json::Value, tok: bool| rig.tiny_package_with(name, set, tok);
        let paid_pkg = rig.tiny_package("tiny-paid")?;
        let paid_id = rig.publish_ok(&paid_pkg, &misbehave_wasm(), &host)?;
        let mut models = vec![("tiny-paid", paid_id)];
        let hostile: Vec<(&'static str, serde_json::Value, bool)> = vec![
            // spins for ever; four sandboxes at most
            (
                "tiny-spin",
                json!({"extra": {"mode": "loop"}, "limits": {"deadline_ms": 2000, "max_instances": 4, "memory_mib": 64}}),
                false,
            ),
            (
                "tiny-hv",
                json!({"extra": {"mode": "huge-vector"}, "limits": {"memory_mib": 256, "deadline_ms": 20000}}),
                false,
            ),
            (
                "tiny-he",
                json!({"extra": {"mode": "huge-error"}, "limits": {"memory_mib": 256, "deadline_ms": 20000}}),
                false,
            ),
            (
                "tiny-tok",
                json!({"extra": {"mode": "tokenize-flood"}, "limits": {"memory_mib": 128, "deadline_ms": 2000}}),
                true,
            ),
            ("tiny-vocab", json!({"extra": {"mode": "echo"}}), true),
            (
                "tiny-flood",
                json!({"task": "chat", "extra": {"mode": "stream-flood"}, "limits": {"memory_mib": 64, "deadline_ms": 60000}}),
                false,
            ),
            (
                "tiny-big",
                json!({"task": "chat", "extra": {"mode": "big-answer"}, "limits": {"memory_mib": 128, "deadline_ms": 20000}}),
                false,
            ),
        ];
        for (name, set, tok) in hostile {
            let pkg = tiny(name, set, tok)?;
            models.push((name, rig.publish_ok(&pkg, &misbehave_wasm(), &host)?));
        }
        let prices = ["--price", "0.0005", "--price-per-1k-tokens", "0.002"];
        let chat = rig.chat_package("smol-chat", json!({}))?;
        models.push(("smol-chat", rig.publish_ok_with(&chat, &chat_wasm(), &host, &prices)?));
        let liar = rig.chat_package("smol-liar", json!({"mode": "liar"}))?;
        models.push(("smol-liar", rig.publish_ok_with(&liar, &misbehave_wasm(), &host, &prices)?));
        let paid = Paid::serve(rig, paid_id, HOST_FLAGS).await?;
        paid.wait_ready().await?;
        Ok(Self { paid, models })
    }

    /// The model id of `name`.
    pub fn id(&self, name: &str) -> B256 {
        self.models.iter().find(|(n, _)| *n == name).map(|(_, id)| *id).unwrap_or_default()
    }
}
