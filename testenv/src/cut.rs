use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::relay::{lock, loopback, port_of, relay_each};
use crate::Result;

/// How long a cut connection waits for the server to fall quiet before it
/// closes: by then the server ran the request and sent its whole answer,
/// which is read and dropped, so the close is an orderly one (an unread
/// answer would make it a reset, which may discard the request unread).
const SETTLE: Duration = Duration::from_millis(300);

/// A TCP proxy on loopback that can lose one answer: the request reaches
/// the server, which runs it, and the connection is cut before the answer
/// gets back, as a dropped link or a timeout after the server ran the call
/// does. Everything else passes unchanged. Stops when dropped.
pub struct CutProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    marker: Arc<Mutex<Armed>>,
    cuts: Arc<AtomicU64>,
}

/// The marker to cut after, and how many requests holding it pass first.
type Armed = Option<(Vec<u8>, usize)>;

impl CutProxy {
    /// Forwards a new loopback port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<CutProxy> {
        let (listener, _) = loopback("cutting proxy").await?;
        Self::serve(listener, upstream)
    }

    /// Forwards `listener` (bound before the server it forwards to was
    /// told its port) to `upstream` (`host:port`).
    pub fn serve(listener: TcpListener, upstream: &str) -> Result<CutProxy> {
        let port = port_of(&listener, "cutting proxy")?;
        let marker: Arc<Mutex<Armed>> = Arc::default();
        let cuts: Arc<AtomicU64> = Arc::default();
        let (m, c) = (marker.clone(), cuts.clone());
        let task = relay_each(listener, upstream, move |client, server| {
            let (marker, cuts) = (m.clone(), c.clone());
            async move { relay(client, server, &marker, &cuts).await }
        });
        Ok(CutProxy {
            port,
            task,
            marker,
            cuts,
        })
    }

    /// The `nth` request from now holding `marker` (for Redis, a command's
    /// argument as RESP sends it, e.g. `$4\r\ntake\r\n`), counting from 1,
    /// reaches the server; its connection is then cut without the answer.
    pub fn cut_after(&self, marker: &[u8], nth: usize) {
        *lock(&self.marker) = Some((marker.to_vec(), nth.saturating_sub(1)));
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Acquire)
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes, or until a request holding
/// the armed marker has passed: then the server's answers are dropped until
/// it falls quiet, and both sides are closed.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    marker: &Mutex<Armed>,
    cuts: &AtomicU64,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    // The end of the last request bytes, to find a marker split by a read.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            r = cr.read(&mut up) => {
                let Ok(n @ 1..) = r else { return };
                tail.extend_from_slice(&up[..n]);
                let hit = {
                    let mut armed = lock(marker);
                    match armed.as_mut() {
                        Some((m, skip)) if tail.windows(m.len()).any(|w| w == m) => {
                            // Seen: not to be counted again in the next read.
                            tail.clear();
                            match skip.checked_sub(1) {
                                Some(left) => {
                                    *skip = left;
                                    false
                                }
                                None => {
                                    *armed = None;
                                    true
                                }
                            }
                        }
                        _ => false,
                    }
                };
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
                if hit {
                    break;
                }
                let keep = tail.len().saturating_sub(256);
                tail.drain(..keep);
            }
            r = sr.read(&mut down) => {
                let Ok(n @ 1..) = r else { return };
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    // The rest of the request may come in later reads: it still goes to
    // the server, and what the server answers is dropped, until it has
    // been quiet a while (and no longer than a few of those in all).
    let end = tokio::time::Instant::now() + SETTLE * 4;
    let mut quiet_at = tokio::time::Instant::now() + SETTLE;
    loop {
        tokio::select! {
            r = cr.read(&mut up) => match r {
                Ok(n @ 1..) => {
                    if sw.write_all(&up[..n]).await.is_err() {
                        break;
                    }
                }
                _ => break,
            },
            r = sr.read(&mut down) => match r {
                Ok(1..) => quiet_at = tokio::time::Instant::now() + SETTLE,
                _ => break,
            },
            () = tokio::time::sleep_until(quiet_at.min(end)) => break,
        }
    }
    cuts.fetch_add(1, Ordering::AcqRel);
    let _ = sw.shutdown().await;
    let _ = cw.shutdown().await;
}
