//! The HTTP gateway (`transdb serve --http`), end to end: keys (binary values, missing
//! keys, idempotent deletes, percent-encoded keys, size limits), authentication and roles,
//! the lock wait before a key request is ordered (503 and nothing done, or served once the
//! lock frees), procedure calls, `/metrics` against known traffic, `/health`, routing
//! errors, shutdown, and `transdb serve --http` as a child process.
//!
//! Every HTTP request is a blocking `ureq` call on a `spawn_blocking` thread, so the
//! in-process server keeps its runtime's workers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use transdb_host::http::LOCK_WAIT;
use transdb_host::lock_manager::{LockSet, Mode, lock_id};
use transdb_proto::Role;
use transdb_proto::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use transdb_tests::{ChildServer, PATIENCE, TestServer, admin_token, procedure_module};

/// Error codes as the JSON error bodies carry them.
const KEY_TOO_LARGE: u64 = 2;
const VALUE_TOO_LARGE: u64 = 3;
const UNAUTHENTICATED: u64 = 35;
const PERMISSION_DENIED: u64 = 36;
const MODULE_NOT_FOUND: u64 = 49;
const PROCEDURE_NOT_FOUND: u64 = 50;
const ABORTED: u64 = 64;
const INVALID_ARGUMENTS: u64 = 68;

/// A server with the HTTP gateway on a free loopback port.
async fn start() -> TestServer {
    TestServer::start_with(|config| {
        config.http = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

/// An HTTP client of one server's gateway.
#[derive(Clone)]
struct Http {
    agent: ureq::Agent,
    base: String,
}

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
    /// From just before the request was sent to the end of the answer's body.
    elapsed: Duration,
    /// When the answer's body had arrived.
    finished: Instant,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("an ASCII header value"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "the body is not JSON ({error}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` object of a JSON error answer, checked for its shape.
    fn error(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "an error answer is JSON: {self:?}"
        );
        let error = self.json()["error"].clone();
        assert!(error["name"].is_string(), "{error}");
        assert!(error["message"].is_string(), "{error}");
        error
    }

    /// The numeric code of a JSON error answer (`None` for gateway errors without one).
    fn error_code(&self) -> Option<u64> {
        self.error()["code"].as_u64()
    }

    fn error_name(&self) -> String {
        self.error()["name"].as_str().unwrap().to_owned()
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }
}

impl Http {
    fn new(test: &TestServer) -> Http {
        Http::at(test.server.http_addr().expect("the HTTP gateway is on"))
    }

    fn at(address: SocketAddr) -> Http {
        assert!(address.ip().is_loopback(), "{address}");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .new_agent();
        Http {
            agent,
            base: format!("http://{address}"),
        }
    }

    /// Sends `method path` with `token` as bearer token (if any) and `body` (if any).
    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let authorization = token.map(|token| format!("Bearer {token}"));
        self.send_with(method, path, authorization, body).await
    }

    /// Sends `method path` with `authorization` as the `Authorization` header (if any) and
    /// `body` (if any), from a blocking thread.
    async fn send_with(
        &self,
        method: &str,
        path: &str,
        authorization: Option<String>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let http = self.clone();
        let (method, path) = (method.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || http.blocking(&method, &path, authorization, body))
            .await
            .expect("the HTTP request's thread")
    }

    /// [`Http::send_with`] on this thread (never on a runtime's worker).
    fn blocking(
        &self,
        method: &str,
        path: &str,
        authorization: Option<String>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let started = Instant::now();
        let response = match body {
            Some(body) => self.agent.run(request.body(body).unwrap()),
            None => self.agent.run(request.body(()).unwrap()),
        };
        let mut response =
            response.unwrap_or_else(|error| panic!("{method} {path} failed: {error}"));
        let body = response
            .body_mut()
            .with_config()
            .limit(2 * MAX_VALUE_BYTES as u64)
            .read_to_vec()
            .unwrap_or_else(|error| panic!("reading the body of {method} {path}: {error}"));
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body,
            elapsed: started.elapsed(),
            finished: Instant::now(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("GET", path, token, None).await
    }

    async fn put(&self, path: &str, token: Option<&str>, body: impl Into<Vec<u8>>) -> Reply {
        self.send("PUT", path, token, Some(body.into())).await
    }

    async fn delete(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("DELETE", path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: impl Into<Vec<u8>>) -> Reply {
        self.send("POST", path, token, Some(body.into())).await
    }
}

/// `/keys/` and `key` percent-encoded (every byte but the unreserved ones).
fn key_path(key: &str) -> String {
    let mut path = String::from("/keys/");
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path
}

/// Keys in the store, summed over its shards (as `Stats` reports them).
async fn stored_keys(client: &transdb_client::Client) -> u64 {
    client
        .stats()
        .await
        .unwrap()
        .shards
        .iter()
        .map(|shard| shard.keys)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_round_trip_binary_values_and_percent_encoded_keys_and_enforce_limits() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let token = Some(token.as_str());
    let client = test.client().await;

    // Every byte value, zeros and invalid UTF-8 included.
    let mut value: Vec<u8> = (0..=255u8).collect();
    value.extend_from_slice(&[0, 0, 0xFF, 0xFE, 0xC3, 0x28, 0x80, 0]);
    assert!(std::str::from_utf8(&value).is_err());
    let put = http.put("/keys/binary", token, value.clone()).await;
    assert_eq!(put.status, 200, "{put:?}");
    let got = http.get("/keys/binary", token).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.body, value, "exactly the bytes that were put");
    assert_eq!(client.get("binary").await.unwrap(), Some(value.clone()));

    // A missing key.
    let missing = http.get("/keys/never-written", token).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_eq!(missing.error_name(), "NOT_FOUND");

    // Deletes are idempotent and say whether the key existed.
    let first = http.delete("/keys/binary", token).await;
    assert_eq!(first.status, 204, "{first:?}");
    assert_eq!(first.header("x-transdb-existed"), Some("true"));
    assert!(first.body.is_empty());
    let second = http.delete("/keys/binary", token).await;
    assert_eq!(second.status, 204, "{second:?}");
    assert_eq!(second.header("x-transdb-existed"), Some("false"));
    assert_eq!(http.get("/keys/binary", token).await.status, 404);
    assert_eq!(client.get("binary").await.unwrap(), None);

    // A key with slashes, spaces and non-ASCII characters, percent-encoded, is the same
    // key over HTTP and QUIC, in both directions.
    let key = "dir/sub dir/a file é.txt";
    let path = key_path(key);
    assert!(path.contains("%2F") && path.contains("%20"), "{path}");
    let put = http.put(&path, token, "over http").await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        client.get(key).await.unwrap().as_deref(),
        Some(&b"over http"[..])
    );
    client.put(key, "over quic").await.unwrap();
    let got = http.get(&path, token).await;
    assert_eq!((got.status, got.text()), (200, "over quic"), "{got:?}");
    // Unencoded slashes are part of the key too.
    client.put("plain/slash", "s").await.unwrap();
    let got = http.get("/keys/plain/slash", token).await;
    assert_eq!((got.status, got.text()), (200, "s"), "{got:?}");
    // A '+' in the path is a plus, not a space.
    let put = http.put("/keys/a+b", token, "plus").await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        client.get("a+b").await.unwrap().as_deref(),
        Some(&b"plus"[..])
    );
    assert_eq!(client.get("a b").await.unwrap(), None);
    // A percent-encoded path that is not UTF-8 names no key: 400, with a JSON error.
    let not_utf8 = http.put("/keys/%FF%FE", token, "x").await;
    assert_eq!(not_utf8.status, 400, "{not_utf8:?}");
    assert_eq!(
        not_utf8.error_code(),
        None,
        "a gateway error, not a protocol one"
    );
    assert_eq!(stored_keys(&client).await, 3);

    // The largest value is accepted; one byte more is 413 and stores nothing.
    let largest = vec![0xA5u8; MAX_VALUE_BYTES];
    let put = http.put("/keys/largest", token, largest.clone()).await;
    assert_eq!(put.status, 200, "{put:?}");
    let got = http.get("/keys/largest", token).await;
    assert_eq!(got.status, 200);
    assert!(got.body == largest, "the largest value round-trips");
    let too_large = http
        .put("/keys/too-large", token, vec![0x5Au8; MAX_VALUE_BYTES + 1])
        .await;
    assert_eq!(too_large.status, 413, "{too_large:?}");
    assert_eq!(too_large.error_code(), Some(VALUE_TOO_LARGE));
    assert_eq!(too_large.error_name(), "VALUE_TOO_LARGE");
    assert_eq!(client.get("too-large").await.unwrap(), None);

    // The longest key is accepted; one byte more is 400 KEY_TOO_LARGE.
    let longest = "k".repeat(MAX_KEY_BYTES);
    let put = http.put(&key_path(&longest), token, "long").await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        client.get(&longest).await.unwrap().as_deref(),
        Some(&b"long"[..])
    );
    let too_long = "k".repeat(MAX_KEY_BYTES + 1);
    for reply in [
        http.put(&key_path(&too_long), token, "x").await,
        http.get(&key_path(&too_long), token).await,
        http.delete(&key_path(&too_long), token).await,
    ] {
        assert_eq!(reply.status, 400, "{reply:?}");
        assert_eq!(reply.error_code(), Some(KEY_TOO_LARGE));
        assert_eq!(reply.error_name(), "KEY_TOO_LARGE");
    }
    // The path key, "plain/slash", "a+b", "largest" and the longest key: nothing else.
    assert_eq!(stored_keys(&client).await, 5);
}

/// Checks that `reply` refuses the request as unauthenticated; returns 1 (to count it).
fn unauthenticated(reply: &Reply) -> u64 {
    assert_eq!(reply.status, 401, "{reply:?}");
    let challenge = reply.header("www-authenticate").expect("a challenge");
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert_eq!(reply.error_code(), Some(UNAUTHENTICATED));
    assert_eq!(reply.error_name(), "UNAUTHENTICATED");
    1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_need_a_valid_token_of_a_sufficient_role_and_refusals_are_counted() {
    let test = start().await;
    let http = Http::new(&test);
    let admin = test.client().await;
    admin.put("guarded", "v1").await.unwrap();
    let (reader, _) = admin.create_token("reader", Role::Read).await.unwrap();
    let (doomed, doomed_info) = admin.create_token("doomed", Role::Write).await.unwrap();
    let failures_before = admin.stats().await.unwrap().auth_failures;

    // No token, a wrong one, a malformed one, and another scheme.
    let mut refused = 0;
    refused += unauthenticated(&http.get("/keys/guarded", None).await);
    refused += unauthenticated(&http.get("/keys/guarded", Some("not-a-token")).await);
    refused += unauthenticated(&http.put("/keys/guarded", Some("x.y.z"), "evil").await);
    let basic = http
        .send_with(
            "GET",
            "/keys/guarded",
            Some("Basic YWRtaW46YWRtaW4=".to_owned()),
            None,
        )
        .await;
    refused += unauthenticated(&basic);

    // The scheme is case-insensitive (RFC 9110).
    let lower = http
        .send_with(
            "GET",
            "/keys/guarded",
            Some(format!("bearer {reader}")),
            None,
        )
        .await;
    assert_eq!((lower.status, lower.text()), (200, "v1"), "{lower:?}");

    // A read-role token reads but cannot write; the store is unchanged.
    let got = http.get("/keys/guarded", Some(&reader)).await;
    assert_eq!((got.status, got.text()), (200, "v1"), "{got:?}");
    for reply in [
        http.put("/keys/guarded", Some(&reader), "v2").await,
        http.put("/keys/fresh", Some(&reader), "new").await,
        http.delete("/keys/guarded", Some(&reader)).await,
    ] {
        assert_eq!(reply.status, 403, "{reply:?}");
        assert_eq!(reply.error_code(), Some(PERMISSION_DENIED));
        assert_eq!(reply.error_name(), "PERMISSION_DENIED");
    }
    assert_eq!(
        admin.get("guarded").await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(admin.get("fresh").await.unwrap(), None);

    // A revoked token stops working at once.
    let before = http.put("/keys/doomed", Some(&doomed), "d").await;
    assert_eq!(before.status, 200, "{before:?}");
    assert!(admin.revoke_token(&doomed_info.id).await.unwrap());
    refused += unauthenticated(&http.get("/keys/doomed", Some(&doomed)).await);
    refused += unauthenticated(&http.delete("/keys/doomed", Some(&doomed)).await);
    assert_eq!(
        admin.get("doomed").await.unwrap().as_deref(),
        Some(&b"d"[..])
    );

    // /health needs no token; /metrics needs one (read is enough).
    let health = http.get("/health", None).await;
    assert_eq!(health.status, 200, "{health:?}");
    refused += unauthenticated(&http.get("/metrics", None).await);
    let metrics = http.get("/metrics", Some(&reader)).await;
    assert_eq!(metrics.status, 200, "{metrics:?}");

    assert_eq!(refused, 7);
    let failures_after = admin.stats().await.unwrap().auth_failures;
    assert_eq!(
        failures_after - failures_before,
        refused,
        "every refused HTTP request is an authentication failure, and nothing else is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_lock_is_held_too_long_gets_503_and_nothing_is_done() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let token = Some(token.as_str());
    let client = test.client().await;
    client.put("hot", "before").await.unwrap();
    client.put("cool", "calm").await.unwrap();
    let scheduler = test.server.executor().scheduler.clone();
    let before = client.stats().await.unwrap();

    let grant = scheduler
        .acquire(LockSet::Keys(vec![(lock_id("hot"), Mode::Exclusive)]))
        .await
        .expect("the test's transaction is granted");
    let (get, put, delete, (cool_get, cool_put)) = tokio::join!(
        http.get("/keys/hot", token),
        http.put("/keys/hot", token, "during"),
        http.delete("/keys/hot", token),
        async {
            // Another key is served while "hot" is locked.
            (
                http.get("/keys/cool", token).await,
                http.put("/keys/cool", token, "still served").await,
            )
        },
    );
    // Still held here: the requests above were all answered while it was.
    assert_eq!(
        (cool_get.status, cool_get.text()),
        (200, "calm"),
        "{cool_get:?}"
    );
    assert_eq!(cool_put.status, 200, "{cool_put:?}");
    for reply in [&get, &put, &delete] {
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
        assert_eq!(reply.error_name(), "LOCK_TIMEOUT");
        assert!(
            reply.elapsed >= LOCK_WAIT && reply.elapsed < PATIENCE,
            "refused after about LOCK_WAIT, not {:?}",
            reply.elapsed
        );
    }
    drop(grant);

    // The refusals are counted as errors of their kinds (with no protocol code).
    let after = client.stats().await.unwrap();
    let errors = |stats: &transdb_client::ServerStats, kind: &str| {
        stats
            .requests
            .iter()
            .find(|row| row.kind == kind)
            .map_or(0, |row| row.errors)
    };
    for kind in ["Get", "Put", "Delete"] {
        assert_eq!(errors(&after, kind) - errors(&before, kind), 1, "{kind}");
    }
    assert_eq!(
        after.errors, before.errors,
        "no error code for a lock timeout"
    );

    // Nothing was done: neither the put nor the delete.
    assert_eq!(
        client.get("hot").await.unwrap().as_deref(),
        Some(&b"before"[..])
    );
    assert_eq!(
        client.get("cool").await.unwrap().as_deref(),
        Some(&b"still served"[..])
    );
    let got = http.get("/keys/hot", token).await;
    assert_eq!((got.status, got.text()), (200, "before"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_request_waits_for_a_lock_that_frees_within_the_wait() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let client = test.client().await;
    client.put("hot", "before").await.unwrap();
    let scheduler = test.server.executor().scheduler.clone();

    let grant = scheduler
        .acquire(LockSet::Keys(vec![(lock_id("hot"), Mode::Exclusive)]))
        .await
        .expect("the test's transaction is granted");
    let put = tokio::spawn({
        let http = http.clone();
        let token = token.clone();
        async move { http.put("/keys/hot", Some(&token), "after").await }
    });
    // Release well within LOCK_WAIT, once the request is (most likely) waiting. The pause
    // paces the test, it does not synchronise it: were the request slower to arrive, it
    // would find the lock free and the assertions would still hold.
    let released = tokio::spawn(async move {
        tokio::time::sleep(LOCK_WAIT / 10).await;
        let released = Instant::now();
        drop(grant);
        released
    })
    .await
    .unwrap();
    let put = put.await.unwrap();
    assert_eq!(put.status, 200, "served once the lock freed: {put:?}");
    assert!(
        put.finished >= released,
        "answered only after the lock was released"
    );
    assert_eq!(
        client.get("hot").await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_are_called_with_json_and_errors_map_to_statuses() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let token = Some(token.as_str());
    let admin = test.client().await;
    admin
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    let (reader, _) = admin.create_token("reader", Role::Read).await.unwrap();

    for open in [
        r#"{"account":"alice","balance":100}"#,
        r#"{"account":"bob","balance":50}"#,
    ] {
        let reply = http.post("/call/bank/open", token, open).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.json(), serde_json::Value::Null);
    }
    let transfer = http
        .post(
            "/call/bank/transfer",
            token,
            r#"{"from":"alice","to":"bob","amount":30}"#,
        )
        .await;
    assert_eq!(transfer.status, 200, "{transfer:?}");
    let balance = |account: &'static str, token: Option<String>| {
        let http = http.clone();
        async move {
            let reply = http
                .post(
                    "/call/bank/balance",
                    token.as_deref(),
                    format!(r#"{{"account":"{account}"}}"#),
                )
                .await;
            assert_eq!(reply.status, 200, "{reply:?}");
            reply.json().as_i64().expect("a balance is an integer")
        }
    };
    let admin_token = token.map(str::to_owned);
    assert_eq!(balance("alice", admin_token.clone()).await, 70);
    assert_eq!(balance("bob", admin_token.clone()).await, 80);
    // The QUIC API sees the same state.
    assert_eq!(
        admin
            .call_json("bank", "balance", r#"{"account":"bob"}"#)
            .await
            .unwrap(),
        "80"
    );

    // Insufficient funds: the procedure aborts, 422, nothing written.
    let aborted = http
        .post(
            "/call/bank/transfer",
            token,
            r#"{"from":"bob","to":"alice","amount":1000}"#,
        )
        .await;
    assert_eq!(aborted.status, 422, "{aborted:?}");
    assert_eq!(aborted.error_code(), Some(ABORTED));
    assert_eq!(aborted.error_name(), "ABORTED");
    assert!(
        aborted.error()["message"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "the procedure's message: {aborted:?}"
    );
    assert_eq!(balance("alice", admin_token.clone()).await, 70);
    assert_eq!(balance("bob", admin_token.clone()).await, 80);

    // Unknown procedure and module.
    let reply = http.post("/call/bank/embezzle", token, "{}").await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(reply.error_code(), Some(PROCEDURE_NOT_FOUND));
    let reply = http.post("/call/vault/open", token, "{}").await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(reply.error_code(), Some(MODULE_NOT_FOUND));

    // A body that is not JSON, and JSON of the wrong shape.
    let reply = http
        .post("/call/bank/transfer", token, "from=alice&to=bob")
        .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.error_code(), Some(INVALID_ARGUMENTS));
    let reply = http
        .post("/call/bank/transfer", token, r#"{"from":"alice"}"#)
        .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.error_code(), Some(INVALID_ARGUMENTS));

    // A read-role token may call a procedure that only reads, not one that writes.
    assert_eq!(balance("alice", Some(reader.clone())).await, 70);
    let reply = http
        .post(
            "/call/bank/transfer",
            Some(&reader),
            r#"{"from":"alice","to":"bob","amount":1}"#,
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(reply.error_code(), Some(PERMISSION_DENIED));
    assert_eq!(balance("alice", admin_token.clone()).await, 70);
    assert_eq!(balance("bob", admin_token).await, 80);
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses one sample line, `name{label="value",...} number`, or `None`.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let equals = rest.find('=')?;
            let label = &rest[..equals];
            if !is_metric_name(label) || label.contains(':') {
                return None;
            }
            let mut chars = rest[equals + 1..].strip_prefix('"')?.char_indices();
            let quoted = &rest[equals + 2..];
            let mut value = String::new();
            let end = loop {
                let (index, c) = chars.next()?;
                match c {
                    '"' => break index,
                    '\\' => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    c => value.push(c),
                }
            };
            if labels.insert(label.to_owned(), value).is_some() {
                return None; // a label twice
            }
            rest = &quoted[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return None;
            }
        }
    }
    let value = rest.strip_prefix(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        value => value.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A histogram series: its name without `_bucket`, and its labels but `le`.
type SeriesKey = (String, Vec<(String, String)>);

/// A scrape of `/metrics`, parsed: every line must be a comment or a sample, and every
/// sample's family must have been declared by a `# TYPE` line before it.
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = Vec::new();
        let mut current: Option<String> = None;
        let mut finished: BTreeSet<String> = BTreeSet::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.trim_start().splitn(3, ' ');
                let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
                match (keyword, name, rest) {
                    (Some("HELP"), Some(name), Some(_)) if is_metric_name(name) => {}
                    (Some("TYPE"), Some(name), Some(kind)) if is_metric_name(name) => {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                            "{line}"
                        );
                        let earlier = types.insert(name.to_owned(), kind.to_owned());
                        assert!(earlier.is_none(), "declared twice: {line}");
                    }
                    _ => panic!("a comment that is neither HELP nor TYPE: {line:?}"),
                }
                continue;
            }
            assert!(!line.trim().is_empty(), "an empty line in the exposition");
            let sample = parse_sample(line)
                .unwrap_or_else(|| panic!("a line that does not parse: {line:?}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = sample.name.strip_suffix(suffix)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(&sample.name);
            assert!(types.contains_key(family), "no # TYPE before {line:?}");
            // A family's samples are one run of lines.
            if current.as_deref() != Some(family) {
                assert!(
                    !finished.contains(family),
                    "{family} appears again after other families: {line:?}"
                );
                finished.extend(current.replace(family.to_owned()));
            }
            samples.push(sample);
        }
        assert!(!samples.is_empty());
        Scrape { samples }
    }

    /// The value of the sample `name` with exactly `labels`, or 0 if there is none (a
    /// counter not yet shown).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.name == name && sample.labels == labels)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} twice");
        found.first().map_or(0.0, |sample| sample.value)
    }

    /// Every sample named `name`.
    fn all(&self, name: &str) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |sample| sample.name == name)
    }

    /// Checks every histogram: per series, the `le` bounds rise, the counts never fall,
    /// the last bound is `+Inf` and its count is the series' `_count`; a `_sum` exists.
    /// Returns how many series there are.
    fn check_histograms(&self) -> usize {
        let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
        for sample in &self.samples {
            let Some(base) = sample.name.strip_suffix("_bucket") else {
                continue;
            };
            let mut labels = sample.labels.clone();
            let le = labels.remove("le").expect("a bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            series
                .entry((base.to_owned(), labels.into_iter().collect()))
                .or_default()
                .push((le, sample.value));
        }
        for ((base, labels), buckets) in &series {
            for pair in buckets.windows(2) {
                assert!(pair[0].0 < pair[1].0, "{base} {labels:?}: le rises");
                assert!(pair[0].1 <= pair[1].1, "{base} {labels:?}: cumulative");
            }
            let (last_le, last_count) = *buckets.last().unwrap();
            assert_eq!(last_le, f64::INFINITY, "{base} {labels:?} ends with +Inf");
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            let count_name = format!("{base}_count");
            assert!(self.all(&count_name).count() > 0, "{count_name} is missing");
            assert_eq!(
                last_count,
                self.value(&count_name, &labels),
                "{base} {labels:?}: +Inf bucket == _count"
            );
            assert!(
                self.all(&format!("{base}_sum")).any(|sample| {
                    let sample_labels: Vec<(&str, &str)> = sample
                        .labels
                        .iter()
                        .map(|(key, value)| (key.as_str(), value.as_str()))
                        .collect();
                    sample_labels == labels
                }),
                "{base} {labels:?} has a _sum"
            );
        }
        series.len()
    }
}

async fn scrape(http: &Http, token: &str) -> Scrape {
    let reply = http.get("/metrics", Some(token)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let content_type = reply.header("content-type").unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Scrape::parse(reply.text())
}

#[test]
fn the_exposition_parser_accepts_samples_and_refuses_garbage() {
    let sample = parse_sample(r#"x_total{a="1",b="q\"uo\\te\n"} 12.5"#).unwrap();
    assert_eq!(sample.name, "x_total");
    assert_eq!(sample.labels["a"], "1");
    assert_eq!(sample.labels["b"], "q\"uo\\te\n");
    assert_eq!(sample.value, 12.5);
    let bare = parse_sample("up 1").unwrap();
    assert!(bare.labels.is_empty());
    for garbage in [
        "",
        "1x 2",
        "x{a=\"1\" 2",
        "x{a=1} 2",
        "x{a=\"1\"} two",
        "x 2 3 4",
        "x{a=\"1\",a=\"2\"} 2",
        "x{a=\"1\"}2",
    ] {
        assert!(parse_sample(garbage).is_none(), "{garbage:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_traffic_sent() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let admin = test.client().await;
    admin
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    admin
        .call_json("bank", "open", r#"{"account":"alice","balance":100}"#)
        .await
        .unwrap();
    admin
        .call_json("bank", "open", r#"{"account":"bob","balance":0}"#)
        .await
        .unwrap();

    let before = scrape(&http, &token).await;
    // Known traffic, and nothing else, until the next scrape.
    for index in 0..7 {
        let reply = http
            .put(
                &format!("/keys/m{index}"),
                Some(&token),
                format!("v{index}"),
            )
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    for index in 0..5 {
        assert!(admin.get(&format!("m{index}")).await.unwrap().is_some());
    }
    for _ in 0..3 {
        let reply = http
            .post(
                "/call/bank/transfer",
                Some(&token),
                r#"{"from":"alice","to":"bob","amount":10}"#,
            )
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let reply = http
        .post(
            "/call/bank/transfer",
            Some(&token),
            r#"{"from":"bob","to":"alice","amount":1000}"#,
        )
        .await;
    assert_eq!(reply.status, 422, "{reply:?}");
    let after = scrape(&http, &token).await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    // Requests by kind: exactly the traffic, and no other kind moved.
    let duration_count = "transdb_request_duration_seconds_count";
    let expected: BTreeMap<&str, f64> = [("Put", 7.0), ("Get", 5.0), ("Call", 4.0)].into();
    for kind in transdb_proto::Request::KINDS {
        assert_eq!(
            delta(duration_count, &[("kind", kind)]),
            expected.get(kind).copied().unwrap_or(0.0),
            "{kind} requests"
        );
    }
    assert_eq!(
        delta("transdb_request_errors_total", &[("kind", "Call")]),
        1.0
    );
    assert_eq!(
        delta("transdb_request_errors_total", &[("kind", "Put")]),
        0.0
    );
    // Errors by code: one abort, nothing else.
    assert_eq!(
        delta(
            "transdb_errors_total",
            &[("code", "64"), ("name", "ABORTED")]
        ),
        1.0
    );
    for sample in after.all("transdb_errors_total") {
        if sample.labels["code"] != ABORTED.to_string() {
            let labels: Vec<(&str, &str)> = sample
                .labels
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            assert_eq!(delta("transdb_errors_total", &labels), 0.0, "{sample:?}");
        }
    }
    // Calls by procedure.
    let transfer = [("module", "bank"), ("procedure", "transfer")];
    let open = [("module", "bank"), ("procedure", "open")];
    assert_eq!(delta("transdb_call_duration_seconds_count", &transfer), 4.0);
    assert_eq!(delta("transdb_call_errors_total", &transfer), 1.0);
    assert!(delta("transdb_call_fuel_total", &transfer) > 0.0);
    assert!(delta("transdb_call_duration_seconds_sum", &transfer) > 0.0);
    assert_eq!(
        after.value("transdb_call_duration_seconds_count", &open),
        2.0
    );
    assert_eq!(delta("transdb_call_duration_seconds_count", &open), 0.0);
    // HTTP responses by class: 7 puts, 3 transfers and the first scrape (counted once
    // answered); the aborted transfer.
    assert_eq!(
        delta("transdb_http_responses_total", &[("class", "2xx")]),
        11.0
    );
    assert_eq!(
        delta("transdb_http_responses_total", &[("class", "4xx")]),
        1.0
    );
    assert_eq!(
        delta("transdb_http_responses_total", &[("class", "5xx")]),
        0.0
    );

    // Gauges: the keys stored (two accounts and seven keys), as Stats counts them.
    let shard_keys: f64 = after
        .all("transdb_shard_keys")
        .map(|sample| sample.value)
        .sum();
    assert_eq!(after.all("transdb_shard_keys").count(), 2, "one per shard");
    assert_eq!(shard_keys, 9.0);
    assert_eq!(stored_keys(&admin).await, 9);
    assert_eq!(after.value("transdb_modules", &[]), 1.0);
    assert!(
        after.value("transdb_uptime_seconds", &[]) >= before.value("transdb_uptime_seconds", &[])
    );
    assert!(
        after.value("transdb_log_next_position", &[])
            >= before.value("transdb_log_next_position", &[]) + 7.0 + 4.0
    );

    // Histograms are well-formed: the request kinds and the procedures seen.
    assert!(before.check_histograms() >= 3);
    assert!(after.check_histograms() >= 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_token_and_routing_errors_are_404_and_405() {
    let test = start().await;
    let http = Http::new(&test);
    let token = test.admin_token();
    let client = test.client().await;
    client.put("x", "1").await.unwrap();

    let health = http.get("/health", None).await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.header("content-type"), Some("application/json"));
    let body = health.json();
    assert_eq!(body["alive"], serde_json::Value::Bool(true), "{body}");
    assert_eq!(body["ready"], serde_json::Value::Bool(true), "{body}");
    let position = body["position"].as_u64().expect("a position");
    assert!(position >= 1, "the put was ordered: {body}");
    assert!(body["uptime_ms"].is_u64(), "{body}");

    for path in ["/nowhere", "/keys", "/call/bank", "/metrics/extra"] {
        let reply = http.get(path, Some(&token)).await;
        assert_eq!(reply.status, 404, "{path}: {reply:?}");
        assert_eq!(reply.error_name(), "NOT_FOUND", "{path}");
    }
    let reply = http.post("/keys/x", Some(&token), "2").await;
    assert_eq!(reply.status, 405, "{reply:?}");
    let reply = http.get("/call/bank/balance", Some(&token)).await;
    assert_eq!(reply.status, 405, "{reply:?}");
    let reply = http.send("PUT", "/health", None, Some(Vec::new())).await;
    assert_eq!(reply.status, 405, "{reply:?}");
    assert_eq!(
        reply.error_name(),
        "METHOD_NOT_ALLOWED",
        "a JSON error: {reply:?}"
    );
    // None of them changed anything.
    assert_eq!(client.get("x").await.unwrap().as_deref(), Some(&b"1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_the_gateway_refuses_connections() {
    let test = start().await;
    let http = Http::new(&test);
    let address: SocketAddr = test.server.http_addr().unwrap();
    assert_eq!(http.get("/health", None).await.status, 200);
    TcpStream::connect(address).expect("the gateway accepts connections while it runs");

    let TestServer { server, data_dir } = test;
    let report = tokio::time::timeout(PATIENCE, server.shutdown())
        .await
        .expect("the server shuts down within PATIENCE");
    assert_eq!(report.abandoned, 0);
    let refused = tokio::task::spawn_blocking(move || TcpStream::connect(address))
        .await
        .unwrap();
    match refused {
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{error}"
        ),
        Ok(_) => panic!("a new connection to {address} was accepted after shutdown"),
    }
    drop(data_dir);
}

/// The `transdb` binary itself: `serve --http` prints the gateway's address, serves keys
/// there with the admin token it wrote, and closes it on SIGTERM.
#[test]
fn the_cli_serves_http_on_the_address_it_prints_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = ChildServer::start(
        dir.path(),
        "127.0.0.1:0",
        &["--http", "127.0.0.1:0", "--data-dir", "data"],
    );
    let line = child.wait_for_line("transdb HTTP gateway on ");
    let address: SocketAddr = line
        .trim_start_matches("transdb HTTP gateway on ")
        .trim_start_matches("http://")
        .trim()
        .parse()
        .unwrap_or_else(|error| panic!("{line:?}: {error}"));
    assert_ne!(address.port(), 0, "the bound port, not the requested one");
    let http = Http::at(address);
    let bearer = Some(format!("Bearer {}", admin_token(&dir.path().join("data"))));

    assert_eq!(http.blocking("GET", "/health", None, None).status, 200);
    let put = http.blocking("PUT", "/keys/k", bearer.clone(), Some(b"v\0".to_vec()));
    assert_eq!(put.status, 200, "{put:?}");
    let got = http.blocking("GET", "/keys/k", bearer.clone(), None);
    assert_eq!(
        (got.status, got.body.as_slice()),
        (200, &b"v\0"[..]),
        "{got:?}"
    );
    let refused = http.blocking("GET", "/keys/k", None, None);
    assert_eq!(refused.status, 401, "{refused:?}");

    child.terminate();
    assert!(child.wait().success());
    let error = TcpStream::connect(address).expect_err("the gateway is gone");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
}
