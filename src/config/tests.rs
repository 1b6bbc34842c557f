use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load_env(pairs: &[(&str, &str)]) -> Result<Config> {
    Config::load_from(None, env(pairs))
}

#[test]
fn defaults_load_without_a_file() {
    let c = load_env(&[]).unwrap();
    assert_eq!(c.flush.max_tuples_per_write, 100);
    assert_eq!(c.queue.retry_schedule.len(), 3);
}

#[test]
fn env_overrides_and_nests() {
    let c = load_env(&[
        ("FGA_WB_FLUSH__BATCH_SIZE", "500"),
        ("FGA_WB_FLUSH__INTERVAL", "250ms"),
        ("FGA_WB_BUFFER__OVERFLOW", "reject"),
        ("FGA_WB_QUEUE__RETRY_SCHEDULE", "[\"1s\", \"2s\"]"),
        ("FGA_WB_TEST_OPENFGA_URL", "http://ignored"),
        ("FGA_WB_CONFIG_UNUSED", "x"),
    ])
    .unwrap();
    assert_eq!(c.flush.batch_size, 500);
    assert_eq!(c.flush.interval, Duration::from_millis(250));
    assert_eq!(c.buffer.overflow, Overflow::Reject);
    assert_eq!(
        c.queue.retry_schedule,
        vec![Duration::from_secs(1), Duration::from_secs(2)]
    );
}

#[test]
fn durations_too_long_for_the_runtime_are_refused_by_name() {
    for (var, value) in [
        ("FGA_WB_CACHE__TTL", "2000y"),
        ("FGA_WB_FLUSH__INTERVAL", "18446744073709551615s"),
        ("FGA_WB_CHECK__REVOKE_WAIT_TIMEOUT", "18446744073709551615s"),
        ("FGA_WB_FLUSH__SHUTDOWN_DEADLINE", "11y"),
    ] {
        let e = Config::load_from(None, vec![(var.into(), value.into())]).unwrap_err();
        let text = e.to_string();
        assert!(e.is_config(), "{var}: {text}");
        assert!(
            text.contains("10 years") && text.contains(var),
            "{var}: {text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }
    assert!(Config::load_from(None, vec![("FGA_WB_CACHE__TTL".into(), "3650days".into())]).is_ok());
}

#[test]
fn numeric_looking_ids_stay_strings() {
    let c = load_env(&[
        ("FGA_STORE_ID", "0123"),
        ("FGA_WB_OPENFGA__MODEL_ID", "00042"),
        ("FGA_API_TOKEN", "1e5"),
    ])
    .unwrap();
    assert_eq!(c.openfga.store_id, "0123");
    assert_eq!(c.openfga.model_id, "00042");
    assert_eq!(c.openfga.api_token.expose(), "1e5");
}

#[test]
fn fga_wb_vars_beat_openfga_cli_vars() {
    let c = load_env(&[
        ("FGA_API_URL", "http://a:1"),
        ("FGA_WB_OPENFGA__API_URL", "http://b:2"),
    ])
    .unwrap();
    assert_eq!(c.openfga.api_url, "http://b:2");
}

#[test]
fn variables_that_configure_nothing_are_refused_with_the_name_that_works() {
    let e = load_env(&[("FGA_WB_FLUSH_BATCH_SIZE", "10")]).unwrap_err();
    assert!(e.is_config());
    assert!(e.to_string().contains("FGA_WB_FLUSH__BATCH_SIZE"), "{e}");
    let e = load_env(&[("FGA_WB_NOPE__X", "1")]).unwrap_err();
    assert!(e.to_string().contains("no section \"nope\""), "{e}");
    let e = load_env(&[("FGA_WB_FLUHS__INTERVAL", "1s")]).unwrap_err();
    assert!(e.to_string().contains("FGA_WB_FLUSH__INTERVAL"), "{e}");
    // A whole section in one variable.
    let e = load_env(&[("FGA_WB_REDIS", "redis://h:1")]).unwrap_err();
    assert!(e.to_string().contains("FGA_WB_REDIS__<KEY>"), "{e}");
    assert!(e.to_string().contains("url"), "{e}");
    assert!(!e.to_string().contains("redis://h:1"), "{e}");
    // The scripts' own variables are not settings.
    for name in [
        "FGA_WB_CACHE",
        "FGA_WB_TEST_REDIS_URL",
        "FGA_WB_OPENFGA_VERSION",
        "FGA_WB_KEEP_TMP",
    ] {
        assert!(load_env(&[(name, "x")]).is_ok(), "{name}");
    }
}

#[test]
fn fga_cli_client_credentials_are_read() {
    let c = load_env(&[
        ("FGA_API_URL", "https://api.fga.example"),
        ("FGA_CLIENT_ID", "12345"),
        ("FGA_CLIENT_SECRET", "s3cret"),
        ("FGA_API_TOKEN_ISSUER", "auth.fga.dev"),
        ("FGA_API_AUDIENCE", "https://api.fga.example/"),
        ("FGA_API_SCOPES", "read write"),
    ])
    .unwrap();
    let o = c.openfga.oauth2.expect("client credentials");
    assert_eq!(o.token_url, "https://auth.fga.dev/oauth/token");
    assert_eq!(o.client_id, "12345");
    assert_eq!(o.client_secret.expose(), "s3cret");
    assert_eq!(o.audience, "https://api.fga.example/");
    assert_eq!(o.scopes, "read write");
    assert_eq!(
        token_url_of_issuer("https://issuer.example/v1/token"),
        "https://issuer.example/v1/token"
    );
    assert_eq!(
        token_url_of_issuer("http://127.0.0.1:9000"),
        "http://127.0.0.1:9000/oauth/token"
    );
}

/// Credentials are picked as the `fga` CLI picks them: an API token first
/// (client-credential variables left over beside it are not used), then
/// client credentials, which must then be whole. Before, any of the five
/// variables made client credentials win over a token, and leftovers
/// without a client id failed the start with a missing field.
#[test]
fn an_api_token_wins_over_client_credentials_as_in_the_fga_cli() {
    let leftovers = [
        ("FGA_API_TOKEN_ISSUER", "auth.fga.dev"),
        ("FGA_API_AUDIENCE", "https://api.fga.example/"),
    ];
    let whole = [
        ("FGA_CLIENT_ID", "client"),
        ("FGA_CLIENT_SECRET", "pw-client"),
    ];
    for (token, extra) in [
        ("FGA_API_TOKEN", &[][..]),
        ("FGA_API_TOKEN", &whole[..]),
        // The `--api-token` flag's layer.
        ("FGA_WB_OPENFGA__API_TOKEN", &whole[..]),
    ] {
        let vars: Vec<_> = [(token, "tok")]
            .into_iter()
            .chain(leftovers)
            .chain(extra.iter().copied())
            .collect();
        let c = load_env(&vars).unwrap();
        assert!(
            matches!(c.openfga.credentials(), Credentials::ApiToken(ref t) if t.expose() == "tok"),
            "{vars:?}"
        );
    }
    let e = load_env(&leftovers).unwrap_err().to_string();
    assert!(
        e.contains("FGA_CLIENT_ID") && e.contains("FGA_CLIENT_SECRET"),
        "{e}"
    );
    assert!(!e.contains("FGA_API_TOKEN_ISSUER"), "{e}");
    let vars: Vec<_> = leftovers.into_iter().chain(whole).collect();
    let c = load_env(&vars).unwrap();
    assert!(matches!(
        c.openfga.credentials(),
        Credentials::ClientCredentials(_)
    ));
}

/// A newline at the end of a client id or secret (as `echo` writes into a
/// Kubernetes Secret) is named at the start; the token endpoint's 401 did
/// not say why.
#[test]
fn whitespace_around_client_credentials_is_refused() {
    for (name, value) in [
        ("FGA_CLIENT_SECRET", "pw-client\n"),
        ("FGA_CLIENT_ID", " client"),
    ] {
        let mut vars = vec![
            ("FGA_API_TOKEN_ISSUER", "auth.fga.dev"),
            ("FGA_CLIENT_ID", "client"),
            ("FGA_CLIENT_SECRET", "pw-client"),
        ];
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
        let e = load_env(&vars).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
        assert!(!e.contains("pw-client"), "{e}");
    }
}

#[test]
fn a_key_prefix_that_would_match_other_keys_is_refused() {
    for prefix in ["fga-wb*", "a?b", "x[1]", "a\\b", "a{b}", "a b", ""] {
        let e = load_env(&[("FGA_WB_REDIS__KEY_PREFIX", prefix)]).unwrap_err();
        assert!(e.to_string().contains("redis.key_prefix"), "{prefix}: {e}");
    }
    assert!(load_env(&[("FGA_WB_REDIS__KEY_PREFIX", "team-a:fga.wb_1")]).is_ok());
}

/// A store id names its Redis keys too: a typo like `FGA_STORE_ID='*'` in
/// queue mode (where nothing asks OpenFGA) made `status` count, and the
/// sweep delete, other stores' keys.
#[test]
fn a_store_id_that_would_match_other_keys_is_refused() {
    for id in ["*", "01J?", "a[1]", "{x}", "a b"] {
        let e = load_env(&[("FGA_STORE_ID", id)]).unwrap_err();
        assert!(e.to_string().contains("openfga.store_id"), "{id}: {e}");
    }
    assert!(load_env(&[("FGA_STORE_ID", "01J8Z6W2X1K3M4N5P6Q7R8S9T0")]).is_ok());
}

#[test]
fn empty_fga_cli_variables_are_unset() {
    let c = load_env(&[
        ("FGA_API_TOKEN", "tok"),
        ("FGA_CLIENT_ID", ""),
        ("FGA_CLIENT_SECRET", ""),
        ("FGA_API_TOKEN_ISSUER", ""),
        ("FGA_API_AUDIENCE", " "),
        ("FGA_MODEL_ID", ""),
    ])
    .unwrap();
    assert!(c.openfga.oauth2.is_none());
    assert!(matches!(c.openfga.credentials(), Credentials::ApiToken(_)));
    assert!(load_env(&[("FGA_API_AUDIENCE", "")]).is_ok());
    // An empty FGA_MODEL_ID leaves the file's pinned model alone.
    let dir = std::env::temp_dir().join(format!("fga-wb-cfg-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("pinned.toml");
    std::fs::write(&f, "[openfga]\nmodel_id = \"01JPINNED00000000000000000\"\n").unwrap();
    let c = Config::load_from(Some(&f), env(&[("FGA_MODEL_ID", "")])).unwrap();
    assert_eq!(c.openfga.model_id, "01JPINNED00000000000000000");
}

#[test]
fn bad_integer_names_the_variable() {
    let e = load_env(&[("FGA_WB_FLUSH__BATCH_SIZE", "ten")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "configuration error: FGA_WB_FLUSH__BATCH_SIZE: expected a positive integer, found \"ten\""
    );
    let e = load_env(&[("FGA_WB_FLUSH__BATCH_SIZE", "0")]).unwrap_err();
    assert!(e.to_string().contains("positive integer"), "{e}");
    let e = load_env(&[("FGA_WB_BUFFER__DEAD_LETTER_CAPACITY", "0")]).unwrap_err();
    assert!(e.to_string().contains("positive integer"), "{e}");
    let c = load_env(&[("FGA_WB_BUFFER__DEAD_LETTER_CAPACITY", "250")]).unwrap();
    assert_eq!(c.buffer.dead_letter_capacity, 250);
}

#[test]
fn bad_duration_and_enum_are_explained() {
    let e = load_env(&[("FGA_WB_FLUSH__INTERVAL", "5")]).unwrap_err();
    assert!(e.to_string().contains("FGA_WB_FLUSH__INTERVAL"), "{e}");
    assert!(e.to_string().contains("\"5s\""), "{e}");
    let e = load_env(&[("FGA_WB_BUFFER__STORE", "disk")]).unwrap_err();
    assert!(e.to_string().contains("memory, redis"), "{e}");
}

#[test]
fn the_shipped_file_loads_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
    let c = Config::load_from(Some(&path), vec![]).unwrap();
    let d = Config::default();
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        serde_json::to_value(&d).unwrap(),
        "config/fga-wb.toml must document the defaults"
    );
}

#[test]
fn bad_file_value_names_the_key_and_file() {
    let dir = std::env::temp_dir().join(format!("fga-wb-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "[flush]\nbatch_size = \"ten\"\n").unwrap();
    let e = Config::load_from(Some(&f), vec![]).unwrap_err();
    assert!(e.to_string().contains("flush.batch_size in"), "{e}");
    std::fs::write(&f, "[flush]\nbatchsize = 3\n").unwrap();
    let e = Config::load_from(Some(&f), vec![]).unwrap_err();
    assert!(
        e.to_string().contains("unknown setting \"batchsize\""),
        "{e}"
    );
    let e = Config::load_from(Some(&dir.join("missing.toml")), vec![]).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

/// A file that does not parse, or a secret of the wrong type: the error
/// says where and why, and never quotes the secret.
#[test]
fn bad_file_never_quotes_a_secret() {
    let dir = std::env::temp_dir().join(format!("fga-wb-cfg-s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    for (text, says) in [
        ("[openfga]\napi_token = \"pw\\qfile\"\n", "line 2"),
        ("[openfga]\napi_token = 12345678\n", "openfga.api_token in"),
        (
            "[openfga.oauth2]\ntoken_url = \"https://a\"\nclient_id = \"c\"\nclient_secret = [\"pw-list\"]\n",
            "client_secret",
        ),
        ("[redis]\nurl = 7\n[openfga]\napi_token = \"x\"\napi_token = \"pw-twice\"\n", "line"),
    ] {
        std::fs::write(&f, text).unwrap();
        let e = Config::load_from(Some(&f), vec![]).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        for secret in ["pw", "12345678"] {
            assert!(!e.contains(secret), "{secret} in {e}");
        }
    }
}

/// A private key pasted into `redis.key_file` (the file's text for its
/// name) is refused without being shown, and neither `{:?}` nor the
/// serialised config shows it. Before, "cannot be read" quoted it whole.
#[test]
fn a_key_given_for_its_file_name_is_never_shown() {
    let key = "-----BEGIN PRIVATE KEY-----\nMIIEvQ-secret-key\n-----END PRIVATE KEY-----\n";
    let e = load_env(&[("FGA_WB_REDIS__KEY_FILE", key)]).expect_err("a file's text");
    assert!(!e.to_string().contains("secret-key"), "{e}");
    assert!(e.to_string().contains("redis.key_file"), "{e}");
    let mut c = Config::default();
    c.redis.key_file = key.into();
    for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
        assert!(!shown.contains("secret-key"), "{shown}");
    }
    let e = c.validate().expect_err("a file's text");
    assert!(!e.to_string().contains("secret-key"), "{e}");
    // In base64, as a Kubernetes secret holds it.
    c.redis.key_file = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUV2US1zZWNyZXQ".into();
    assert!(format!("{c:?} {:?}", c.validate()).contains("not shown"));
    assert!(!format!("{c:?} {:?}", c.validate()).contains("LS0t"));
}

/// Neither serialised (`status --json`) nor `{:?}` config shows a token, a
/// client secret or a password in a URL, whatever the password holds.
#[test]
fn secrets_never_serialise() {
    let c = load_env(&[
        ("FGA_API_TOKEN", "s3cret"),
        ("FGA_API_URL", "http://proxy:pw-api@127.0.0.1:8080"),
        (
            "FGA_API_TOKEN_ISSUER",
            "https://auth:pw-issuer@issuer.example/oauth/token",
        ),
        ("FGA_CLIENT_ID", "client"),
        ("FGA_CLIENT_SECRET", "pw-client"),
        (
            "FGA_WB_REDIS__URL",
            "redis://:pw/red#is?@127.0.0.1:6379,redis://:pw-two@127.0.0.1:6380",
        ),
    ])
    .unwrap();
    let s = serde_json::to_string(&c).unwrap();
    let d = format!("{c:?}");
    for shown in [&s, &d] {
        for secret in [
            "s3cret",
            "pw-api",
            "pw-issuer",
            "pw-client",
            "pw/red",
            "pw-two",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
    assert!(d.contains("127.0.0.1:6379"), "{d}");
}

/// Request sizes that would overflow the windows derived from them are
/// refused with the bound, not a panic at the first flush.
#[test]
fn huge_request_settings_are_refused() {
    for var in [
        "FGA_WB_FLUSH__MAX_TUPLES_PER_WRITE",
        "FGA_WB_FLUSH__MAX_PARALLEL_REQUESTS",
    ] {
        let e = load_env(&[(var, "18446744073709551615")]).unwrap_err();
        assert!(e.to_string().contains("must be at most 100000"), "{e}");
    }
    assert!(load_env(&[("FGA_WB_FLUSH__MAX_TUPLES_PER_WRITE", "1000")]).is_ok());
}

/// A shutdown deadline is at most a day (read ones are at most 10 years,
/// one set in code could be `Duration::MAX`: added to the clock at a stop,
/// it would panic).
#[test]
fn shutdown_deadline_is_bounded() {
    let e = load_env(&[("FGA_WB_FLUSH__SHUTDOWN_DEADLINE", "2d")]).unwrap_err();
    assert!(e.to_string().contains("at most 24h"), "{e}");
    assert!(load_env(&[("FGA_WB_FLUSH__SHUTDOWN_DEADLINE", "24h")]).is_ok());
}

/// A lease so long that heartbeats come less often than the Redis store
/// remembers a writer's term would strand what the writer holds.
#[test]
fn writer_lease_is_bounded() {
    let e = load_env(&[("FGA_WB_REDIS__WRITER_LEASE", "1h")]).unwrap_err();
    assert!(e.to_string().contains("at most 10m"), "{e}");
    assert!(load_env(&[("FGA_WB_REDIS__WRITER_LEASE", "10m")]).is_ok());
}

/// Sizes set in code are checked as those read are: a 0 made the flusher
/// spin on empty windows, and a huge worker concurrency panicked in the
/// job runner's semaphore.
#[test]
fn sizes_set_in_code_are_checked() {
    let mut c = Config::default();
    c.flush.max_tuples_per_write = 0;
    let e = c.validate().unwrap_err();
    assert!(
        e.to_string().contains("flush.max_tuples_per_write is 0"),
        "{e}"
    );
    let mut c = Config::default();
    c.queue.worker_concurrency = usize::MAX / 2;
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("queue.worker_concurrency"), "{e}");
}

/// Durations set in code are bounded as those read are: a backoff of
/// `Duration::MAX` panicked at the first auth failure, adding it to the
/// clock.
#[test]
fn durations_set_in_code_are_checked() {
    let mut c = Config::default();
    c.flush.retry_max_backoff = Duration::MAX;
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("flush.retry_max_backoff"), "{e}");
    let mut c = Config::default();
    c.queue.retry_schedule = vec![Duration::from_secs(10), Duration::MAX];
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("queue.retry_schedule"), "{e}");
    let mut c = Config::default();
    c.buffer.block_timeout = Duration::from_secs(10 * 365 * 24 * 3600);
    assert!(c.validate().is_ok());
}

/// Pauses of zero would retry a failing OpenFGA, or poll Redis from an
/// idle worker, with no pause at all: refused by name.
#[test]
fn zero_pauses_are_refused() {
    let e = load_env(&[("FGA_WB_FLUSH__RETRY_INITIAL_BACKOFF", "0s")]).unwrap_err();
    assert!(
        e.to_string().contains("flush.retry_initial_backoff is 0"),
        "{e}"
    );
    let e = load_env(&[("FGA_WB_QUEUE__POLL_INTERVAL", "0ms")]).unwrap_err();
    assert!(e.to_string().contains("queue.poll_interval"), "{e}");
    assert!(load_env(&[("FGA_WB_QUEUE__POLL_INTERVAL", "1ms")]).is_ok());
}

/// A look every millisecond, at the model in OpenFGA or at dead letters
/// in Redis, would load the server for nothing: below 100 ms is refused
/// by name, zero (never) is not.
#[test]
fn looks_more_often_than_every_100ms_are_refused() {
    for (var, name) in [
        (
            "FGA_WB_OPENFGA__MODEL_REFRESH",
            "openfga.model_refresh is 1ms",
        ),
        (
            "FGA_WB_QUEUE__REPLAY_TRANSIENT",
            "queue.replay_transient is 1ms",
        ),
    ] {
        let e = load_env(&[(var, "1ms")]).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        assert!(load_env(&[(var, "0s")]).is_ok(), "{var}");
        assert!(load_env(&[(var, "100ms")]).is_ok(), "{var}");
    }
}

/// A timeout of zero, often meant as "no limit", is no time at all to
/// reqwest: every request would time out, each Write held as an unknown
/// outcome and retried for good. Refused by name.
#[test]
fn zero_timeouts_are_refused() {
    for (var, name) in [
        (
            "FGA_WB_OPENFGA__REQUEST_TIMEOUT",
            "openfga.request_timeout is 0",
        ),
        (
            "FGA_WB_OPENFGA__CONNECT_TIMEOUT",
            "openfga.connect_timeout is 0",
        ),
    ] {
        let e = load_env(&[(var, "0s")]).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
    }
}

/// An API token HTTP headers cannot carry (a newline at its end, as `echo`
/// writes into a Kubernetes Secret, or other whitespace or control
/// characters) is refused by name, without showing it. Before, every
/// request failed as "cannot reach OpenFGA", and every Write was held as
/// one whose outcome was unknown.
#[test]
fn an_api_token_headers_cannot_carry_is_refused_without_showing_it() {
    for bad in [
        "s3cret-token\n",
        " s3cret-token",
        "s3cret\ttoken",
        "s3cret\u{7f}",
    ] {
        let e = load_env(&[("FGA_API_TOKEN", bad)]).unwrap_err();
        let shown = e.to_string();
        assert!(
            e.is_config() && shown.contains("openfga.api_token"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "the token is shown: {shown}");
    }
    assert!(load_env(&[("FGA_API_TOKEN", "abc.DEF-123_~+/=")]).is_ok());
}

/// A choice is taken by its name only: a number is refused. Before,
/// figment handed it to the enum as a variant's index: `1` picked the
/// second choice (the Redis store, queue mode, `fail`), silently.
#[test]
fn choices_given_as_numbers_are_refused() {
    for (name, value) in [
        ("FGA_WB_BUFFER__STORE", "1"),
        ("FGA_WB_FLUSH__MODE", "1"),
        ("FGA_WB_BUFFER__OVERFLOW", "2"),
        ("FGA_WB_REDIS__FEWER_REPLICAS", "1"),
        ("FGA_WB_BUFFER__STORE", "0"),
    ] {
        let r = load_env(&[(name, value)]);
        let e = r.as_ref().map(|_| ()).unwrap_err();
        assert!(e.is_config(), "{name}={value}: {e}");
        assert!(e.to_string().contains("string"), "{name}={value}: {e}");
    }
    let dir = std::env::temp_dir().join(format!("fga-wb-cfg-enum-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("numbered.toml");
    std::fs::write(&f, "[buffer]\noverflow = 2\n").unwrap();
    let e = Config::load_from(Some(&f), vec![]).unwrap_err();
    assert!(e.to_string().contains("buffer.overflow in"), "{e}");
    let c = load_env(&[
        ("FGA_WB_BUFFER__STORE", "redis"),
        ("FGA_WB_FLUSH__MODE", "queue"),
    ])
    .unwrap();
    assert_eq!(
        (c.buffer.store, c.flush.mode),
        (StoreKind::Redis, Mode::Queue)
    );
}
