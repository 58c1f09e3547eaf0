//! Servers a test starts for itself as plain processes (no systemd, no container), stopped when
//! dropped. PostgreSQL: Debian's programs (`/usr/lib/postgresql/*/bin`, which the bootstrap
//! installs), a fresh cluster in a temporary folder on a free port; it refuses to run as root, so
//! under root it runs as the `postgres` user the Debian package creates. Redis: Debian's
//! `redis-server`, without persistence.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// The newest `…/postgresql/N/bin` with both programs.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: run scripts/bootstrap.sh (it installs Debian's postgresql)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            let all = ["initdb", "postgres", "pg_isready"].iter().all(|p| bin.join(p).exists());
            all.then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).context("no PostgreSQL server programs under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program args…`, as the `postgres` user when we are root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Creates a cluster and starts it.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!("div-pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status()?.success();
            anyhow::ensure!(ok, "chown {} to postgres failed", dir.display());
        }
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "div", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()?;
        anyhow::ensure!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = crate::free_tcp_port()?;
        let mut pg = Self { bin, dir, port, child: None };
        pg.run()?;
        Ok(pg)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log"))?;
        let child = as_owner(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&self.dir)
            // replicas, their settlement leases and the test's own connections
            .args(["-c", "max_connections=200"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "div", "-d", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("PostgreSQL did not start: {}", self.log())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A URL for the `postgres` database as the superuser `div`.
    pub fn url(&self) -> String {
        format!("postgres://div@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as an operator's restart does (a fast shutdown: open transactions are
    /// rolled back, every connection is closed), then starts it again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.run()
    }

    /// A fast shutdown (SIGINT), waiting for the server to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of the test's own (Debian's `redis-server`, installed by the bootstrap): a free
/// port, no persistence, stopped when dropped.
pub struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    /// Starts it and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = Path::new("/usr/bin/redis-server");
        anyhow::ensure!(
            bin.exists(),
            "no {}: run scripts/bootstrap.sh (it installs Debian's redis-server)",
            bin.display()
        );
        let port = crate::free_tcp_port()?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
                {
                    return Ok(Self { port, child });
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("redis-server did not start on port {port}")
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
