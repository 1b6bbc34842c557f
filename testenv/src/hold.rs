use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::relay::{lock, loopback, relay_each};
use crate::Result;

/// How long a held request's answer is waited for once it is delivered.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A TCP proxy on loopback in front of an HTTP server that can deliver one
/// request late: the request is kept from the server for a while, its
/// client gives up on it, and then it reaches the server and runs, as a
/// request queued in a gateway or a commit stalled in a database does.
/// Everything else passes unchanged. Stops when dropped.
pub struct HoldProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    armed: Arc<Mutex<Armed>>,
    held: watch::Receiver<u64>,
    landed: watch::Receiver<u64>,
}

/// The markers a request must hold (all of them), and how long it is kept.
type Armed = Option<(Vec<Vec<u8>>, Duration)>;

impl HoldProxy {
    /// Forwards a new loopback port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<HoldProxy> {
        let (listener, port) = loopback("holding proxy").await?;
        let armed: Arc<Mutex<Armed>> = Arc::default();
        let (held_tx, held) = watch::channel(0u64);
        let (landed_tx, landed) = watch::channel(0u64);
        let counts = Arc::new((held_tx, landed_tx));
        let a = armed.clone();
        let task = relay_each(listener, upstream, move |client, server| {
            let (armed, counts) = (a.clone(), counts.clone());
            async move { relay(client, server, &armed, &counts).await }
        });
        Ok(HoldProxy {
            port,
            task,
            armed,
            held,
            landed,
        })
    }

    /// The next request holding every one of `markers` (bytes of its
    /// request line, headers or body) is kept from the server for `hold`,
    /// then delivered; its answer goes nowhere.
    pub fn hold_next(&self, markers: &[&[u8]], hold: Duration) {
        let markers = markers.iter().map(|m| m.to_vec()).collect();
        *lock(&self.armed) = Some((markers, hold));
    }

    /// Waits until `n` requests have been held back (they may not have
    /// been delivered yet), or `limit` passes; returns how many were.
    pub async fn wait_held(&self, n: u64, limit: Duration) -> u64 {
        wait_for(&self.held, n, limit).await
    }

    /// Waits until `n` held requests have been delivered and answered with
    /// a success by the server, or `limit` passes; returns how many were.
    pub async fn wait_landed(&self, n: u64, limit: Duration) -> u64 {
        wait_for(&self.landed, n, limit).await
    }

    /// `http://host:port` to send requests to.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_for(count: &watch::Receiver<u64>, n: u64, limit: Duration) -> u64 {
    let mut rx = count.clone();
    let _ = tokio::time::timeout(limit, rx.wait_for(|c| *c >= n)).await;
    let c = *rx.borrow();
    c
}

/// Requests held back, and held requests the server answered.
type Counts = (watch::Sender<u64>, watch::Sender<u64>);

/// Copies both ways until either side closes, or until a request holding
/// the armed markers comes: that one is kept, then delivered to the server
/// on its own, and its answer read and dropped.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    armed: &Mutex<Armed>,
    (held_count, landed): &Counts,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    // While armed: what the client sent of a request not yet passed on, so
    // that a held request is held whole (its headers and body may come in
    // separate reads).
    let mut request: Vec<u8> = Vec::new();
    let (held, hold) = loop {
        tokio::select! {
            r = client.read(&mut up) => {
                let Ok(n @ 1..) = r else { return };
                let armed_now = lock(armed).is_some();
                if !armed_now && request.is_empty() {
                    if server.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                    continue;
                }
                request.extend_from_slice(&up[..n]);
                let Some(len) = request_len(&request) else { continue };
                if request.len() < len {
                    continue;
                }
                let rest = request.split_off(len);
                let hit = {
                    let mut a = lock(armed);
                    match a.as_ref() {
                        Some((markers, hold))
                            if markers.iter().all(|m| request.windows(m.len()).any(|w| w == m)) =>
                        {
                            let hold = *hold;
                            *a = None;
                            Some(hold)
                        }
                        _ => None,
                    }
                };
                if let Some(hold) = hit {
                    break (request, hold);
                }
                if server.write_all(&request).await.is_err() {
                    return;
                }
                request = rest;
            }
            r = server.read(&mut down) => {
                let Ok(n @ 1..) = r else { return };
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    held_count.send_modify(|h| *h += 1);
    // The client's side is left alone: it gives up by itself.
    tokio::time::sleep(hold).await;
    if server.write_all(&held).await.is_err() {
        return;
    }
    // Landed: the server ran it and said so (an error answer is not).
    if let Ok(Ok(n @ 1..)) = tokio::time::timeout(ANSWER_WAIT, server.read(&mut down)).await {
        if down[..n].starts_with(b"HTTP/1.1 2") {
            landed.send_modify(|l| *l += 1);
        }
    }
    drop(client);
}

/// The length of the HTTP/1.1 request at the start of `buf` (headers and a
/// `Content-Length` body), once its headers are in.
fn request_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let headers = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Some(end + body)
}
