//! Content-addressed storage for ciphertexts and plugins.
//!
//! Two backends behind one type: a local directory (the embedded default; one file per content
//! id, written to a temporary name and renamed, so a crash never leaves a half file under a real
//! id) and an IPFS node over the Kubo HTTP RPC (`/api/v0/add`, `/api/v0/cat`) with the importer
//! settings that reproduce our ids. Every `get` recomputes the id over the bytes it received, so
//! neither a damaged disk nor a dishonest storage node can hand the host other content.

use std::path::{Path, PathBuf};

use crate::VaultError;
use crate::cid::{self, ContentId};

/// Where content lives.
#[derive(Debug, Clone)]
pub enum Store {
    /// A local directory.
    Local(PathBuf),
    /// A Kubo node's HTTP RPC base URL (e.g. `http://127.0.0.1:5001`).
    Kubo {
        /// Base URL.
        api: String,
        /// HTTP client.
        client: reqwest::Client,
    },
}

impl Store {
    /// Parses a store spec: `ipfs+http://HOST:PORT` (Kubo RPC) or a directory path.
    pub fn from_spec(spec: &str) -> Self {
        match spec.strip_prefix("ipfs+") {
            Some(api) => {
                Self::Kubo { api: api.trim_end_matches('/').to_string(), client: reqwest::Client::new() }
            }
            None => Self::Local(PathBuf::from(spec)),
        }
    }

    /// Stores the file at `path`; returns its content id.
    pub async fn put_file(&self, path: &Path) -> Result<ContentId, VaultError> {
        match self {
            Self::Local(root) => {
                let (root, path) = (root.clone(), path.to_path_buf());
                tokio::task::spawn_blocking(move || local_put(&root, &path))
                    .await
                    .map_err(|e| VaultError::Store(e.to_string()))?
            }
            Self::Kubo { api, client } => {
                let bytes = tokio::fs::read(path).await?;
                kubo_add(client, api, bytes).await
            }
        }
    }

    /// Stores bytes; returns their content id.
    pub async fn put_bytes(&self, bytes: Vec<u8>) -> Result<ContentId, VaultError> {
        match self {
            Self::Local(root) => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&root)?;
                    let tmp = tempfile::NamedTempFile::new_in(&root)?;
                    std::fs::write(tmp.path(), &bytes)?;
                    local_put(&root, tmp.path())
                })
                .await
                .map_err(|e| VaultError::Store(e.to_string()))?
            }
            Self::Kubo { api, client } => kubo_add(client, api, bytes).await,
        }
    }

    /// Whether content with this id is stored.
    pub async fn has(&self, id: &ContentId) -> Result<bool, VaultError> {
        match self {
            Self::Local(root) => Ok(tokio::fs::try_exists(root.join(id.v1())).await?),
            Self::Kubo { .. } => Ok(self.get(id).await.is_ok()),
        }
    }

    /// Fetches content and checks it hashes to `id`.
    pub async fn get(&self, id: &ContentId) -> Result<Vec<u8>, VaultError> {
        let bytes = match self {
            Self::Local(root) => {
                let path = root.join(id.v1());
                tokio::fs::read(&path).await.map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => VaultError::NotFound(id.v1()),
                    _ => e.into(),
                })?
            }
            Self::Kubo { api, client } => {
                let resp = client
                    .post(format!("{api}/api/v0/cat"))
                    .query(&[("arg", id.v1())])
                    .send()
                    .await
                    .map_err(|e| VaultError::Store(format!("IPFS cat {id}: {e}")))?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(VaultError::Store(format!("IPFS cat {id}: {status} {text}")));
                }
                resp.bytes().await.map_err(|e| VaultError::Store(format!("IPFS cat {id}: {e}")))?.to_vec()
            }
        };
        let bytes = tokio::task::spawn_blocking(move || {
            let got = cid::of_bytes(&bytes)?;
            Ok::<_, VaultError>((got, bytes))
        })
        .await
        .map_err(|e| VaultError::Store(e.to_string()))??;
        if bytes.0 != *id {
            return Err(VaultError::ContentMismatch { expected: id.v1(), found: bytes.0.v1() });
        }
        Ok(bytes.1)
    }
}

fn local_put(root: &Path, path: &Path) -> Result<ContentId, VaultError> {
    std::fs::create_dir_all(root)?;
    let id = cid::compute(std::io::BufReader::new(std::fs::File::open(path)?))?;
    let dest = root.join(id.v1());
    if !dest.exists() {
        let tmp = tempfile::NamedTempFile::new_in(root)?;
        std::fs::copy(path, tmp.path())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest).map_err(|e| VaultError::Io(e.error))?;
    }
    Ok(id)
}

async fn kubo_add(client: &reqwest::Client, api: &str, bytes: Vec<u8>) -> Result<ContentId, VaultError> {
    let expected = tokio::task::spawn_blocking({
        let bytes = bytes.clone();
        move || cid::of_bytes(&bytes)
    })
    .await
    .map_err(|e| VaultError::Store(e.to_string()))??;
    // a hand-built multipart body: one file part, as `ipfs add` sends it
    let boundary = format!("div-{}", hex::encode(rand::random::<[u8; 12]>()));
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let resp = client
        .post(format!("{api}/api/v0/add"))
        .query(&[
            ("cid-version", "1"),
            ("raw-leaves", "false"),
            ("chunker", "size-262144"),
            ("pin", "true"),
            ("quieter", "true"),
        ])
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .map_err(|e| VaultError::Store(format!("IPFS add: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| VaultError::Store(format!("IPFS add: {e}")))?;
    if !status.is_success() {
        return Err(VaultError::Store(format!("IPFS add: {status} {text}")));
    }
    #[derive(serde::Deserialize)]
    struct Added {
        #[serde(rename = "Hash")]
        hash: String,
    }
    let added: Added = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| VaultError::Store(format!("IPFS add: unexpected answer {text:?}")))?;
    let got: ContentId = added.hash.parse()?;
    if got != expected {
        return Err(VaultError::ContentMismatch { expected: expected.v1(), found: got.v1() });
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trips_and_detects_swapped_content() {
        let dir = tempfile::tempdir().unwrap_or_else(|_| unreachable!());
        let store = Store::Local(dir.path().to_path_buf());
        let Ok(id) = store.put_bytes(b"ciphertext".to_vec()).await else { unreachable!() };
        assert_eq!(store.get(&id).await.ok(), Some(b"ciphertext".to_vec()));
        assert!(store.has(&id).await.unwrap_or(false));
        // a storage node that swaps the bytes under an id is caught
        let _ = std::fs::write(dir.path().join(id.v1()), b"other bytes");
        assert!(matches!(store.get(&id).await, Err(VaultError::ContentMismatch { .. })));
        let Ok(missing) = cid::of_bytes(b"never stored") else { unreachable!() };
        assert!(matches!(store.get(&missing).await, Err(VaultError::NotFound(_))));
    }

    /// A stand-in for Kubo's RPC that keeps what it is given under the id we compute and answers
    /// `cat` from it, except for one id it answers with other bytes: this checks our side of the
    /// protocol (multipart upload, importer flags, answer parsing, verification), not Kubo itself,
    /// which cannot run on this machine.
    #[tokio::test]
    async fn kubo_backend_speaks_the_rpc_and_verifies_answers() {
        use axum::extract::{Query, State};
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        type Blobs = Arc<Mutex<HashMap<String, Vec<u8>>>>;
        async fn add(
            State(blobs): State<Blobs>,
            Query(q): Query<HashMap<String, String>>,
            body: axum::body::Bytes,
        ) -> String {
            assert_eq!(q.get("cid-version").map(String::as_str), Some("1"));
            assert_eq!(q.get("raw-leaves").map(String::as_str), Some("false"));
            assert_eq!(q.get("chunker").map(String::as_str), Some("size-262144"));
            let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
            let start = find(&body, b"\r\n\r\n").map(|p| p + 4).unwrap_or(0);
            let end = body.windows(4).rposition(|w| w == b"\r\n--").unwrap_or(body.len());
            let content = body[start..end].to_vec();
            let id = cid::of_bytes(&content).map(|c| c.v1()).unwrap_or_default();
            blobs.lock().map(|mut m| m.insert(id.clone(), content)).ok();
            format!("{{\"Name\":\"blob\",\"Hash\":\"{id}\",\"Size\":\"1\"}}\n")
        }
        async fn cat(State(blobs): State<Blobs>, Query(q): Query<HashMap<String, String>>) -> Vec<u8> {
            let arg = q.get("arg").cloned().unwrap_or_default();
            blobs.lock().ok().and_then(|m| m.get(&arg).cloned()).unwrap_or_else(|| b"swapped".to_vec())
        }
        let app = axum::Router::new()
            .route("/api/v0/add", axum::routing::post(add))
            .route("/api/v0/cat", axum::routing::post(cat))
            .with_state(Blobs::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|_| unreachable!());
        let addr = listener.local_addr().unwrap_or_else(|_| unreachable!());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let store = Store::from_spec(&format!("ipfs+http://{addr}"));
        let data = b"sealed model bytes".to_vec();
        let Ok(id) = store.put_bytes(data.clone()).await else { unreachable!("add failed") };
        assert_eq!(Ok(id), cid::of_bytes(&data).map_err(|e| e.to_string()));
        assert_eq!(store.get(&id).await.ok(), Some(data));
        let Ok(unknown) = cid::of_bytes(b"not there") else { unreachable!() };
        assert!(matches!(store.get(&unknown).await, Err(VaultError::ContentMismatch { .. })));
    }
}
