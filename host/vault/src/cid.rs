//! Content ids exactly as `ipfs add` computes them with its defaults: UnixFS files cut by the
//! fixed-size chunker into 256 KiB leaves, each a dag-pb node, linked by a balanced DAG of at
//! most 174 links per node, SHA-256 multihashes. We record the CIDv1 (dag-pb, base32) form of
//! that DAG's root; its CIDv0 (`Qm…`) names the same bytes.
//!
//! Because the id is the IPFS id, the ciphertext can be pinned on IPFS or Filecoin unchanged, and
//! any node that serves it is checked by recomputing the id over what it returned. The dag-pb and
//! UnixFS protobufs are small enough to encode here (two messages each, a handful of fields);
//! `cid` and `multihash` do the id encoding. Tests compare against Debian's `ipfs_cid`, an
//! independent implementation of the same importer.

use std::io::Read;

use cid::Cid;
use multihash::Multihash;
use sha2::{Digest, Sha256};

use crate::VaultError;

/// `ipfs add`'s default chunk size.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Links per node in go-unixfs's balanced layout.
pub const MAX_LINKS: usize = 174;
const DAG_PB: u64 = 0x70;
const SHA2_256: u64 = 0x12;

/// A node of the DAG as its parent links to it.
#[derive(Clone)]
struct Link {
    cid: Cid,
    /// Bytes of this node's block plus every block below it (dag-pb `Tsize`).
    tsize: u64,
    /// File bytes under this node (UnixFS `blocksizes` entry in the parent).
    filesize: u64,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// UnixFS `Data` for a file node (Type = File).
fn unixfs_file(data: &[u8], filesize: u64, blocksizes: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16 + blocksizes.len() * 5);
    field_varint(&mut out, 1, 2);
    if !data.is_empty() {
        field_bytes(&mut out, 2, data);
    }
    field_varint(&mut out, 3, filesize);
    for b in blocksizes {
        field_varint(&mut out, 4, *b);
    }
    out
}

/// A dag-pb node: links first, then data, as go-merkledag serialises it.
fn dag_pb(links: &[Link], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16 + links.len() * 48);
    for l in links {
        let mut link = Vec::with_capacity(48);
        field_bytes(&mut link, 1, &l.cid.to_bytes());
        field_bytes(&mut link, 2, b"");
        field_varint(&mut link, 3, l.tsize);
        field_bytes(&mut out, 2, &link);
    }
    field_bytes(&mut out, 1, data);
    out
}

fn block_cid(block: &[u8]) -> Result<Cid, VaultError> {
    let digest = Sha256::digest(block);
    let mh = Multihash::<64>::wrap(SHA2_256, &digest).map_err(|e| VaultError::Cid(e.to_string()))?;
    Cid::new_v0(mh).map_err(|e| VaultError::Cid(e.to_string()))
}

fn leaf(chunk: &[u8]) -> Result<Link, VaultError> {
    let block = dag_pb(&[], &unixfs_file(chunk, chunk.len() as u64, &[]));
    Ok(Link { cid: block_cid(&block)?, tsize: block.len() as u64, filesize: chunk.len() as u64 })
}

fn parent(children: &[Link]) -> Result<Link, VaultError> {
    let sizes: Vec<u64> = children.iter().map(|c| c.filesize).collect();
    let filesize = sizes.iter().sum();
    let block = dag_pb(children, &unixfs_file(&[], filesize, &sizes));
    let tsize = block.len() as u64 + children.iter().map(|c| c.tsize).sum::<u64>();
    Ok(Link { cid: block_cid(&block)?, tsize, filesize })
}

/// Computes the content id of everything `reader` yields, reading it once in 256 KiB chunks.
pub fn compute(mut reader: impl Read) -> Result<ContentId, VaultError> {
    let mut leaves = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let mut filled = 0;
        while filled < CHUNK_SIZE {
            let n = reader.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 && !leaves.is_empty() {
            break;
        }
        leaves.push(leaf(&buf[..filled])?);
        if filled < CHUNK_SIZE {
            break;
        }
    }
    // balanced layout: full subtrees left to right, the rightmost one partial
    let mut level = leaves;
    while level.len() > 1 {
        level = level.chunks(MAX_LINKS).map(parent).collect::<Result<_, _>>()?;
    }
    let root = level.pop().ok_or_else(|| VaultError::Cid("no root".into()))?;
    Ok(ContentId(root.cid))
}

/// Computes the content id of bytes in memory.
pub fn of_bytes(bytes: &[u8]) -> Result<ContentId, VaultError> {
    compute(bytes)
}

/// A content id (the root of the UnixFS DAG `ipfs add` would build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentId(Cid);

impl ContentId {
    /// The CIDv1 form we record (dag-pb, base32 `bafy…`).
    pub fn v1(&self) -> String {
        Cid::new_v1(DAG_PB, *self.0.hash()).to_string()
    }

    /// The CIDv0 form (`Qm…`) `ipfs add` prints by default.
    pub fn v0(&self) -> String {
        self.0.to_string()
    }
}

impl std::fmt::Display for ContentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.v1())
    }
}

impl std::str::FromStr for ContentId {
    type Err = VaultError;

    /// Parses either form; only dag-pb SHA-256 ids (what `ipfs add` makes) are accepted.
    fn from_str(s: &str) -> Result<Self, VaultError> {
        let cid = Cid::try_from(s).map_err(|e| VaultError::Cid(format!("{s:?}: {e}")))?;
        if cid.codec() != DAG_PB || cid.hash().code() != SHA2_256 {
            return Err(VaultError::Cid(format!("{s:?} is not a dag-pb SHA-256 content id")));
        }
        Cid::new_v0(*cid.hash()).map(Self).map_err(|e| VaultError::Cid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_file_has_ipfs_s_well_known_id() {
        let Ok(id) = of_bytes(b"") else { unreachable!() };
        assert_eq!(id.v0(), "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH");
        assert_eq!(id.v1(), "bafybeif7ztnhq65lumvvtr4ekcwd2ifwgm3awq4zfr3srh462rwyinlb4y");
    }

    #[test]
    fn both_forms_parse_to_the_same_id_and_others_are_refused() {
        let Ok(id) = of_bytes(b"hello") else { unreachable!() };
        assert_eq!(id.v1().parse::<ContentId>().ok(), Some(id));
        assert_eq!(id.v0().parse::<ContentId>().ok(), Some(id));
        assert!("not-a-cid".parse::<ContentId>().is_err());
        // a raw-leaf CIDv1 is a different DAG from what we record
        assert!("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq".parse::<ContentId>().is_err());
    }

    #[test]
    fn varints_encode_as_protobuf_does() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
    }
}
