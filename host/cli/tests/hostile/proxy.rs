//! A TCP proxy between a host and its chain RPC that can pass traffic, refuse connections
//! (nothing listens: the connect fails at once) or hang (connections are accepted and read, and
//! nothing is ever answered). Switching mode cuts every connection already open, as an outage
//! does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass = 0,
    Refuse = 1,
    Hang = 2,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// A proxy to `upstream` on a free local port, passing traffic.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let (cut, cut_rx) = watch::channel(0u64);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let current = m.load(Ordering::Acquire);
                if current == Mode::Refuse as u8 {
                    // nothing listens: connections are refused
                    listener = None;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                let l = match &listener {
                    Some(l) => l,
                    None => match TcpListener::bind(addr).await {
                        Ok(l) => listener.insert(l),
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => continue,
                };
                let Ok((client, _)) = accepted else { continue };
                let (mode, mut cut) = (m.load(Ordering::Acquire), cut_rx.clone());
                // only a switch from now on cuts this connection
                cut.borrow_and_update();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(client, upstream, mode) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, mode, cut, task })
    }

    /// Switches mode and cuts every open connection.
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        self.cut.send_modify(|n| *n += 1);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mode: u8) {
    if mode == Mode::Hang as u8 {
        // read everything, answer nothing
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut client, &mut sink).await;
        std::future::pending::<()>().await;
    }
    let Ok(mut up) = TcpStream::connect(upstream).await else { return };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
}
