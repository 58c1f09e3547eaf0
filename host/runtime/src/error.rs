//! What can go wrong loading a plugin or running it for one request. Each case of
//! [`InvokeError`] is one thing a caller can be told (the API maps each to a status and a code):
//! the plugin refused the input, trapped, ran out of time or memory, or the host failed.

use std::time::Duration;

use crate::bindings::PluginError;

/// Loading or pre-initialising a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a component of our world, or do not compile.
    #[error("compiling the plugin: {0}")]
    Compile(String),
    /// The plugin's `initialize` failed or the snapshot could not be taken.
    #[error("pre-initialising the plugin (wizer): {0}")]
    Snapshot(String),
    /// The plugin does not fit the `div:plugin` world (missing exports, wrong imports).
    #[error("the plugin does not fit div:plugin/plugin-world: {0}")]
    World(String),
    /// The engine could not be set up.
    #[error("setting up the engine: {0}")]
    Engine(String),
    /// The snapshot cache could not be read or written.
    #[error("snapshot cache {path}: {source}")]
    Cache {
        /// The cache file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// Running a plugin for one request failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The plugin answered with an error of its own (bad input, unsupported, backend failure).
    #[error("plugin error: {0:?}")]
    Plugin(PluginError),
    /// The plugin ran past its deadline and was stopped.
    #[error("the plugin ran past its {0:?} deadline and was stopped")]
    Timeout(Duration),
    /// The plugin asked for more memory than its limit.
    #[error("the plugin exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The limit in bytes.
        limit: usize,
    },
    /// The plugin trapped (a panic, an abort, an out-of-bounds access, …).
    #[error("the plugin trapped: {0}")]
    Trap(String),
    /// No sandbox could be created (e.g. the instance pool is full).
    #[error("no sandbox available: {0}")]
    Instantiate(String),
}

/// `s` cut to at most `max` bytes (on a character boundary), saying how much was cut: what a
/// plugin says goes into answers and logs, and a plugin can say a lot.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_cuts_on_a_character_boundary_and_says_so() {
        assert_eq!(super::clip("short", 10), "short");
        assert_eq!(super::clip("héllo world", 2), "h… (11 more bytes)");
    }
}
