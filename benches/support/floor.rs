//! The loopback floor for the throughput numbers: the same bytes through a
//! plain TLS socket between two of our processes, with the session's
//! rustls configs (clawkerd's listener config with an agent leaf on one
//! side, the CP's dial config on the other; TLS 1.3, AES-GCM), no HTTP/2,
//! no gRPC, no pipes. Also a plain TCP socket, to show what TLS costs.
//!
//! The serving side is a child process (this binary re-executed with
//! `CLAWKER_TLS_FLOOR=<dir>`): it sends `bytes` in 128 KiB writes
//! ("to CP", the stdout direction) or reads until EOF and answers one byte
//! ("from CP", the stdin direction).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::identity::{AgentName, ProjectSlug};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ENV: &str = "CLAWKER_TLS_FLOOR";
const WRITE: usize = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToCp,
    FromCp,
}

/// If this process is the floor's serving side, runs it and exits.
pub fn child_main_if_requested() {
    let Some(dir) = std::env::var_os(ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve(PathBuf::from(dir)));
    std::process::exit(0);
}

async fn serve(dir: PathBuf) {
    let ca = clawker::pki::Ca::generate().unwrap();
    let cp = ca.mint_cp_client().unwrap();
    let leaf = ca
        .mint_agent(
            &ProjectSlug::new("p").unwrap(),
            &AgentName::new("a").unwrap(),
            "0f100f",
        )
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("cp.pem"), &cp.cert_pem).unwrap();
    std::fs::write(dir.join("cp.key"), &cp.key_pem).unwrap();
    let current = clawker::clawkerd::leaf::CurrentLeaf::new(
        clawker::clawkerd::leaf::Leaf::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())
            .unwrap(),
    );
    let cfg =
        clawker::clawkerd::listener::server_config(ca.cert_pem().as_bytes(), &current).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", tcp.local_addr().unwrap().port());
    loop {
        let (sock, _) = tcp.accept().await.unwrap();
        sock.set_nodelay(true).unwrap();
        let mut hdr = [0u8; 10];
        // First 10 bytes, in clear: b'T' (TLS) or b'P' (plain), direction
        // (b'>' to CP, b'<' from CP), then the byte count (u64 BE).
        let mut sock = sock;
        sock.read_exact(&mut hdr).await.unwrap();
        let bytes = u64::from_be_bytes(hdr[2..10].try_into().unwrap());
        let dir = if hdr[1] == b'>' {
            Direction::ToCp
        } else {
            Direction::FromCp
        };
        if hdr[0] == b'T' {
            let tls = acceptor.accept(sock).await.unwrap();
            pump_server(tls, dir, bytes).await;
        } else {
            pump_server(sock, dir, bytes).await;
        }
    }
}

async fn pump_server<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, dir: Direction, bytes: u64) {
    let mut buf = vec![0u8; WRITE];
    match dir {
        Direction::ToCp => {
            let mut left = bytes as usize;
            while left > 0 {
                let n = left.min(WRITE);
                s.write_all(&buf[..n]).await.unwrap();
                left -= n;
            }
            s.shutdown().await.unwrap();
        }
        Direction::FromCp => {
            let mut got = 0u64;
            while got < bytes {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            s.write_all(b"k").await.unwrap();
            s.flush().await.unwrap();
        }
    }
}

/// The client side (this process), owning the child.
pub struct Floor {
    child: std::process::Child,
    port: u16,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Floor {
    pub fn spawn() -> Floor {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Process::new(std::env::current_exe().unwrap())
            .env(ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn floor server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("floor port");
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let roots = Arc::new(clawker::tls::root_store("ca", &read("ca.pem")).unwrap());
        let client = clawker::tls::cp_dial_config(
            &read("cp.pem"),
            &read("cp.key"),
            clawker::tls::PermissiveServerVerifier::new(roots),
        )
        .unwrap();
        Floor {
            child,
            port,
            client: Arc::new(client),
            _dir: dir,
        }
    }

    /// Moves `bytes` one way; returns the elapsed time (connect and
    /// handshake excluded).
    pub async fn run(&self, tls: bool, dir: Direction, bytes: u64) -> Duration {
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        sock.set_nodelay(true).unwrap();
        let mut hdr = [0u8; 10];
        hdr[0] = if tls { b'T' } else { b'P' };
        hdr[1] = if dir == Direction::ToCp { b'>' } else { b'<' };
        hdr[2..].copy_from_slice(&bytes.to_be_bytes());
        sock.write_all(&hdr).await.unwrap();
        if tls {
            let name = rustls_pki_types::ServerName::try_from(clawker::identity::CONTROL_PLANE_CN)
                .unwrap();
            let mut s = tokio_rustls::TlsConnector::from(self.client.clone())
                .connect(name, sock)
                .await
                .unwrap();
            // The handshake completes on the first exchange; count from
            // after it.
            s.flush().await.unwrap();
            pump_client(s, dir, bytes).await
        } else {
            pump_client(sock, dir, bytes).await
        }
    }
}

async fn pump_client<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    dir: Direction,
    bytes: u64,
) -> Duration {
    let mut buf = vec![0u8; WRITE];
    let t = Instant::now();
    match dir {
        Direction::ToCp => {
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            assert_eq!(got, bytes, "floor: short read");
        }
        Direction::FromCp => {
            let mut left = bytes as usize;
            while left > 0 {
                let n = left.min(WRITE);
                s.write_all(&buf[..n]).await.unwrap();
                left -= n;
            }
            s.flush().await.unwrap();
            let mut k = [0u8; 1];
            s.read_exact(&mut k).await.unwrap();
        }
    }
    t.elapsed()
}
