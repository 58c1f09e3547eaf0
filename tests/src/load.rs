//! A small HTTP load generator, so anyone can reproduce the throughput numbers against a host.
//!
//! Each client owns one keep-alive HTTP/1.1 connection (hyper's low-level client: no pool, no
//! redirects, nothing between the bench and the socket) and sends one request after another
//! until the time is up; a connection the server closes is reopened. The report counts answers
//! by status and gives requests per second and latency percentiles. The benches use it in
//! process (`noop`), and `cargo bench -p div-tests --bench load -- URL …` points it at any
//! running host.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// What to send, how hard and for how long.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port` (no path).
    pub base: String,
    /// The request path, e.g. `/v1/embeddings`.
    pub path: String,
    /// The JSON body of every request.
    pub body: Bytes,
    /// A bearer token, if the host wants one.
    pub bearer: Option<String>,
    /// Concurrent clients, one connection each.
    pub clients: usize,
    /// How long to send.
    pub duration: Duration,
}

/// What came back.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Answers with status 200.
    pub ok: u64,
    /// Other answers and failed exchanges.
    pub errors: u64,
    /// The first error's status and body (clipped), to say why.
    pub first_error: Option<String>,
    /// Successful answers per second of the run.
    pub rps: f64,
    /// Median latency of successful answers.
    pub p50: Duration,
    /// 99th percentile latency of successful answers.
    pub p99: Duration,
}

/// Splits `http://host:port` into the address to connect to and the `Host` header.
fn authority(base: &str) -> anyhow::Result<String> {
    let rest = base.strip_prefix("http://").context("only http:// URLs are supported")?;
    let auth = rest.split('/').next().unwrap_or(rest);
    anyhow::ensure!(!auth.is_empty(), "no host in {base}");
    Ok(auth.to_string())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(auth: &str) -> anyhow::Result<Sender> {
    let stream =
        tokio::net::TcpStream::connect(auth).await.with_context(|| format!("connecting to {auth}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One client: requests back to back until `until` (at least one).
async fn client(spec: LoadSpec, auth: String, until: Instant) -> (Vec<Duration>, u64, Option<String>) {
    let (mut lat, mut errors, mut first) = (Vec::new(), 0u64, None);
    let mut sender: Option<Sender> = None;
    // every client sends at least once, however late it got going
    let mut started_once = false;
    while !started_once || Instant::now() < until {
        started_once = true;
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match connect(&auth).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    errors += 1;
                    first.get_or_insert(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            sender = None;
            continue;
        }
        let mut req = Request::post(spec.path.as_str())
            .header(hyper::header::HOST, auth.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(b) = &spec.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let Ok(req) = req.body(Full::new(spec.body.clone())) else {
            errors += 1;
            first.get_or_insert("the request could not be built".into());
            break;
        };
        let started = Instant::now();
        let answer = async {
            let resp = s.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
        .await;
        match answer {
            Ok((status, _)) if status == hyper::StatusCode::OK => lat.push(started.elapsed()),
            Ok((status, body)) => {
                errors += 1;
                first.get_or_insert_with(|| {
                    format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]))
                });
            }
            Err(e) => {
                errors += 1;
                first.get_or_insert(format!("{e}"));
                sender = None;
            }
        }
    }
    (lat, errors, first)
}

/// Runs `spec` and reports. A run with no successful answer is still a report (its `errors` and
/// `first_error` say why); only a malformed spec is an error.
pub async fn run(spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    let auth = authority(&spec.base)?;
    let started = Instant::now();
    let until = started + spec.duration;
    let tasks: Vec<_> =
        (0..spec.clients.max(1)).map(|_| tokio::spawn(client(spec.clone(), auth.clone(), until))).collect();
    let mut lat = Vec::new();
    let mut report = LoadReport::default();
    for t in tasks {
        let (l, e, f) = t.await?;
        lat.extend(l);
        report.errors += e;
        if report.first_error.is_none() {
            report.first_error = f;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    report.ok = lat.len() as u64;
    report.rps = report.ok as f64 / elapsed;
    let at = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied();
    report.p50 = at(0.50).unwrap_or_default();
    report.p99 = at(0.99).unwrap_or_default();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_bases_are_understood() {
        assert_eq!(authority("http://127.0.0.1:8080").ok().as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(authority("http://h:1/ignored").ok().as_deref(), Some("h:1"));
        assert!(authority("https://h:1").is_err());
        assert!(authority("http://").is_err());
    }
}
