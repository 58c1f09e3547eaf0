//! Where long-running processes get their keys, and how their files are protected.
//!
//! A key on the command line is visible to every local user (`ps`, `/proc/*/cmdline`), so the
//! host and the custodians take theirs only from the environment or from a file readable by
//! its owner alone (mode 0600 or stricter; anything looser is refused, as `ssh` refuses a
//! world-readable identity). Every file and folder `div` creates is its owner's only: the
//! process starts with umask 077, so ledgers, caches, share stores and env files are 0600 in
//! 0700 folders.

use std::path::Path;

use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};

/// Files this process creates are readable and writable by its user alone.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// The key in `file` (hex, mode 0600 or stricter), else in the environment variable `env`.
pub fn load_key(file: Option<&Path>, env: &str, what: &str) -> anyhow::Result<PrivateKeySigner> {
    let text = match file {
        Some(path) => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).with_context(|| format!("reading {what} key file {}", path.display()))?;
            if meta.mode() & 0o077 != 0 {
                bail!(
                    "{what} key file {} is readable by others (mode {:o}); run `chmod 600 {}`",
                    path.display(),
                    meta.mode() & 0o777,
                    path.display()
                );
            }
            std::fs::read_to_string(path).with_context(|| format!("reading {what} key file {}", path.display()))?
        }
        None => std::env::var(env).with_context(|| {
            format!("{what} key: set {env} in the environment or pass a 0600 key file (never the key on the command line)")
        })?,
    };
    text.trim().parse().with_context(|| format!("the {what} key is not a hex private key"))
}
