//! An OpenFGA served over HTTPS with a certificate from a private CA (made
//! here with `openssl`): reachable with `openfga.ca_file`, refused without.

mod support;

use std::path::Path;
use std::process::Command;

use fga_wb::openfga::Secret;
use fga_wb::{Config, WriteBehind};
use testenv::{OpenFga, OpenFgaOptions, Tls};

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate it signed for 127.0.0.1, in `dir`.
fn make_certificates(dir: &Path) -> Tls {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=fga-wb test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    Tls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openfga_behind_a_private_ca_is_reached_with_ca_file_only() {
    let dir = testenv::temp_dir("tls").unwrap();
    let tls = make_certificates(&dir);
    let server = OpenFga::start(OpenFgaOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .await
    .expect("OpenFGA over HTTPS");
    assert!(server.url().starts_with("https://"));

    let mut c = Config::default();
    c.openfga.api_url = server.url();
    c.openfga.api_token = Secret::new(server.token().to_owned());
    c.openfga.ca_file = tls.ca.display().to_string();
    let client = c.openfga.client().unwrap();
    let store = client
        .create_store("tls")
        .await
        .expect("reached with the CA");
    client
        .write_authorization_model(&store, &support::documents_model())
        .await
        .unwrap();
    c.openfga.store_id = store.clone();
    let wb = WriteBehind::builder(c.clone()).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:tls")
        .await
        .unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 1, "{r:?}");
    assert!(wb
        .check("user:anne", "viewer", "document:tls")
        .await
        .unwrap());
    wb.shutdown().await.unwrap();

    // Without the CA the server's certificate is not trusted.
    c.openfga.ca_file = String::new();
    let e = c.openfga.client().unwrap().health().await.unwrap_err();
    assert!(
        e.is_connect() || e.to_string().contains("certificate"),
        "{e}"
    );

    // A CA file that is not there is a clear configuration error.
    c.openfga.ca_file = dir.join("missing.pem").display().to_string();
    let e = c.openfga.client().unwrap_err();
    assert!(e.is_config() && e.to_string().contains("ca_file"), "{e}");
}

/// A Redis served over TLS (`rediss://`) with a certificate from a private
/// CA: the Redis store works through it with `redis.ca_file` (a grant, a
/// check, a flush to OpenFGA), and without the CA it is refused with an
/// error that points at `redis.ca_file`. Before, the redis crate was built
/// without TLS and every `rediss://` URL was refused as "not a Redis URL".
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_behind_a_private_ca_is_reached_with_ca_file() {
    let dir = testenv::temp_dir("redis-tls").unwrap();
    let tls = make_certificates(&dir);
    let (_redis, s, mut c) = tls_redis(&tls, "no", "redis-tls").await;
    let wb = WriteBehind::builder(c.clone()).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:tls")
        .await
        .unwrap();
    assert!(wb
        .check("user:anne", "viewer", "document:tls")
        .await
        .unwrap());
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(support::stored(&s).await, ["document:tls#viewer@user:anne"]);
    wb.shutdown().await.unwrap();

    // Without the CA the server's certificate is not trusted.
    c.redis.ca_file = String::new();
    let e = refused(c.clone(), "connected without trusting the server's CA").await;
    assert!(e.to_string().contains("redis.ca_file"), "{e}");

    // A file that is not PEM is named, not the URL.
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    c.redis.ca_file = file(&garbage);
    let e = refused(c.clone(), "built with a CA file that holds no certificate").await;
    assert!(
        e.is_config() && e.to_string().contains("redis.ca_file"),
        "{e}"
    );

    // A CA file that is not there is a clear configuration error.
    c.redis.ca_file = file(&dir.join("missing.pem"));
    let e = refused(c, "built with a CA file that is not there").await;
    assert!(
        e.is_config() && e.to_string().contains("redis.ca_file"),
        "{e}"
    );
}

/// A Redis that asks for client certificates (`tls-auth-clients yes`, as
/// mutual-TLS deployments run it) is reached with `redis.cert_file` and
/// `redis.key_file` (a certificate its CA signed); without them the
/// handshake is refused, and the error names the settings. One given
/// without the other is a configuration error; so is a key file that
/// cannot be used, named, its text never shown. Before, no client
/// certificate could be set.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_asks_for_client_certificates_is_reached_with_cert_and_key() {
    let dir = testenv::temp_dir("redis-mtls").unwrap();
    let tls = make_certificates(&dir);
    let run = |args: &str| openssl(&dir, &args.split(' ').collect::<Vec<_>>());
    run("req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=fga-wb");
    // With an extension, so a v3 certificate (rustls takes no other).
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    run("x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.cnf");
    let (_redis, s, mut c) = tls_redis(&tls, "yes", "redis-mtls").await;
    c.redis.cert_file = file(&dir.join("client.pem"));
    c.redis.key_file = file(&dir.join("client.key"));
    let wb = WriteBehind::builder(c.clone()).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:mtls")
        .await
        .unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(
        support::stored(&s).await,
        ["document:mtls#viewer@user:anne"]
    );
    wb.shutdown().await.unwrap();

    // Without a client certificate the server refuses the handshake.
    let mut without = c.clone();
    without.redis.cert_file = String::new();
    without.redis.key_file = String::new();
    let e = refused(without, "connected without a client certificate").await;
    assert!(e.to_string().contains("redis.cert_file"), "{e}");

    // One of the two alone.
    let mut alone = c.clone();
    alone.redis.key_file = String::new();
    let e = refused(alone, "built with a certificate and no key").await;
    assert!(
        e.is_config() && e.to_string().contains("go together"),
        "{e}"
    );

    // Key files that cannot be used are named, and their text never shown:
    // one that holds no key, an encrypted one, one pasted on a single line
    // with `\n` for its line breaks, and the key of another certificate.
    let key = std::fs::read_to_string(dir.join("client.key")).unwrap();
    let one_line = dir.join("one-line.key");
    std::fs::write(&one_line, key.trim_end().replace('\n', "\\n")).unwrap();
    run("pkey -in client.key -out encrypted.key -aes256 -passout pass:secret");
    for (bad, what) in [
        (tls.ca.clone(), "holds no private key"),
        (dir.join("encrypted.key"), "is encrypted"),
        (one_line, "holds no private key"),
        (tls.key.clone(), "cannot be reached with these TLS settings"),
    ] {
        let mut wrong = c.clone();
        wrong.redis.key_file = file(&bad);
        let e = refused(wrong, &format!("built with {bad:?} as the key")).await;
        let msg = e.to_string();
        assert!(e.is_config() && msg.contains(what), "{bad:?}: {msg}");
        let text = std::fs::read_to_string(&bad).unwrap();
        let body = text.lines().find(|l| l.len() > 40).unwrap_or(&text);
        assert!(!msg.contains(body), "{bad:?} shows the key: {msg}");
    }
}

/// A Redis with only a TLS port, its certificate from `tls`, asking for
/// client certificates as `auth_clients` (its `tls-auth-clients`) says; a
/// new store, and a config for both that trusts the CA.
#[cfg(feature = "redis")]
async fn tls_redis(
    tls: &Tls,
    auth_clients: &str,
    name: &str,
) -> (testenv::Redis, support::TestStore, Config) {
    let port = testenv::free_port().unwrap();
    let redis = testenv::Redis::start(testenv::RedisOptions {
        extra: vec![
            ("tls-port".into(), port.to_string()),
            ("tls-cert-file".into(), file(&tls.cert)),
            ("tls-key-file".into(), file(&tls.key)),
            ("tls-ca-cert-file".into(), file(&tls.ca)),
            ("tls-auth-clients".into(), auth_clients.into()),
        ],
        ..Default::default()
    })
    .await
    .expect("Redis with a TLS port");
    let s = support::new_store(name).await;
    let mut c = support::config_for(&s);
    c.buffer.store = fga_wb::config::StoreKind::Redis;
    c.redis.url = format!("rediss://127.0.0.1:{port}");
    c.redis.ca_file = file(&tls.ca);
    (redis, s, c)
}

#[cfg(feature = "redis")]
fn file(p: &Path) -> String {
    p.display().to_string()
}

/// The error of a handle built with `c`, which must fail (else: `wrong`).
#[cfg(feature = "redis")]
async fn refused(c: Config, wrong: &str) -> fga_wb::Error {
    match WriteBehind::builder(c).build().await {
        Ok(_) => panic!("{wrong}"),
        Err(e) => e,
    }
}
