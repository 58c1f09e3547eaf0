//! The plaintext a ciphertext carries: a model package flattened into one byte stream.
//!
//! ```text
//! magic "DIVPKG1\n" | manifest_len u32 (big-endian) | manifest.json | files in manifest order
//! ```
//!
//! The manifest lists every file with its size and SHA-256, so the stream needs no other framing;
//! the host checks each hash again after decryption (`div_models::ModelFiles::verify`). Packing
//! reads the files from disk one after another (the encryptor streams them), so publishing a
//! model larger than memory works.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::VaultError;

/// The package stream's magic bytes.
pub const MAGIC: &[u8; 8] = b"DIVPKG1\n";
/// The largest manifest accepted (it lists files, it does not hold them).
pub const MAX_MANIFEST: usize = 1 << 20;

/// One file of a package as the stream lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedFile {
    /// File name.
    pub name: String,
    /// Byte length.
    pub size: u64,
}

/// A package about to be streamed: its manifest bytes and the files it lists.
pub struct Packer {
    manifest: Vec<u8>,
    files: Vec<(PackedFile, std::path::PathBuf)>,
}

#[derive(serde::Deserialize)]
struct ManifestFiles {
    files: Vec<ManifestFile>,
}

#[derive(serde::Deserialize)]
struct ManifestFile {
    name: String,
    size: u64,
    sha256: String,
}

fn listed_files(manifest: &[u8]) -> Result<Vec<ManifestFile>, VaultError> {
    let m: ManifestFiles =
        serde_json::from_slice(manifest).map_err(|e| VaultError::Package(format!("manifest.json: {e}")))?;
    Ok(m.files)
}

impl Packer {
    /// Prepares `dir` (its `manifest.json` and every file it lists), checking each file's size
    /// and SHA-256 against the manifest before anything is encrypted.
    pub fn from_dir(dir: &Path) -> Result<Self, VaultError> {
        let manifest = std::fs::read(dir.join("manifest.json"))?;
        if manifest.len() > MAX_MANIFEST {
            return Err(VaultError::Package("manifest.json is larger than 1 MiB".into()));
        }
        let mut files = Vec::new();
        for f in listed_files(&manifest)? {
            if f.name.is_empty() || f.name.contains(['/', '\\', '\0']) || f.name == ".." || f.name == "." {
                return Err(VaultError::Package(format!("file name {:?} is not a plain name", f.name)));
            }
            let path = dir.join(&f.name);
            let mut hasher = Sha256::new();
            let size = std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
            let sha = hex::encode(hasher.finalize());
            if size != f.size || !sha.eq_ignore_ascii_case(&f.sha256) {
                return Err(VaultError::Package(format!(
                    "{} is {size} bytes with SHA-256 {sha}; the manifest says {} bytes, {}",
                    f.name, f.size, f.sha256
                )));
            }
            files.push((PackedFile { name: f.name, size }, path));
        }
        Ok(Self { manifest, files })
    }

    /// The stream's total length.
    pub fn len(&self) -> u64 {
        (MAGIC.len() + 4 + self.manifest.len()) as u64 + self.files.iter().map(|(f, _)| f.size).sum::<u64>()
    }

    /// Whether the stream is empty (never: it always has a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The manifest bytes.
    pub fn manifest(&self) -> &[u8] {
        &self.manifest
    }

    /// A reader over the whole stream, opening the files one at a time.
    pub fn reader(&self) -> Result<impl Read + '_, VaultError> {
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&(self.manifest.len() as u32).to_be_bytes());
        head.extend_from_slice(&self.manifest);
        let mut reader: Box<dyn Read> = Box::new(std::io::Cursor::new(head));
        for (f, path) in &self.files {
            // `take` pins each file to the size that was checked
            let file = std::fs::File::open(path)?.take(f.size);
            reader = Box::new(reader.chain(file));
        }
        Ok(reader)
    }
}

/// A decrypted stream's manifest bytes and its files, borrowed from the plaintext.
pub type Unpacked<'a> = (&'a [u8], Vec<(PackedFile, &'a [u8])>);

/// Splits a decrypted stream into its manifest and its files (borrowed from `plain`).
pub fn unpack(plain: &[u8]) -> Result<Unpacked<'_>, VaultError> {
    let bad = |what: &str| VaultError::Package(what.to_string());
    if plain.len() < MAGIC.len() + 4 || &plain[..MAGIC.len()] != MAGIC {
        return Err(bad("not a DIV package stream"));
    }
    let at = MAGIC.len();
    let mlen = u32::from_be_bytes([plain[at], plain[at + 1], plain[at + 2], plain[at + 3]]) as usize;
    if mlen > MAX_MANIFEST || plain.len() < at + 4 + mlen {
        return Err(bad("manifest length out of range"));
    }
    let manifest = &plain[at + 4..at + 4 + mlen];
    let mut rest = &plain[at + 4 + mlen..];
    let mut files = Vec::new();
    for f in listed_files(manifest)? {
        let size = usize::try_from(f.size).map_err(|_| bad("file too large"))?;
        if rest.len() < size {
            return Err(VaultError::Package(format!("{} is cut short", f.name)));
        }
        let (bytes, tail) = rest.split_at(size);
        files.push((PackedFile { name: f.name, size: f.size }, bytes));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(VaultError::Package(format!("{} bytes after the last file", rest.len())));
    }
    Ok((manifest, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pkg(dir: &Path, files: &[(&str, &[u8])]) {
        let list: Vec<_> = files
            .iter()
            .map(|(n, b)| serde_json::json!({"name": n, "size": b.len(), "sha256": hex::encode(Sha256::digest(b))}))
            .collect();
        let manifest =
            serde_json::json!({"name": "m", "task": "embeddings", "encoding": "onnx", "files": list});
        let _ = std::fs::write(dir.join("manifest.json"), manifest.to_string());
        for (n, b) in files {
            let _ = std::fs::write(dir.join(n), b);
        }
    }

    #[test]
    fn packs_and_unpacks_every_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        write_pkg(dir.path(), &[("model.onnx", b"weights"), ("tokenizer.json", b"{}"), ("empty", b"")]);
        let Ok(p) = Packer::from_dir(dir.path()) else { unreachable!() };
        let mut stream = Vec::new();
        let _ = p.reader().map(|mut r| r.read_to_end(&mut stream));
        assert_eq!(stream.len() as u64, p.len());
        let Ok((manifest, files)) = unpack(&stream) else { unreachable!() };
        assert_eq!(manifest, p.manifest());
        let got: Vec<(&str, &[u8])> = files.iter().map(|(f, b)| (f.name.as_str(), *b)).collect();
        assert_eq!(got, vec![("model.onnx", &b"weights"[..]), ("tokenizer.json", b"{}"), ("empty", b"")]);
        assert!(unpack(&stream[..stream.len() - 1]).is_err());
        let mut longer = stream.clone();
        longer.push(0);
        assert!(unpack(&longer).is_err());
    }

    #[test]
    fn a_file_that_differs_from_its_manifest_is_refused_before_encrypting() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        write_pkg(dir.path(), &[("model.onnx", b"weights")]);
        let _ = std::fs::write(dir.path().join("model.onnx"), b"weightz");
        let e = Packer::from_dir(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("model.onnx") && e.contains("manifest says"), "{e}");
    }
}
