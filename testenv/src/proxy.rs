use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::relay::{lock, loopback, relay_each};
use crate::Result;

/// A TCP proxy on loopback that delays every byte by a fixed time in each
/// direction, like a server one network hop away, and counts the OpenFGA
/// Write requests that pass and the statuses they were answered with (HTTP/1.1,
/// one request at a time per connection, as reqwest sends them). Stops when
/// dropped.
pub struct DelayProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    counts: Arc<Mutex<WriteCounts>>,
}

/// What a [`DelayProxy`] saw of Write requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Write requests sent through the proxy.
    pub sent: u64,
    /// Their answers, by HTTP status (a request cut off has none).
    pub answered: BTreeMap<u16, u64>,
}

/// Per connection: whether each request in flight is a Write, in order.
type InFlight = Arc<Mutex<VecDeque<bool>>>;

impl DelayProxy {
    /// Forwards a new loopback port to `upstream` (`host:port`), adding
    /// `one_way` in each direction (the round trip grows by twice that).
    pub async fn start(upstream: &str, one_way: Duration) -> Result<DelayProxy> {
        let (listener, port) = loopback("delay proxy").await?;
        let counts: Arc<Mutex<WriteCounts>> = Arc::default();
        let all = counts.clone();
        let task = relay_each(listener, upstream, move |client, server| {
            let counts = all.clone();
            async move {
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let in_flight: InFlight = Arc::default();
                let up = Watch::Requests(in_flight.clone(), counts.clone());
                tokio::spawn(pipe(cr, sw, one_way, up));
                pipe(sr, cw, one_way, Watch::Responses(in_flight, counts)).await;
            }
        });
        Ok(DelayProxy { port, task, counts })
    }

    /// The Write requests seen so far.
    pub fn write_counts(&self) -> WriteCounts {
        lock(&self.counts).clone()
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which direction a pipe carries, and where it counts.
enum Watch {
    Requests(InFlight, Arc<Mutex<WriteCounts>>),
    Responses(InFlight, Arc<Mutex<WriteCounts>>),
}

impl Watch {
    /// Counts request lines (`POST /stores/<id>/write HTTP/1.1`) or status
    /// lines (`HTTP/1.1 409 ...`) in `text`: the bytes read so far that
    /// were not yet looked at, from the start of a line.
    fn see(&self, text: &str) {
        for line in text.split("\r\n") {
            match self {
                Watch::Requests(in_flight, counts) => {
                    // A body has no line break at its end: the next request
                    // line follows it on the same "line".
                    let start = ["POST /", "GET /", "PUT /", "DELETE /"]
                        .iter()
                        .filter_map(|m| line.find(m))
                        .min();
                    if let Some(i) = start.filter(|_| line.ends_with(" HTTP/1.1")) {
                        let path = line[i..].split(' ').nth(1).unwrap_or("");
                        let write = path.ends_with("/write");
                        lock(in_flight).push_back(write);
                        if write {
                            lock(counts).sent += 1;
                        }
                    }
                }
                Watch::Responses(in_flight, counts) => {
                    if let Some(rest) = line.find("HTTP/1.1 ").map(|i| &line[i + 9..]) {
                        let status = rest.get(..3).and_then(|s| s.parse::<u16>().ok());
                        let write = lock(in_flight).pop_front().unwrap_or(false);
                        if let (true, Some(status)) = (write, status) {
                            *lock(counts).answered.entry(status).or_default() += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Copies `from` to `to`, each chunk no sooner than `delay` after it was
/// read, and shows `watch` every complete line that passes (bodies are
/// JSON on one line, so only request and status lines match).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    watch: Watch,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    // The bytes after the last line break seen, to join lines cut by a read.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                if let Some(end) = partial.windows(2).rposition(|w| w == b"\r\n") {
                    watch.see(&String::from_utf8_lossy(&partial[..end]));
                    partial.drain(..end + 2);
                }
                if partial.len() > 64 * 1024 {
                    // A long body line: nothing to count in it.
                    partial.clear();
                }
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
