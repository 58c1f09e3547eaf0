//! Sign-In with Ethereum (EIP-4361) sessions for the dApp, and the single-use challenges both
//! sign-in and API-key requests are signed over.
//!
//! `GET /v1/siwe/nonce` hands out a single-use nonce; the wallet signs an EIP-4361 message that
//! names this host's domain (from its configured public URL, never from the request's `Host`
//! header, which the caller chooses), the chain, that nonce and when it was issued;
//! `POST /v1/siwe` checks all of it and the EIP-191 signature and returns a session token for the
//! address. A session says *who* the caller is, not that they will pay: it admits a model's
//! owner to their own model, shows a user their permits (`GET /v1/me`), and proves control of
//! an address when asking for an API key.
//!
//! Nonces and sessions live in memory (a restart signs everyone out), expire, and are bounded in
//! number: expired entries are dropped from the front of a queue in arrival order, so no call
//! scans them all, and past the bound the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::Address;

use crate::MeterError;

/// How long a nonce may wait for its signature.
pub const NONCE_TTL: Duration = Duration::from_secs(300);
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most nonces (or sessions) held at once; past it the oldest are dropped.
pub const MAX_LIVE: usize = 100_000;

/// The fields of an EIP-4361 message this host checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiweMessage {
    /// The domain asking for the sign-in.
    pub domain: String,
    /// The signing address.
    pub address: Address,
    /// `Chain ID`.
    pub chain_id: u64,
    /// `Nonce`.
    pub nonce: String,
    /// `Issued At` (RFC 3339, as written).
    pub issued_at: String,
    /// `Expiration Time`, if any (RFC 3339, as written).
    pub expiration_time: Option<String>,
}

impl SiweMessage {
    /// Parses the ABNF of EIP-4361 far enough to check it: the header, the address line, and the
    /// `Key: value` fields.
    pub fn parse(text: &str) -> Result<Self, MeterError> {
        let bad = |m: &str| MeterError::Invalid(format!("SIWE message: {m}"));
        let mut lines = text.lines();
        let header = lines.next().ok_or_else(|| bad("empty"))?;
        let domain = header
            .strip_suffix(" wants you to sign in with your Ethereum account:")
            .ok_or_else(|| bad("the first line is not an EIP-4361 header"))?
            .to_string();
        let address: Address =
            lines.next().ok_or_else(|| bad("no address"))?.trim().parse().map_err(|_| bad("bad address"))?;
        let mut fields = HashMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(": ") {
                fields.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        let field = |k: &str| fields.get(k).cloned().ok_or_else(|| bad(&format!("no {k}")));
        if field("Version")? != "1" {
            return Err(bad("Version must be 1"));
        }
        Ok(Self {
            domain,
            address,
            chain_id: field("Chain ID")?.parse().map_err(|_| bad("bad Chain ID"))?,
            nonce: field("Nonce")?,
            issued_at: field("Issued At")?,
            expiration_time: fields.get("Expiration Time").cloned(),
        })
    }
}

/// Parses the subset of RFC 3339 EIP-4361 uses (`2026-11-26T04:00:00Z`, optional fraction and
/// offset) into Unix seconds.
pub fn rfc3339_secs(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (time, offset) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (t, sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60))
    };
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // days from civil (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
}

/// Expiring entries keyed by a random token, oldest first: pruning looks only at the front.
struct Expiring<V> {
    ttl: Duration,
    live: HashMap<String, (V, Instant)>,
    order: VecDeque<(Instant, String)>,
}

impl<V: Clone> Expiring<V> {
    fn new(ttl: Duration) -> Self {
        Self { ttl, live: HashMap::new(), order: VecDeque::new() }
    }

    fn prune(&mut self) {
        while let Some((at, key)) = self.order.front() {
            let expired = at.elapsed() >= self.ttl;
            if !expired && self.live.len() < MAX_LIVE && self.order.len() < 2 * MAX_LIVE {
                break;
            }
            // an entry taken early leaves its queue slot behind: only remove the same one
            if self.live.get(key).is_some_and(|(_, a)| a == at) {
                self.live.remove(key);
            }
            self.order.pop_front();
        }
    }

    fn insert(&mut self, key: String, value: V) {
        self.prune();
        let at = Instant::now();
        self.order.push_back((at, key.clone()));
        self.live.insert(key, (value, at));
    }

    fn get(&self, key: &str) -> Option<V> {
        self.live.get(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(v, _)| v.clone())
    }

    fn take(&mut self, key: &str) -> Option<V> {
        self.live.remove(key).filter(|(_, at)| at.elapsed() < self.ttl).map(|(v, _)| v)
    }
}

/// Single-use random challenges that expire after [`NONCE_TTL`].
///
/// Keyed ([`Nonces::keyed`]), a challenge also carries its expiry and a MAC under a key every
/// replica of the host derives from the host key: a challenge one replica issued is then
/// accepted by another (behind a load balancer the two requests rarely meet the same process).
/// Each process uses a challenge once; across replicas, what a challenge proves (the permit's
/// user is present now) can buy one API key per permit only, which the shared ledger enforces.
#[derive(Default)]
pub struct Nonces {
    live: Mutex<Expiring<()>>,
    key: Option<alloy::primitives::B256>,
    used: Mutex<Expiring<()>>,
}

impl Default for Expiring<()> {
    fn default() -> Self {
        Expiring::new(NONCE_TTL)
    }
}

impl Nonces {
    /// Challenges any replica holding `secret` (the host key's bytes) accepts.
    pub fn keyed(secret: &[u8]) -> Self {
        let key = alloy::primitives::keccak256([b"div key challenge".as_slice(), secret].concat());
        Self { key: Some(key), ..Self::default() }
    }

    /// A fresh nonce.
    pub fn issue(&self) -> String {
        let random = alloy::hex::encode(rand::random::<[u8; 12]>());
        let Some(key) = self.key else {
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(random.clone(), ());
            return random;
        };
        let expiry = crate::now() + NONCE_TTL.as_secs();
        let body = format!("{expiry:016x}{random}");
        let mac = alloy::primitives::keccak256([key.as_slice(), body.as_bytes()].concat());
        format!("{body}{}", alloy::hex::encode(&mac[..16]))
    }

    /// A keyed challenge's MAC and expiry hold.
    fn signed_and_current(&self, n: &str) -> bool {
        let Some(key) = self.key else { return false };
        if n.len() != 72 || !n.is_ascii() {
            return false;
        }
        let (body, mac) = n.split_at(40);
        let want = alloy::primitives::keccak256([key.as_slice(), body.as_bytes()].concat());
        let Ok(expiry) = u64::from_str_radix(&body[..16], 16) else { return false };
        alloy::hex::encode(&want[..16]) == mac && expiry >= crate::now()
    }

    /// Whether `n` was issued, is unused and has not expired.
    pub fn is_live(&self, n: &str) -> bool {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(n).is_some()
            || (self.signed_and_current(n)
                && self.used.lock().unwrap_or_else(|p| p.into_inner()).get(n).is_none())
    }

    /// Uses `n` up; true if it was live.
    pub fn take(&self, n: &str) -> bool {
        if self.live.lock().unwrap_or_else(|p| p.into_inner()).take(n).is_some() {
            return true;
        }
        if !self.signed_and_current(n) {
            return false;
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.get(n).is_some() {
            return false;
        }
        used.insert(n.to_string(), ());
        true
    }
}

/// Nonces handed out and sessions signed in.
///
/// Keyed ([`Sessions::keyed`]), a session token carries its expiry, chain and address under a
/// MAC with a key derived from the host key, so every replica of the host accepts it (behind a
/// load balancer the dApp's requests reach any of them). Signing out is then remembered by the
/// replica that was asked (until the token would have expired); another replica accepts the
/// token until it expires.
pub struct Sessions {
    nonces: Arc<Nonces>,
    sessions: Mutex<Expiring<Address>>,
    keyed: Option<(alloy::primitives::B256, u64)>,
    revoked: Mutex<Expiring<()>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_nonces(Arc::default())
    }
}

impl Sessions {
    /// Sessions whose sign-in nonces come from `nonces` (shared by the meters of several chains:
    /// a nonce is single-use across all of them, and a client need not say which chain it asks
    /// for; the signed message names it).
    pub fn with_nonces(nonces: Arc<Nonces>) -> Self {
        Self {
            nonces,
            sessions: Mutex::new(Expiring::new(SESSION_TTL)),
            keyed: None,
            revoked: Mutex::new(Expiring::new(SESSION_TTL)),
        }
    }

    /// Sessions on chain `chain_id` that any replica holding `secret` (the host key's bytes)
    /// accepts; sign-in nonces from `nonces`.
    pub fn keyed(nonces: Arc<Nonces>, secret: &[u8], chain_id: u64) -> Self {
        let key = alloy::primitives::keccak256([b"div session".as_slice(), secret].concat());
        Self { keyed: Some((key, chain_id)), ..Self::with_nonces(nonces) }
    }

    fn mac(key: &alloy::primitives::B256, body: &str) -> String {
        alloy::hex::encode(&alloy::primitives::keccak256([key.as_slice(), body.as_bytes()].concat())[..16])
    }

    /// A keyed token's address, if its MAC, expiry and chain hold.
    fn keyed_address(&self, token: &str) -> Option<Address> {
        let (key, chain) = self.keyed.as_ref()?;
        let rest = token.strip_prefix("div-session-")?;
        if rest.len() != 16 + 16 + 40 + 32 || !rest.is_ascii() {
            return None;
        }
        let (body, mac) = rest.split_at(72);
        if Self::mac(key, body) != mac {
            return None;
        }
        let expiry = u64::from_str_radix(&body[..16], 16).ok()?;
        let on = u64::from_str_radix(&body[16..32], 16).ok()?;
        (expiry > crate::now() && on == *chain).then(|| body[32..].parse().ok()).flatten()
    }

    /// The nonce store (to share with another chain's sessions).
    pub fn nonces(&self) -> &Arc<Nonces> {
        &self.nonces
    }

    /// A fresh single-use nonce.
    pub fn nonce(&self) -> String {
        self.nonces.issue()
    }

    /// Checks a signed EIP-4361 message for `domain` (this host's, from its configuration) and
    /// `chain_id` and opens a session.
    pub fn sign_in(
        &self,
        message: &str,
        signature: &str,
        domain: &str,
        chain_id: u64,
        now: i64,
    ) -> Result<(String, Address), MeterError> {
        let m = SiweMessage::parse(message)?;
        let bad = |s: String| MeterError::Invalid(format!("SIWE: {s}"));
        if m.domain != domain {
            return Err(bad(format!("signed for {:?}, this host is {domain:?}", m.domain)));
        }
        if m.chain_id != chain_id {
            return Err(MeterError::WrongChain {
                chain_id: m.chain_id,
                contract: Address::ZERO,
                expected_chain: chain_id,
                expected_contract: Address::ZERO,
            });
        }
        let issued = rfc3339_secs(&m.issued_at).ok_or_else(|| bad("bad Issued At".into()))?;
        if (now - issued).abs() > NONCE_TTL.as_secs() as i64 {
            return Err(bad("Issued At is not recent".into()));
        }
        if let Some(exp) = &m.expiration_time
            && rfc3339_secs(exp).is_none_or(|e| e <= now)
        {
            return Err(MeterError::Expired(0));
        }
        let bytes = alloy::hex::decode(signature.trim_start_matches("0x"))
            .map_err(|_| MeterError::BadSignature("not hex"))?;
        let hash = alloy::primitives::eip191_hash_message(message.as_bytes());
        // sign-in is for the dApp's EOA wallets: the same exact ECDSA rule as permits
        crate::caller::ecdsa_exact(hash, &bytes, m.address).map_err(MeterError::BadSignature)?;
        if !self.nonces.take(&m.nonce) {
            return Err(MeterError::Replayed);
        }
        if let Some((key, chain)) = &self.keyed {
            let expiry = crate::now() + SESSION_TTL.as_secs();
            let body = format!("{expiry:016x}{chain:016x}{}", alloy::hex::encode(m.address));
            let token = format!("div-session-{body}{}", Self::mac(key, &body));
            return Ok((token, m.address));
        }
        let token = format!("div-session-{}", alloy::hex::encode(rand::random::<[u8; 24]>()));
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone(), m.address);
        Ok((token, m.address))
    }

    /// The address signed in with `token`.
    pub fn address(&self, token: &str) -> Option<Address> {
        if self.keyed.is_some() {
            let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner()).get(token).is_some();
            return if revoked { None } else { self.keyed_address(token) };
        }
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(token)
    }

    /// Ends a session; true if it was open.
    pub fn sign_out(&self, token: &str) -> bool {
        if self.keyed.is_some() {
            if self.address(token).is_none() {
                return false;
            }
            self.revoked.lock().unwrap_or_else(|p| p.into_inner()).insert(token.to_string(), ());
            return true;
        }
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).take(token).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    fn message(addr: Address, nonce: &str, issued: &str) -> String {
        format!(
            "host.example wants you to sign in with your Ethereum account:\n{addr}\n\nSign in to DIV.\n\n\
             URI: http://host.example\nVersion: 1\nChain ID: 31337\nNonce: {nonce}\nIssued At: {issued}"
        )
    }

    #[test]
    fn rfc3339_dates_convert() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_secs("2026-11-26T04:00:00.123Z"), Some(1_795_665_600));
        assert_eq!(rfc3339_secs("2026-11-26T05:00:00+01:00"), Some(1_795_665_600));
        assert_eq!(rfc3339_secs("yesterday"), None);
    }

    #[test]
    fn a_signed_message_opens_one_session_and_its_nonce_only_once() -> Result<(), MeterError> {
        let key = PrivateKeySigner::random();
        let s = Sessions::default();
        let nonce = s.nonce();
        let msg = message(key.address(), &nonce, "2026-11-26T04:00:00Z");
        let sig = key.sign_message_sync(msg.as_bytes()).map_err(|e| MeterError::Invalid(e.to_string()))?;
        let sig = alloy::hex::encode(sig.as_bytes());
        let now = 1_795_665_600 + 10;
        assert!(matches!(s.sign_in(&msg, &sig, "other.example", 31337, now), Err(MeterError::Invalid(_))));
        assert!(matches!(s.sign_in(&msg, &sig, "host.example", 1, now), Err(MeterError::WrongChain { .. })));
        assert!(s.sign_in(&msg, &sig, "host.example", 31337, now + 3600).is_err(), "stale");
        let (token, addr) = s.sign_in(&msg, &sig, "host.example", 31337, now)?;
        assert_eq!((s.address(&token), addr), (Some(key.address()), key.address()));
        assert_eq!(s.sign_in(&msg, &sig, "host.example", 31337, now), Err(MeterError::Replayed));
        let forged = msg.replace("Sign in to DIV.", "Sign in to DIV!");
        assert!(matches!(
            s.sign_in(&forged, &sig, "host.example", 31337, now),
            Err(MeterError::BadSignature(_))
        ));
        assert_eq!(s.address("div-session-nope"), None);
        assert!(s.sign_out(&token));
        assert_eq!(s.address(&token), None, "signed out");
        Ok(())
    }

    #[test]
    fn a_keyed_session_works_on_every_replica_of_its_chain_and_nowhere_else() -> Result<(), MeterError> {
        let key = PrivateKeySigner::random();
        let (nonces_a, nonces_b) =
            (Arc::new(Nonces::keyed(b"sign-in host")), Arc::new(Nonces::keyed(b"sign-in host")));
        let a = Sessions::keyed(nonces_a, b"host", 31337);
        let b = Sessions::keyed(nonces_b.clone(), b"host", 31337);
        let other_chain = Sessions::keyed(nonces_b, b"host", 314159);
        let stranger = Sessions::keyed(Arc::default(), b"another host", 31337);
        // the nonce from replica a, the sign-in on replica b
        let nonce = a.nonce();
        let msg = message(key.address(), &nonce, "2026-11-26T04:00:00Z");
        let sig = key.sign_message_sync(msg.as_bytes()).map_err(|e| MeterError::Invalid(e.to_string()))?;
        let sig = alloy::hex::encode(sig.as_bytes());
        let now = 1_795_665_600 + 10;
        let (token, _) = b.sign_in(&msg, &sig, "host.example", 31337, now)?;
        assert_eq!(b.sign_in(&msg, &sig, "host.example", 31337, now), Err(MeterError::Replayed));
        assert_eq!(a.address(&token), Some(key.address()), "replica a knows b's session");
        assert_eq!(other_chain.address(&token), None, "another chain's meter does not");
        assert_eq!(stranger.address(&token), None, "another host does not");
        // a changed address keeps the old MAC: refused
        let forged =
            format!("{}{}", &token[..token.len() - 40 - 32], "0".repeat(40)) + &token[token.len() - 32..];
        assert_eq!(a.address(&forged), None);
        assert!(a.sign_out(&token));
        assert_eq!(a.address(&token), None, "signed out where asked");
        assert!(!a.sign_out(&token));
        Ok(())
    }

    #[test]
    fn nonces_are_single_use_and_bounded() {
        let n = Nonces::default();
        let a = n.issue();
        assert!(n.is_live(&a));
        assert!(n.take(&a));
        assert!(!n.take(&a), "used");
        assert!(!n.is_live("never-issued"));
        let mut e: Expiring<()> = Expiring::new(Duration::from_secs(60));
        for i in 0..(MAX_LIVE + 10) {
            e.insert(i.to_string(), ());
        }
        assert!(e.live.len() <= MAX_LIVE, "bounded: {}", e.live.len());
        assert!(e.get("0").is_none(), "the oldest went first");
        assert!(e.get(&(MAX_LIVE + 9).to_string()).is_some());
    }

    #[test]
    fn a_keyed_challenge_is_accepted_by_another_replica_once_and_cannot_be_forged() {
        let (a, b, stranger) =
            (Nonces::keyed(b"host key"), Nonces::keyed(b"host key"), Nonces::keyed(b"other"));
        let n = a.issue();
        assert!(n.bytes().all(|c| c.is_ascii_hexdigit()) && n.len() == 72, "{n}");
        assert!(b.is_live(&n), "a replica with the same host key accepts it");
        assert!(!stranger.is_live(&n), "another host does not");
        assert!(b.take(&n));
        assert!(!b.take(&n), "used up on that replica");
        // a changed expiry or random part breaks the MAC
        let mut forged = n.clone().into_bytes();
        forged[15] = if forged[15] == b'f' { b'e' } else { b'f' };
        let forged = String::from_utf8(forged).unwrap_or_default();
        assert!(!a.is_live(&forged) && !a.take(&forged));
        // an expired one (an expiry in the past, MAC'd correctly) is refused
        let key = a.key.unwrap_or_default();
        let body = format!("{:016x}{}", crate::now() - 1, "00".repeat(12));
        let mac = alloy::primitives::keccak256([key.as_slice(), body.as_bytes()].concat());
        assert!(!a.take(&format!("{body}{}", alloy::hex::encode(&mac[..16]))), "expired");
    }
}
