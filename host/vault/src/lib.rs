//! The vault: how a model's weights stay ciphertext everywhere except in the memory of a host
//! its owner authorised.
//!
//! - [`package`]: a model folder flattened into one stream (manifest, then files).
//! - [`format`]: that stream encrypted as chunked streaming AES-256-GCM with a versioned header
//!   that binds the model id and the key-share commitments.
//! - [`cid`]: IPFS-compatible content ids; [`store`]: local-directory and Kubo storage that
//!   verifies every fetch.
//! - [`shares`]: the content key dealt t-of-n with Feldman VSS; [`seal`]: shares sealed to a
//!   recipient's X25519 key with HPKE.
//!
//! Custodians (`div-custodian`) and the host's loader build on these pieces; nothing here talks
//! to the chain.

pub mod cid;
pub mod format;
pub mod package;
pub mod seal;
pub mod shares;
pub mod store;

pub use cid::ContentId;
pub use format::Header;
pub use seal::{SealKey, Sealed};
pub use shares::{Dealing, Share};
pub use store::Store;

/// What went wrong in the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The ciphertext header is malformed or of another version.
    #[error("ciphertext header: {0}")]
    Header(String),
    /// The ciphertext belongs to another model.
    #[error("the ciphertext is for model {found}, not {expected}")]
    WrongModel {
        /// The model asked for.
        expected: String,
        /// The model in the header.
        found: String,
    },
    /// The ciphertext has the wrong length (truncated or extended).
    #[error("ciphertext body is {found} bytes, the header implies {expected}")]
    Length {
        /// Expected body length.
        expected: u64,
        /// Actual body length.
        found: u64,
    },
    /// A chunk failed authentication (changed, reordered, from elsewhere, or the wrong key).
    #[error("chunk {index} failed authentication")]
    Chunk {
        /// The chunk's index.
        index: u64,
    },
    /// A cipher failed for another reason.
    #[error("crypto: {0}")]
    Crypto(String),
    /// The package stream is malformed.
    #[error("package: {0}")]
    Package(String),
    /// A content id is malformed.
    #[error("content id: {0}")]
    Cid(String),
    /// Content fetched under an id hashes to another id.
    #[error("content for {expected} hashes to {found}: refused")]
    ContentMismatch {
        /// The id asked for.
        expected: String,
        /// The id of what came back.
        found: String,
    },
    /// No content under this id.
    #[error("no content stored under {0}")]
    NotFound(String),
    /// The storage backend failed.
    #[error("store: {0}")]
    Store(String),
    /// A key share is malformed or invalid.
    #[error("key share: {0}")]
    Share(String),
    /// Sealing or opening failed.
    #[error("seal: {0}")]
    Seal(String),
}
