//! Set-up: the servers the section runs against (from `scripts/servers`), the store, the tuples.

use super::*;

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

pub(crate) struct Env {
    pub(crate) url: String,
    pub(crate) token: String,
    pub(crate) client: Client,
    pub(crate) model: serde_json::Value,
    pub(crate) scale: f64,
    /// The Redis that `scripts/servers` started (no persistence).
    pub(crate) redis_url: Option<String>,
}

impl Env {
    pub(crate) fn from_env() -> Res<Env> {
        let var = |n: &str| {
            std::env::var(n).map_err(|_| {
                format!(
                    "{n} is not set: run the benchmarks with scripts/bench, which starts OpenFGA"
                )
            })
        };
        let url = var("FGA_WB_TEST_OPENFGA_URL")?;
        let token = var("FGA_WB_TEST_OPENFGA_TOKEN")?;
        let client = Client::builder(&url)
            .api_token(Secret::new(token.clone()))
            .build()?;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let model = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let scale = match std::env::var("FGA_WB_BENCH_SCALE") {
            Ok(s) => s
                .parse::<f64>()
                .map_err(|e| format!("FGA_WB_BENCH_SCALE: {e}"))?,
            Err(_) => 1.0,
        };
        Ok(Env {
            url,
            token,
            client,
            model,
            scale,
            redis_url: std::env::var("FGA_WB_TEST_REDIS_URL").ok(),
        })
    }

    /// `n` scaled by `FGA_WB_BENCH_SCALE`, at least 1.
    pub(crate) fn n(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }

    /// The same settings, for another OpenFGA server.
    pub(crate) fn with_server(&self, url: &str, token: &str) -> Res<Env> {
        Ok(Env {
            url: url.to_owned(),
            token: token.to_owned(),
            client: Client::builder(url)
                .api_token(Secret::new(token.to_owned()))
                .build()?,
            model: self.model.clone(),
            scale: self.scale,
            redis_url: self.redis_url.clone(),
        })
    }

    /// A fresh store with the documents model.
    pub(crate) async fn store(&self, name: &str) -> Res<Store> {
        let id = self.client.create_store(name).await?;
        let model_id = self
            .client
            .write_authorization_model(&id, &self.model)
            .await?;
        Ok(Store { id, model_id })
    }

    /// Default settings, pointed at `store`.
    pub(crate) fn config(&self, store: &Store) -> Config {
        let mut c = Config::default();
        c.openfga.api_url.clone_from(&self.url);
        c.openfga.api_token = Secret::new(self.token.clone());
        c.openfga.store_id.clone_from(&store.id);
        c.openfga.model_id.clone_from(&store.model_id);
        c
    }

    /// Settings that never flush by themselves: only the buffer is measured.
    pub(crate) fn deferred_config(&self, store: &Store) -> Config {
        let mut c = self.config(store);
        c.buffer.capacity = 2_000_000;
        c.flush.batch_size = 100_000_000;
        c.flush.interval = Duration::from_secs(24 * 3600);
        c
    }

    /// The URL of the Redis that `scripts/servers` started.
    pub(crate) fn redis(&self) -> Res<String> {
        self.redis_url.clone().ok_or_else(|| {
            "FGA_WB_TEST_REDIS_URL is not set: run the benchmarks with scripts/bench, which starts Redis"
                .into()
        })
    }

    /// `c` with the Redis store at `url`.
    pub(crate) fn with_redis(mut c: Config, url: &str) -> Config {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = url.to_owned();
        c
    }

    /// How many tuples the store holds (Read, 100 per page).
    pub(crate) async fn count(&self, store: &Store) -> Res<usize> {
        Ok(self
            .client
            .read_all(&store.id, &ReadFilter::default())
            .await?
            .len())
    }
}

pub(crate) struct Store {
    pub(crate) id: String,
    pub(crate) model_id: String,
}

/// The i-th distinct tuple: 1000 users per document,
/// e.g. `user:user-0042 viewer document:doc-0000123`.
pub(crate) struct Tuples {
    pub(crate) user: String,
    pub(crate) object: String,
}

impl Tuples {
    pub(crate) fn new() -> Self {
        Tuples {
            user: String::with_capacity(32),
            object: String::with_capacity(32),
        }
    }

    /// Fills the buffers with the i-th tuple (no allocation after the first).
    pub(crate) fn set(&mut self, i: usize) -> (&str, &str) {
        self.user.clear();
        self.object.clear();
        let _ = write!(self.user, "user:user-{:04}", i % 1000);
        let _ = write!(self.object, "document:doc-{:07}", i / 1000);
        (&self.user, &self.object)
    }
}

pub(crate) fn tuple(i: usize) -> TupleKey {
    let mut t = Tuples::new();
    let (u, o) = t.set(i);
    TupleKey::new(u, RELATION, o).expect("valid tuple")
}

/// A small fast PRNG (splitmix64), so the benchmark needs no extra crate.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// An extra OpenFGA on the sqlite datastore (the memory datastore's Write
/// scans every stored tuple, so it cannot take 100k tuples in reasonable
/// time), from the project's one server launcher; stopped on drop.
pub(crate) async fn sqlite_openfga() -> Res<testenv::OpenFga> {
    Ok(testenv::OpenFga::start(testenv::OpenFgaOptions {
        datastore: testenv::Datastore::Sqlite,
        ..Default::default()
    })
    .await?)
}
