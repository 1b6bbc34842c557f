use std::collections::HashSet;
use std::sync::Mutex;

use crate::{random, Error, Result};

/// Ports handed out by this process, so two servers never get the same one
/// between the check and the bind.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port in 20000-32767: below Linux's ephemeral range
/// (32768+), so no outgoing connection can take it while a server is down
/// between a kill and a restart.
pub fn free_port() -> Result<u16> {
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..500 {
        let port = 20_000 + (random() % 12_768) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(Error::new("no free loopback port in 20000-32767"))
}
