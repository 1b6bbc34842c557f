//! What the loopback proxies share: a listener on a free port, the loop
//! that connects each accepted connection to the upstream, and a lock that
//! survives a panicked holder.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{Error, Result};

/// A listener on a free loopback port, and that port; `what` names the
/// proxy in errors.
pub(crate) async fn loopback(what: &str) -> Result<(TcpListener, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io(format!("bind the {what}"), e))?;
    let port = port_of(&listener, what)?;
    Ok((listener, port))
}

/// The port `listener` is bound to.
pub(crate) fn port_of(listener: &TcpListener, what: &str) -> Result<u16> {
    Ok(listener
        .local_addr()
        .map_err(|e| Error::io(format!("{what} address"), e))?
        .port())
}

/// Accepts connections on `listener` until the task is aborted and, each
/// in a task of its own, connects it to `upstream` (`host:port`) and runs
/// `relay` on the pair (client, server). A connection whose upstream
/// refuses is dropped.
pub(crate) fn relay_each<F, Fut>(listener: TcpListener, upstream: &str, relay: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let upstream = upstream.to_owned();
    let relay = Arc::new(relay);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, relay) = (upstream.clone(), relay.clone());
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(&upstream).await {
                    relay(client, server).await;
                }
            });
        }
    })
}

/// Locks `m`, also after a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
