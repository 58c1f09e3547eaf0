//! The content key and its t-of-n split: Feldman verifiable secret sharing over secp256k1
//! (`vsss-rs`).
//!
//! The secret that is shared is a random secp256k1 scalar `s`; the AES content key is
//! `HKDF-SHA256(s, salt = model id, info = "div content key v1")`, so every bit of the key is
//! uniform even though `s` lives in a field slightly smaller than 2^256. The dealer (the owner)
//! publishes the commitments `a_j·G` to the sharing polynomial inside the ciphertext header,
//! which the chain pins through its content id: a host checks every share it receives against
//! them before combining, so a custodian that returns a wrong share is caught and named instead of
//! silently producing a wrong key.
//!
//! A share travels as 64 bytes: its identifier (the custodian's 1-based index, a big-endian
//! scalar) then its value.

use hkdf::Hkdf;
use k256::elliptic_curve::Field;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::group::GroupEncoding;
use k256::{ProjectivePoint, Scalar};
use rand_core::OsRng;
use sha2::Sha256;
use vsss_rs::{
    DefaultShare, FeldmanVerifierSet, IdentifierPrimeField, ReadableShareSet, ValueGroup, feldman,
};
use zeroize::{Zeroize, Zeroizing};

use crate::VaultError;
use crate::format::COMMITMENT_LEN;

type K256Share = DefaultShare<IdentifierPrimeField<Scalar>, IdentifierPrimeField<Scalar>>;
type K256Verifier = ValueGroup<ProjectivePoint>;

/// One custodian's share: identifier ‖ value, 64 bytes, zeroised on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, zeroize::ZeroizeOnDrop)]
pub struct Share(pub [u8; 64]);

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share(#{})", self.index().unwrap_or(0))
    }
}

impl Share {
    /// Parses 64 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, VaultError> {
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| VaultError::Share(format!("a share is 64 bytes, got {}", bytes.len())))?;
        let share = Self(arr);
        share.parse()?;
        Ok(share)
    }

    /// The share's 1-based index (which custodian slot it belongs to).
    pub fn index(&self) -> Option<u8> {
        let id = &self.0[..32];
        id[..31].iter().all(|b| *b == 0).then_some(id[31]).filter(|i| *i != 0)
    }

    fn parse(&self) -> Result<K256Share, VaultError> {
        let scalar = |b: &[u8]| -> Result<Scalar, VaultError> {
            let mut bytes = k256::FieldBytes::default();
            bytes.copy_from_slice(b);
            Option::from(Scalar::from_repr(bytes))
                .ok_or_else(|| VaultError::Share("not a secp256k1 scalar".into()))
        };
        if self.index().is_none() {
            return Err(VaultError::Share("share index must be 1..=255".into()));
        }
        Ok(K256Share {
            identifier: IdentifierPrimeField(scalar(&self.0[..32])?),
            value: IdentifierPrimeField(scalar(&self.0[32..])?),
        })
    }

    /// Whether this share lies on the polynomial the commitments describe.
    pub fn verify(&self, commitments: &[[u8; COMMITMENT_LEN]]) -> bool {
        let Ok(share) = self.parse() else { return false };
        let mut set: Vec<K256Verifier> = vec![ValueGroup(ProjectivePoint::GENERATOR)];
        for c in commitments {
            let point: Option<ProjectivePoint> = ProjectivePoint::from_bytes(c.into()).into();
            match point {
                Some(p) => set.push(ValueGroup(p)),
                None => return false,
            }
        }
        FeldmanVerifierSet::<K256Share, K256Verifier>::verify_share(&set, &share).is_ok()
    }
}

/// A freshly dealt secret: the content key, the shares and the commitments.
pub struct Dealing {
    /// The AES-256 content key derived from the shared secret.
    pub content_key: Zeroizing<[u8; 32]>,
    /// Shares for indices `1..=n`.
    pub shares: Vec<Share>,
    /// `threshold` commitments, the first being `s·G`.
    pub commitments: Vec<[u8; COMMITMENT_LEN]>,
}

/// Deals a fresh random secret for `model_id` in `threshold`-of-`n` shares.
pub fn deal(model_id: &[u8; 32], threshold: u8, n: u8) -> Result<Dealing, VaultError> {
    if threshold == 0 || threshold > n {
        return Err(VaultError::Share(format!("threshold {threshold} of {n} shares")));
    }
    let secret = Scalar::random(&mut OsRng);
    let (shares, commitments) = if threshold == 1 {
        // a degree-0 polynomial: every share is the secret itself (vsss-rs needs t ≥ 2)
        let share = |i: u8| {
            let mut b = [0u8; 64];
            b[31] = i;
            b[32..].copy_from_slice(&secret.to_repr());
            Share(b)
        };
        let mut c = [0u8; COMMITMENT_LEN];
        c.copy_from_slice(&(ProjectivePoint::GENERATOR * secret).to_bytes());
        ((1..=n).map(share).collect(), vec![c])
    } else {
        let (shares, verifiers) = feldman::split_secret::<K256Share, K256Verifier>(
            threshold as usize,
            n as usize,
            &IdentifierPrimeField(secret),
            None,
            &mut OsRng,
        )
        .map_err(|e| VaultError::Share(format!("splitting: {e:?}")))?;
        let shares = shares
            .iter()
            .map(|s| {
                let mut b = [0u8; 64];
                b[..32].copy_from_slice(&s.identifier.0.to_repr());
                b[32..].copy_from_slice(&s.value.0.to_repr());
                Share(b)
            })
            .collect();
        // verifiers[0] is the generator; the commitments follow it
        let commitments = verifiers[1..]
            .iter()
            .map(|v| {
                let mut c = [0u8; COMMITMENT_LEN];
                c.copy_from_slice(&v.0.to_bytes());
                c
            })
            .collect();
        (shares, commitments)
    };
    let content_key = content_key(&secret, model_id);
    Ok(Dealing { content_key, shares, commitments })
}

/// Recombines the content key from `threshold` shares, each checked against `commitments`
/// first. The caller picks which shares; an invalid one is an error naming its index.
pub fn combine(
    model_id: &[u8; 32],
    commitments: &[[u8; COMMITMENT_LEN]],
    shares: &[Share],
) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let t = commitments.len();
    if shares.len() < t {
        return Err(VaultError::Share(format!("{} shares, {t} needed", shares.len())));
    }
    for s in shares {
        if !s.verify(commitments) {
            return Err(VaultError::Share(format!(
                "share #{} fails its commitments",
                s.index().unwrap_or(0)
            )));
        }
    }
    let secret = if t == 1 {
        shares[0].parse()?.value.0
    } else {
        let parsed: Vec<K256Share> = shares[..t].iter().map(Share::parse).collect::<Result<_, _>>()?;
        parsed.combine().map_err(|e| VaultError::Share(format!("combining: {e:?}")))?.0
    };
    // the combined secret must match the first commitment, whatever shares were given
    let mut c0 = [0u8; COMMITMENT_LEN];
    c0.copy_from_slice(&(ProjectivePoint::GENERATOR * secret).to_bytes());
    if c0 != commitments[0] {
        return Err(VaultError::Share("the combined secret does not match the commitments".into()));
    }
    Ok(content_key(&secret, model_id))
}

fn content_key(secret: &Scalar, model_id: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let ikm = Zeroizing::new(secret.to_repr());
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's output limit, so expand cannot fail
    let _ = Hkdf::<Sha256>::new(Some(model_id), &ikm).expand(b"div content key v1", &mut *key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: [u8; 32] = [5u8; 32];

    #[test]
    fn any_t_shares_recover_the_key_and_fewer_do_not() {
        let Ok(d) = deal(&MODEL, 2, 3) else { unreachable!() };
        assert_eq!(d.commitments.len(), 2);
        for pair in [[0usize, 1], [1, 2], [0, 2], [2, 0]] {
            let picked: Vec<Share> = pair.iter().map(|i| d.shares[*i].clone()).collect();
            let key = combine(&MODEL, &d.commitments, &picked).map(|k| *k);
            assert_eq!(key.ok(), Some(*d.content_key), "{pair:?}");
        }
        assert!(combine(&MODEL, &d.commitments, &d.shares[..1]).is_err());
        assert_eq!(d.shares.iter().map(|s| s.index()).collect::<Vec<_>>(), vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_wrong_share_is_caught_by_the_commitments() {
        let Ok(d) = deal(&MODEL, 2, 3) else { unreachable!() };
        let mut bad = d.shares[1].clone();
        bad.0[63] ^= 1;
        assert!(!bad.verify(&d.commitments));
        assert!(d.shares.iter().all(|s| s.verify(&d.commitments)));
        let e = combine(&MODEL, &d.commitments, &[d.shares[0].clone(), bad]).err();
        assert!(e.is_some_and(|e| e.to_string().contains("share #2")));
        // shares of another dealing fail these commitments
        let Ok(other) = deal(&MODEL, 2, 3) else { unreachable!() };
        assert!(!other.shares[0].verify(&d.commitments));
    }

    #[test]
    fn one_of_n_works_and_keys_differ_per_model() {
        let Ok(d) = deal(&MODEL, 1, 2) else { unreachable!() };
        let key = combine(&MODEL, &d.commitments, &d.shares[1..]).map(|k| *k);
        assert_eq!(key.ok(), Some(*d.content_key));
        let other = combine(&[6u8; 32], &d.commitments, &d.shares[1..]).map(|k| *k);
        assert_ne!(other.ok(), Some(*d.content_key));
        assert!(deal(&MODEL, 3, 2).is_err() && deal(&MODEL, 0, 2).is_err());
    }

    #[test]
    fn share_bytes_are_checked() {
        assert!(Share::from_slice(&[0u8; 63]).is_err());
        assert!(Share::from_slice(&[0u8; 64]).is_err(), "index 0");
        assert!(Share::from_slice(&[0xffu8; 64]).is_err(), "not scalars");
    }
}
