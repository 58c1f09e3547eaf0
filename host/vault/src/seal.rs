//! Sealing small secrets (key shares) to an X25519 public key with HPKE (RFC 9180, base mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) from the `hpke` crate.
//!
//! Shares travel sealed twice over: from the owner to a custodian (to the custodian's long-term
//! key, published at `GET /v1/info`) and from a custodian to a host (to a fresh key the host
//! makes for each load). `info` names the purpose and the model so a sealed share cannot be
//! replayed into another context.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::VaultError;

type Kem = X25519HkdfSha256;

/// An X25519 key pair for receiving sealed secrets.
pub struct SealKey {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl SealKey {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let (secret, public) = Kem::gen_keypair(&mut OsRng);
        Self { secret, public: public.to_bytes().into() }
    }

    /// The key pair derived deterministically from 32 bytes of secret seed material.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let (secret, public) = Kem::derive_keypair(seed);
        Self { secret, public: public.to_bytes().into() }
    }

    /// The public key to hand to senders.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Opens what [`seal`] sealed to this key with the same `info` and `aad`.
    pub fn open(&self, sealed: &Sealed, info: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.enc)
            .map_err(|_| VaultError::Seal("bad encapsulated key".into()))?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.secret,
            &enc,
            info,
            &sealed.ciphertext,
            aad,
        )
        .map(Zeroizing::new)
        .map_err(|_| VaultError::Seal("the sealed message does not open with this key".into()))
    }
}

/// A sealed message: the encapsulated key and the ciphertext (hex in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// HPKE's encapsulated key.
    #[serde(with = "hex_bytes")]
    pub enc: Vec<u8>,
    /// The AEAD ciphertext with its tag.
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
}

/// Seals `plaintext` to the X25519 public key `to`.
pub fn seal(to: &[u8; 32], info: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Sealed, VaultError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(to)
        .map_err(|_| VaultError::Seal("not an X25519 public key".into()))?;
    let (enc, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        &mut OsRng,
    )
    .map_err(|e| VaultError::Seal(format!("sealing: {e}")))?;
    Ok(Sealed { enc: enc.to_bytes().to_vec(), ciphertext })
}

/// Hex encoding for byte fields in JSON.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises bytes as lower-case hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Parses hex (with or without `0x`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s.trim_start_matches("0x")).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_only_with_the_right_key_info_and_aad() {
        let key = SealKey::generate();
        let Ok(sealed) = seal(&key.public(), b"info", b"aad", b"secret share") else { unreachable!() };
        assert_eq!(
            key.open(&sealed, b"info", b"aad").map(|p| p.to_vec()).ok(),
            Some(b"secret share".to_vec())
        );
        assert!(key.open(&sealed, b"other", b"aad").is_err());
        assert!(key.open(&sealed, b"info", b"other").is_err());
        assert!(SealKey::generate().open(&sealed, b"info", b"aad").is_err());
        let mut bad = sealed.clone();
        bad.ciphertext[0] ^= 1;
        assert!(key.open(&bad, b"info", b"aad").is_err());
    }

    #[test]
    fn seeded_keys_are_stable_and_json_is_hex() {
        assert_eq!(SealKey::from_seed(&[3; 32]).public(), SealKey::from_seed(&[3; 32]).public());
        assert_ne!(SealKey::from_seed(&[3; 32]).public(), SealKey::from_seed(&[4; 32]).public());
        let s = Sealed { enc: vec![1, 2], ciphertext: vec![255] };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(json, r#"{"enc":"0102","ciphertext":"ff"}"#);
        assert_eq!(serde_json::from_str::<Sealed>(&json).ok(), Some(s));
    }
}
