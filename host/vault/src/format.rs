//! The ciphertext format: a versioned header, then the package encrypted as chunked streaming
//! AES-256-GCM.
//!
//! The construction is STREAM (Hoang, Reyhanitabar, Rogaway, Vizár 2015) exactly as RustCrypto's
//! `aead::stream::StreamBE32` instantiates it: chunk `i` is sealed with the nonce
//! `prefix (7 bytes) ‖ i (u32 big-endian) ‖ last (1 byte)`, so reordering, dropping or
//! truncating chunks, and cutting the stream at a chunk boundary, all fail authentication. Every
//! chunk also authenticates the SHA-256 of the whole header as associated data, which binds the
//! model id, the chunk size, the plaintext length and the key-share commitments to every byte.
//!
//! Encryption (at publish) streams through RustCrypto `aes-gcm` with one chunk of memory.
//! Decryption (in the host) needs the speed: because every chunk's nonce is known up front the
//! chunks are opened in parallel across all cores, with `ring`'s AES-GCM (the same cipher, about
//! six times faster than `aes-gcm` 0.10 on this machine's VAES/VPCLMULQDQ cores), straight into
//! one plaintext buffer that is zeroised when dropped. Tests decrypt `aes-gcm`'s output with the
//! fast path and with `aead::stream`'s own decryptor, so the two can never drift apart.
//!
//! Header layout (all integers big-endian):
//!
//! ```text
//! magic "DIVVAULT" | version u16 | header_len u32 | model_id [32] | chunk_size u32
//! | plaintext_len u64 | nonce_prefix [7] | threshold u8 | commitments: threshold × 33 bytes
//! ```
//!
//! `header_len` lets a later version append fields that version 1 readers refuse cleanly.

use std::io::{Read, Write};

use aes_gcm::aead::stream::EncryptorBE32;
use aes_gcm::{Aes256Gcm, KeyInit};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::VaultError;

/// The format's magic bytes.
pub const MAGIC: &[u8; 8] = b"DIVVAULT";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
/// The default chunk size: large enough to amortise per-chunk work, small enough to spread over
/// cores and to bound the encryptor's memory.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// The smallest and largest chunk sizes a header may name.
pub const CHUNK_SIZE_RANGE: std::ops::RangeInclusive<u32> = 4096..=(16 << 20);
/// AES-GCM's tag length.
pub const TAG_LEN: usize = 16;
/// A compressed secp256k1 point (a Feldman commitment).
pub const COMMITMENT_LEN: usize = 33;
const FIXED_LEN: usize = 8 + 2 + 4 + 32 + 4 + 8 + 7 + 1;

/// What the header says about the ciphertext that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The model this ciphertext belongs to (`ModelVault` id); also bound into every chunk.
    pub model_id: [u8; 32],
    /// Plaintext bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// The plaintext's total length.
    pub plaintext_len: u64,
    /// STREAM's per-message nonce prefix.
    pub nonce_prefix: [u8; 7],
    /// How many key shares recover the content key.
    pub threshold: u8,
    /// Feldman commitments to the key-sharing polynomial (compressed points), `threshold` of them.
    pub commitments: Vec<[u8; COMMITMENT_LEN]>,
}

impl Header {
    /// A header for a fresh encryption, with a random nonce prefix.
    pub fn new(
        model_id: [u8; 32],
        plaintext_len: u64,
        chunk_size: u32,
        commitments: Vec<[u8; COMMITMENT_LEN]>,
    ) -> Result<Self, VaultError> {
        let mut nonce_prefix = [0u8; 7];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut nonce_prefix);
        let header = Self {
            model_id,
            chunk_size,
            plaintext_len,
            nonce_prefix,
            threshold: u8::try_from(commitments.len())
                .map_err(|_| VaultError::Header("more than 255 commitments".into()))?,
            commitments,
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<(), VaultError> {
        if !CHUNK_SIZE_RANGE.contains(&self.chunk_size) {
            return Err(VaultError::Header(format!(
                "chunk size {} outside {CHUNK_SIZE_RANGE:?}",
                self.chunk_size
            )));
        }
        if self.threshold == 0 || self.commitments.len() != self.threshold as usize {
            return Err(VaultError::Header(format!(
                "threshold {} with {} commitments",
                self.threshold,
                self.commitments.len()
            )));
        }
        if self.chunk_count() > u64::from(u32::MAX) {
            return Err(VaultError::Header("more chunks than STREAM's 32-bit counter allows".into()));
        }
        Ok(())
    }

    /// Number of chunks (at least one: an empty plaintext is one empty, final chunk).
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_len.div_ceil(u64::from(self.chunk_size)).max(1)
    }

    /// The header's encoded length.
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + self.commitments.len() * COMMITMENT_LEN
    }

    /// Total ciphertext length (header included).
    pub fn ciphertext_len(&self) -> u64 {
        self.encoded_len() as u64 + self.plaintext_len + self.chunk_count() * TAG_LEN as u64
    }

    /// The encoded header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(self.encoded_len() as u32).to_be_bytes());
        out.extend_from_slice(&self.model_id);
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.plaintext_len.to_be_bytes());
        out.extend_from_slice(&self.nonce_prefix);
        out.push(self.threshold);
        for c in &self.commitments {
            out.extend_from_slice(c);
        }
        out
    }

    /// Parses the header at the start of `bytes`; returns it and its length.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), VaultError> {
        let short = || VaultError::Header(format!("{} bytes is shorter than a header", bytes.len()));
        if bytes.len() < FIXED_LEN {
            return Err(short());
        }
        if &bytes[..8] != MAGIC {
            return Err(VaultError::Header("not a DIV ciphertext (bad magic)".into()));
        }
        let version = u16::from_be_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(VaultError::Header(format!("format version {version}; this host reads {VERSION}")));
        }
        let be32 = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let header_len = be32(10) as usize;
        let mut model_id = [0u8; 32];
        model_id.copy_from_slice(&bytes[14..46]);
        let chunk_size = be32(46);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[50..58]);
        let mut nonce_prefix = [0u8; 7];
        nonce_prefix.copy_from_slice(&bytes[58..65]);
        let threshold = bytes[65];
        let expected = FIXED_LEN + threshold as usize * COMMITMENT_LEN;
        if header_len != expected {
            return Err(VaultError::Header(format!("header length {header_len}, expected {expected}")));
        }
        if bytes.len() < header_len {
            return Err(short());
        }
        let commitments = bytes[FIXED_LEN..header_len]
            .chunks_exact(COMMITMENT_LEN)
            .map(|c| {
                let mut a = [0u8; COMMITMENT_LEN];
                a.copy_from_slice(c);
                a
            })
            .collect();
        let header = Self {
            model_id,
            chunk_size,
            plaintext_len: u64::from_be_bytes(len),
            nonce_prefix,
            threshold,
            commitments,
        };
        header.check()?;
        Ok((header, header_len))
    }

    /// STREAM-BE32's nonce for chunk `index`.
    fn nonce(&self, index: u32, last: bool) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.nonce_prefix);
        n[7..11].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        n
    }

    /// The associated data every chunk authenticates: the SHA-256 of the encoded header.
    fn associated_data(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }
}

/// Encrypts `plaintext_len` bytes from `reader` to `writer` (header first), holding one chunk in
/// memory; `progress` is told the plaintext bytes done so far. Returns the ciphertext length.
pub fn encrypt_stream(
    key: &[u8; 32],
    header: &Header,
    mut reader: impl Read,
    mut writer: impl Write,
    mut progress: impl FnMut(u64),
) -> Result<u64, VaultError> {
    header.check()?;
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| VaultError::Crypto("key length".into()))?;
    let mut stream = EncryptorBE32::from_aead(cipher, (&header.nonce_prefix).into());
    let aad = header.associated_data();
    writer.write_all(&header.encode())?;
    let chunk = header.chunk_size as usize;
    let mut buf = Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN));
    let mut done = 0u64;
    let count = header.chunk_count();
    for i in 0..count {
        let take = (header.plaintext_len - done).min(chunk as u64) as usize;
        buf.clear();
        buf.resize(take, 0);
        reader.read_exact(&mut buf)?;
        let last = i + 1 == count;
        if last {
            stream
                .encrypt_last_in_place(&aad[..], &mut *buf)
                .map_err(|_| VaultError::Crypto("encrypting the last chunk".into()))?;
            writer.write_all(&buf)?;
            done += take as u64;
            progress(done);
            break;
        }
        stream
            .encrypt_next_in_place(&aad[..], &mut *buf)
            .map_err(|_| VaultError::Crypto(format!("encrypting chunk {i}")))?;
        writer.write_all(&buf)?;
        done += take as u64;
        progress(done);
    }
    let mut extra = [0u8; 1];
    if reader.read(&mut extra)? != 0 {
        return Err(VaultError::Header(format!("the input is longer than {} bytes", header.plaintext_len)));
    }
    writer.flush()?;
    Ok(header.ciphertext_len())
}

/// Encrypts a plaintext held in memory (tests, small packages).
pub fn encrypt(key: &[u8; 32], header: &Header, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
    let mut out = Vec::with_capacity(header.ciphertext_len() as usize);
    encrypt_stream(key, header, plaintext, &mut out, |_| {})?;
    Ok(out)
}

/// Checks `ciphertext` belongs to `model_id` and decrypts it across the current rayon pool
/// (all cores by default) into a buffer zeroised on drop. Any changed, missing, extra or
/// reordered byte is an error and no plaintext is returned.
pub fn decrypt(
    key: &[u8; 32],
    model_id: &[u8; 32],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let (header, at) = Header::decode(ciphertext)?;
    if &header.model_id != model_id {
        return Err(VaultError::WrongModel {
            expected: hex::encode(model_id),
            found: hex::encode(header.model_id),
        });
    }
    decrypt_body(key, &header, &ciphertext[at..])
}

/// Decrypts a whole ciphertext in its own buffer, which becomes the plaintext: no second
/// buffer, so the host's peak memory is one copy of the model and no fresh pages are faulted in.
/// Chunks are opened in place in parallel, then slid down over the tags (one sequential
/// `memmove`). On any error the buffer is zeroised and nothing is returned.
pub fn decrypt_owned(
    key: &[u8; 32],
    model_id: &[u8; 32],
    ciphertext: Vec<u8>,
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let mut buf = Zeroizing::new(ciphertext);
    let (header, at) = Header::decode(&buf)?;
    if &header.model_id != model_id {
        return Err(VaultError::WrongModel {
            expected: hex::encode(model_id),
            found: hex::encode(header.model_id),
        });
    }
    let expected = header.ciphertext_len();
    if buf.len() as u64 != expected {
        return Err(VaultError::Length { expected: expected - at as u64, found: (buf.len() - at) as u64 });
    }
    let aes = opening_key(key)?;
    let aad = header.associated_data();
    let chunk = header.chunk_size as usize;
    let count = header.chunk_count() as usize;
    buf[at..].par_chunks_mut(chunk + TAG_LEN).enumerate().try_for_each(|(i, sealed)| {
        let (data, tag) = sealed.split_at_mut(sealed.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| VaultError::Crypto("tag length".into()))?;
        let nonce = ring::aead::Nonce::assume_unique_for_key(header.nonce(i as u32, i + 1 == count));
        aes.open_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), tag.into(), data, 0..)
            .map(|_| ())
            .map_err(|_| VaultError::Chunk { index: i as u64 })
    })?;
    for i in 0..count {
        let from = at + i * (chunk + TAG_LEN);
        let len = chunk.min(header.plaintext_len as usize - i * chunk);
        buf.copy_within(from..from + len, i * chunk);
    }
    buf.truncate(header.plaintext_len as usize);
    Ok(buf)
}

fn opening_key(key: &[u8; 32]) -> Result<ring::aead::LessSafeKey, VaultError> {
    let aes = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
        .map_err(|_| VaultError::Crypto("key length".into()))?;
    Ok(ring::aead::LessSafeKey::new(aes))
}

/// Decrypts the chunks that follow `header` into a new buffer (see [`decrypt`]).
pub fn decrypt_body(key: &[u8; 32], header: &Header, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let expected = header.ciphertext_len() - header.encoded_len() as u64;
    if body.len() as u64 != expected {
        return Err(VaultError::Length { expected, found: body.len() as u64 });
    }
    let aes = opening_key(key)?;
    let aad = header.associated_data();
    let chunk = header.chunk_size as usize;
    let count = header.chunk_count() as usize;
    let mut plain = Zeroizing::new(vec![0u8; header.plaintext_len as usize]);
    let open = |index: usize, out: &mut [u8]| -> Result<(), VaultError> {
        let start = index * (chunk + TAG_LEN);
        let sealed = &body[start..start + out.len() + TAG_LEN];
        out.copy_from_slice(&sealed[..out.len()]);
        let tag: [u8; TAG_LEN] =
            sealed[out.len()..].try_into().map_err(|_| VaultError::Crypto("tag length".into()))?;
        let nonce = ring::aead::Nonce::assume_unique_for_key(header.nonce(index as u32, index + 1 == count));
        aes.open_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), tag.into(), out, 0..)
            .map(|_| ())
            .map_err(|_| VaultError::Chunk { index: index as u64 })
    };
    if header.plaintext_len == 0 {
        open(0, &mut [])?;
    } else {
        plain.par_chunks_mut(chunk).enumerate().try_for_each(|(i, out)| open(i, out))?;
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::stream::DecryptorBE32;

    const KEY: [u8; 32] = [9u8; 32];
    const MODEL: [u8; 32] = [1u8; 32];

    fn header(len: u64, chunk: u32) -> Header {
        let Ok(h) = Header::new(MODEL, len, chunk, vec![[2u8; COMMITMENT_LEN]; 2]) else {
            unreachable!("valid header")
        };
        h
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn seal(len: usize, chunk: u32) -> (Header, Vec<u8>) {
        let h = header(len as u64, chunk);
        let ct = encrypt(&KEY, &h, &data(len)).unwrap_or_default();
        (h, ct)
    }

    #[test]
    fn round_trips_every_boundary_length() {
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17] {
            let (h, ct) = seal(len, 4096);
            assert_eq!(ct.len() as u64, h.ciphertext_len(), "len {len}");
            let plain = decrypt(&KEY, &MODEL, &ct).map(|p| p.to_vec());
            assert_eq!(plain.ok(), Some(data(len)), "len {len}");
            let owned = decrypt_owned(&KEY, &MODEL, ct).map(|p| p.to_vec());
            assert_eq!(owned.ok(), Some(data(len)), "owned, len {len}");
        }
    }

    #[test]
    fn the_fast_decryptor_and_aead_stream_read_the_same_format() {
        let (h, ct) = seal(3 * 4096 + 5, 4096);
        let body = &ct[h.encoded_len()..];
        let cipher = Aes256Gcm::new_from_slice(&KEY).unwrap_or_else(|_| unreachable!());
        let mut dec = DecryptorBE32::from_aead(cipher, (&h.nonce_prefix).into());
        let aad = h.associated_data();
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = body.chunks(4096 + TAG_LEN).collect();
        let (last, rest) = chunks.split_last().unwrap_or_else(|| unreachable!());
        for (i, c) in rest.iter().enumerate() {
            match dec.decrypt_next(aes_gcm::aead::Payload { msg: c, aad: &aad }) {
                Ok(p) => out.extend_from_slice(&p),
                Err(_) => panic!("aead::stream refused chunk {i}"),
            }
        }
        match dec.decrypt_last(aes_gcm::aead::Payload { msg: last, aad: &aad }) {
            Ok(p) => out.extend_from_slice(&p),
            Err(_) => panic!("aead::stream refused the last chunk"),
        }
        assert_eq!(out, data(3 * 4096 + 5));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let (h, ct) = seal(2 * 4096 + 100, 4096);
        for at in [0, 9, 20, h.encoded_len() - 1, h.encoded_len(), h.encoded_len() + 4096 + 3, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[at] ^= 0x01;
            assert!(decrypt(&KEY, &MODEL, &bad).is_err(), "flip at {at}");
            assert!(decrypt_owned(&KEY, &MODEL, bad).is_err(), "owned, flip at {at}");
        }
    }

    #[test]
    fn truncation_extension_and_reordering_are_refused() {
        let (h, ct) = seal(3 * 4096, 4096);
        let at = h.encoded_len();
        let sealed = 4096 + TAG_LEN;
        // cut at a chunk boundary: the length check and the "last" flag both catch it
        let cut = &ct[..at + 2 * sealed];
        assert!(matches!(decrypt(&KEY, &MODEL, cut), Err(VaultError::Length { .. })));
        // even a header rewritten to the shorter length cannot pass: the header is authenticated
        let mut short_header = header(2 * 4096, 4096);
        short_header.nonce_prefix = h.nonce_prefix;
        let mut forged = short_header.encode();
        forged.extend_from_slice(&ct[at..at + 2 * sealed]);
        assert!(matches!(decrypt(&KEY, &MODEL, &forged), Err(VaultError::Chunk { index: 0 })));
        let mut longer = ct.clone();
        longer.push(0);
        assert!(decrypt(&KEY, &MODEL, &longer).is_err());
        let mut swapped = ct.clone();
        swapped[at..at + sealed].copy_from_slice(&ct[at + sealed..at + 2 * sealed]);
        swapped[at + sealed..at + 2 * sealed].copy_from_slice(&ct[at..at + sealed]);
        assert!(matches!(decrypt(&KEY, &MODEL, &swapped), Err(VaultError::Chunk { .. })));
        assert!(matches!(decrypt_owned(&KEY, &MODEL, swapped), Err(VaultError::Chunk { .. })));
        assert!(matches!(decrypt_owned(&KEY, &MODEL, cut.to_vec()), Err(VaultError::Length { .. })));
    }

    #[test]
    fn a_chunk_from_another_model_or_key_is_refused() {
        let (h, ct) = seal(2 * 4096, 4096);
        let mut other_header = h.clone();
        other_header.model_id = [7u8; 32];
        let other = encrypt(&KEY, &other_header, &data(2 * 4096)).unwrap_or_default();
        // same key, same nonce prefix, same position: only the bound model id differs
        let at = h.encoded_len();
        let mut spliced = ct.clone();
        spliced[at..at + 4096 + TAG_LEN].copy_from_slice(&other[at..at + 4096 + TAG_LEN]);
        assert!(matches!(decrypt(&KEY, &MODEL, &spliced), Err(VaultError::Chunk { index: 0 })));
        assert!(matches!(decrypt(&KEY, &MODEL, &other), Err(VaultError::WrongModel { .. })));
        assert!(matches!(decrypt(&[8u8; 32], &MODEL, &ct), Err(VaultError::Chunk { .. })));
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        let h = header(10, DEFAULT_CHUNK_SIZE);
        let enc = h.encode();
        assert_eq!(Header::decode(&enc).ok(), Some((h.clone(), enc.len())));
        let mut v2 = enc.clone();
        v2[9] = 2;
        assert!(Header::decode(&v2).is_err_and(|e| e.to_string().contains("version 2")));
        assert!(Header::decode(b"not a header at all, clearly not one, no no no no no no no").is_err());
        assert!(Header::decode(&enc[..20]).is_err());
        assert!(Header::new(MODEL, 1, 100, vec![[0; COMMITMENT_LEN]]).is_err());
        assert!(Header::new(MODEL, 1, 4096, vec![]).is_err());
    }

    #[test]
    fn streaming_refuses_input_of_the_wrong_length() {
        let h = header(100, 4096);
        assert!(encrypt(&KEY, &h, &data(99)).is_err());
        assert!(encrypt(&KEY, &h, &data(101)).is_err());
    }
}
