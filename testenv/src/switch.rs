use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use crate::relay::{lock, loopback};
use crate::Result;

/// A TCP proxy on loopback whose upstream can be changed: connections made
/// after the change go to the new upstream, those made before stay where
/// they are, as with a DNS name or a managed Redis's endpoint moved to a
/// new primary by a failover. Stops accepting when dropped (connections
/// already made run until either side closes).
pub struct SwitchProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    upstream: Arc<Mutex<String>>,
}

impl SwitchProxy {
    /// Forwards a new loopback port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<SwitchProxy> {
        let (listener, port) = loopback("switching proxy").await?;
        let to = Arc::new(Mutex::new(upstream.to_owned()));
        let current = to.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = lock(&current).clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(SwitchProxy {
            port,
            task,
            upstream: to,
        })
    }

    /// New connections go to `upstream` (`host:port`) from now on.
    pub fn switch_to(&self, upstream: &str) {
        *lock(&self.upstream) = upstream.to_owned();
    }

    /// `host:port` to connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for SwitchProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
