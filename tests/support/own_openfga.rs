//! An OpenFGA server of a test's own, on a SQLite file, that the test can
//! kill and restart without losing data (the shared test server uses the
//! memory datastore, which a restart empties). Started by the project's one
//! launcher, `testenv`.
#![allow(dead_code)]

use std::time::Duration;

use fga_wb::openfga::{Client, Secret};
use testenv::{Datastore, OpenFga, OpenFgaOptions};

/// An OpenFGA process on a SQLite file in its own temp dir. Dropping it
/// kills the process and removes the dir (kept, with its logs, when the test
/// fails).
pub struct OwnOpenFga {
    server: OpenFga,
    /// The preshared key it was started with.
    pub key: String,
}

impl OwnOpenFga {
    /// Migrates a fresh SQLite datastore and starts the server on it.
    pub async fn start() -> OwnOpenFga {
        let server = OpenFga::start(OpenFgaOptions {
            datastore: Datastore::Sqlite,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("start an OpenFGA on SQLite: {e}"));
        let key = server.token().to_owned();
        OwnOpenFga { server, key }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn client(&self) -> Client {
        Client::builder(self.url())
            .api_token(Secret::new(self.key.clone()))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client for the own OpenFGA")
    }

    /// Starts the server again on the same ports and datastore and waits
    /// until it reports SERVING.
    pub async fn run(&mut self) {
        self.server
            .run()
            .await
            .unwrap_or_else(|e| panic!("restart OpenFGA: {e}"));
    }

    /// Kills the server (SIGKILL: a crash, no graceful drain) and waits for
    /// it to be gone.
    pub async fn kill(&mut self) {
        self.server.kill();
    }
}
