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

/// A port for a Redis Cluster node: the node also listens on port + 10000
/// (its cluster bus), so both must be free, and both below Linux's
/// ephemeral range (32768+), where an outgoing connection could hold the
/// bus port.
pub fn free_cluster_port() -> Result<u16> {
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..500 {
        let port = 20_000 + (random() % 2_768) as u16;
        let bus = port + 10_000;
        if given.contains(&port) || given.contains(&bus) {
            continue;
        }
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(bus) {
            given.insert(port);
            given.insert(bus);
            return Ok(port);
        }
    }
    Err(Error::new(
        "no free loopback port pair (p, p + 10000) in 20000-32767",
    ))
}
