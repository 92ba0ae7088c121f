//! Webhooks end to end: an endpoint that is down while mail flows, and an
//! engine restart in between, still receive every selected delivery log
//! event exactly once by idempotency key, with a valid signature.
//!
//! The endpoint is a small HTTP/1.1 server on loopback, written here so
//! that the test controls when it responds 503, when it refuses
//! connections, and what it records.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use caduceus_engine::webhook::{SIGNATURE_HEADER, WebhookSecret, idempotency_key};
use caduceus_tests::{Engine, Lane, Script, ScriptedReceiver};
use common::{engine_config, inject, listen_addr, state_dir};
use serde_json::Value;

const SECRET: &str = "4f1d0c9a7b3e2f5a6c8d9e0f1a2b3c4d";
const DOMAIN: &str = "webhook.test";
const INJECTORS: u32 = 4;
/// Events the endpoint selects; `deferred` and the rest are filtered out.
const SELECTED: [&str; 3] = ["received", "delivered", "bounced"];

/// One POST the endpoint received.
#[derive(Clone, Debug)]
struct Request {
    status: u16,
    path: String,
    content_type: Option<String>,
    signature: Option<String>,
    body: Vec<u8>,
}

/// A loopback HTTP endpoint that responds to every POST with `status` and
/// records it. Dropping it closes the listener, so connections are refused.
struct Endpoint {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    fn start(addr: SocketAddr, status: u16, requests: Arc<Mutex<Vec<Request>>>) -> Endpoint {
        let listener = TcpListener::bind(addr).expect("bind the webhook endpoint");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else {
                        continue;
                    };
                    if let Some(request) = serve_one(stream, status) {
                        requests.lock().expect("requests lock").push(request);
                    }
                }
            })
        };
        Endpoint {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it reads the flag and drops the
        // listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request and responds to it with `status` and `Connection: close`.
fn serve_one(stream: TcpStream, status: u16) -> Option<Request> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();

    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }

    let length: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;

    let reason = if status == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    let mut writer = stream;
    let _ = writer.write_all(
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    (method == "POST").then(|| Request {
        status,
        path,
        content_type: headers.get("content-type").cloned(),
        signature: headers.get(&SIGNATURE_HEADER.to_ascii_lowercase()).cloned(),
        body,
    })
}

fn write_secret(dir: &Path, mode: u32) -> PathBuf {
    let path = dir.join("webhook.secret");
    std::fs::write(&path, format!("{SECRET}\n")).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod secret");
    path
}

fn webhook_config(receiver: SocketAddr, endpoint: SocketAddr, secret: &Path) -> String {
    format!(
        "recipient_logging = \"clear\"\n{}\n\
         [delivery]\nmax_connections_per_destination = 4\n\n\
         [delivery_log]\nmax_file_bytes = 65536\n\n\
         [[rule]]\ndomain = \"{DOMAIN}\"\nroute = \"{receiver}\"\n\n\
         [[webhook]]\nname = \"ehr\"\nurl = \"http://{endpoint}/events\"\n\
         events = [\"received\", \"delivered\", \"bounced\"]\n\
         secret_file = \"{}\"\nbatch_size = 50\ntimeout = \"2s\"\n\
         retry_initial_delay = \"100ms\"\nretry_max_delay = \"500ms\"\n",
        engine_config(None),
        secret.display()
    )
}

/// Injects `sequences` over `INJECTORS` connections and returns those
/// acknowledged with 250.
fn inject_all(socket: &Path, sequences: std::ops::Range<u32>) -> Vec<u32> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut injectors = Vec::new();
    for injector in 0..INJECTORS {
        let share: Vec<u32> = sequences
            .clone()
            .filter(|sequence| sequence % INJECTORS == injector)
            .collect();
        let (acked, stop, socket) = (acked.clone(), stop.clone(), socket.to_path_buf());
        injectors.push(std::thread::spawn(move || {
            inject(&socket, DOMAIN, share, &acked, &stop)
        }));
    }
    for injector in injectors {
        injector.join().expect("injector thread");
    }
    acked.lock().expect("acked lock").clone()
}

fn wait_for(what: &str, engine: &Engine, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 240 s\nengine stderr:\n{}",
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn delivered_count(engine: &Engine) -> usize {
    engine
        .delivery_log()
        .expect("delivery log")
        .iter()
        .filter(|entry| entry["event"] == "delivered")
        .count()
}

/// Collects the events of every acknowledged request, in arrival order.
fn acknowledged_events(requests: &[Request]) -> Vec<serde_json::Map<String, Value>> {
    let mut events = Vec::new();
    for request in requests.iter().filter(|request| request.status == 200) {
        let body: Value = serde_json::from_slice(&request.body).expect("body is JSON");
        let batch = body["events"].as_array().expect("body has an events array");
        for event in batch {
            events.push(event.as_object().expect("event is an object").clone());
        }
    }
    events
}

fn sequence_of_recipient(recipient: &str) -> Option<u32> {
    recipient
        .strip_prefix("member")?
        .strip_suffix(&format!("@{DOMAIN}"))?
        .parse()
        .ok()
}

#[test]
fn down_endpoint_gets_every_event_once() {
    let receiver =
        ScriptedReceiver::start(common::any_port(90), Script::default()).expect("receiver start");
    let endpoint_addr = listen_addr(91);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let endpoint = Endpoint::start(endpoint_addr, 503, requests.clone());
    let state = state_dir();
    let secret = write_secret(state.path(), 0o600);
    let mut engine = Engine::start(
        &webhook_config(receiver.addr(), endpoint_addr, &secret),
        &state.path().join("engine"),
    )
    .expect("engine start");
    let socket = engine.socket(Lane::Bulk).to_path_buf();

    // First half: the endpoint responds 503, then stops listening.
    let first = inject_all(&socket, 0..2_500);
    assert_eq!(
        first.len(),
        2_500,
        "every message of the first half got 250"
    );
    wait_for("delivery of the first half", &engine, || {
        delivered_count(&engine) >= 2_500
    });
    wait_for("a webhook attempt during the outage", &engine, || {
        !endpoint.requests().is_empty()
    });
    drop(endpoint);
    let refused_from = requests.lock().expect("requests lock").len();

    // The engine restarts while the endpoint is down.
    engine.restart().expect("engine restart");

    // Second half: the endpoint is back and responds 200.
    let endpoint = Endpoint::start(endpoint_addr, 200, requests.clone());
    let second = inject_all(&socket, 2_500..5_000);
    assert_eq!(
        second.len(),
        2_500,
        "every message of the second half got 250"
    );
    wait_for("delivery of the second half", &engine, || {
        delivered_count(&engine) >= 5_000
    });

    let log = engine.delivery_log().expect("delivery log");
    let expected: HashSet<String> = log
        .iter()
        .filter(|entry| SELECTED.contains(&entry["event"].as_str().unwrap_or("")))
        .map(|entry| idempotency_key(entry.as_object().expect("log line is an object")))
        .collect();
    wait_for("every selected event at the endpoint", &engine, || {
        let received: HashSet<String> = acknowledged_events(&endpoint.requests())
            .iter()
            .filter_map(|event| event["idempotency_key"].as_str().map(str::to_string))
            .collect();
        received.len() >= expected.len()
    });
    // Gives a duplicate that is still on its way the time to arrive.
    std::thread::sleep(Duration::from_secs(1));
    let all_requests = endpoint.requests();
    let events = acknowledged_events(&all_requests);

    let mut copies: HashMap<String, usize> = HashMap::new();
    for event in &events {
        let key = event["idempotency_key"]
            .as_str()
            .expect("every event has an idempotency_key")
            .to_string();
        let mut fields = event.clone();
        fields.remove("idempotency_key");
        assert_eq!(key, idempotency_key(&fields), "key of {event:?}");
        *copies.entry(key).or_insert(0) += 1;
    }
    let duplicates: Vec<_> = copies.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} events arrived more than once, e.g. {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)]
    );
    let received: HashSet<String> = copies.into_keys().collect();
    let missing: Vec<_> = expected.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "{} selected events never arrived",
        missing.len()
    );
    let unexpected: Vec<_> = received.difference(&expected).collect();
    assert!(
        unexpected.is_empty(),
        "{} events arrived that the log does not hold",
        unexpected.len()
    );
    for event in &events {
        let kind = event["event"].as_str().unwrap_or("");
        assert!(SELECTED.contains(&kind), "filtered event {kind} was sent");
    }

    let delivered: HashSet<u32> = events
        .iter()
        .filter(|event| event["event"] == "delivered")
        .filter_map(|event| sequence_of_recipient(event["recipient"].as_str()?))
        .collect();
    assert_eq!(delivered.len(), 5_000, "one delivered event per message");

    let outage = &all_requests[..refused_from];
    assert!(
        outage.iter().all(|request| request.status == 503),
        "the outage answered 503 only"
    );
    for request in &all_requests {
        assert_eq!(request.path, "/events");
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
    }

    // The 64 KiB limit rotated each core's file many times, so the cursor
    // crossed files, and it was stored.
    let log_files = std::fs::read_dir(engine.state_dir().join("log"))
        .expect("log dir")
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("delivery."))
        .count();
    assert!(log_files > 10, "only {log_files} delivery log files");
    let cursor = std::fs::read_to_string(engine.state_dir().join("webhooks/ehr.cursor"))
        .expect("cursor file");
    let cursor: Value = serde_json::from_str(&cursor).expect("cursor is JSON");
    assert_eq!(cursor["version"], 1);
}

#[test]
fn signature_matches_body() {
    let receiver =
        ScriptedReceiver::start(common::any_port(92), Script::default()).expect("receiver start");
    let endpoint_addr = listen_addr(93);
    let endpoint = Endpoint::start(endpoint_addr, 200, Arc::new(Mutex::new(Vec::new())));
    let state = state_dir();
    let secret = write_secret(state.path(), 0o600);
    let engine = Engine::start(
        &webhook_config(receiver.addr(), endpoint_addr, &secret),
        &state.path().join("engine"),
    )
    .expect("engine start");
    let acked = inject_all(engine.socket(Lane::Bulk), 0..3);
    assert_eq!(acked.len(), 3);
    wait_for("three delivered events at the endpoint", &engine, || {
        acknowledged_events(&endpoint.requests())
            .iter()
            .filter(|event| event["event"] == "delivered")
            .count()
            >= 3
    });

    let requests = endpoint.requests();
    let signer = WebhookSecret::new(SECRET.as_bytes());
    let other_signer = WebhookSecret::new(b"another secret of 32 bytes......");
    for request in &requests {
        let signature = request
            .signature
            .as_deref()
            .expect("every request is signed");
        let hex = signature
            .strip_prefix("sha256=")
            .expect("the signature starts with sha256=");
        assert_eq!(hex.len(), 64, "{signature}");
        assert!(
            hex.bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)),
            "{signature}"
        );
        assert_eq!(signature, signer.signature(&request.body));
        assert_ne!(signature, other_signer.signature(&request.body));
        let mut tampered = request.body.clone();
        tampered.push(b' ');
        assert_ne!(signature, signer.signature(&tampered));
    }
}

#[test]
fn secret_readable_by_others_stops_start() {
    let state = state_dir();
    let secret = write_secret(state.path(), 0o644);
    let config = webhook_config(listen_addr(94), listen_addr(95), &secret);
    let error = match Engine::start(&config, &state.path().join("engine")) {
        Ok(_) => panic!("the engine started with a secret readable by others"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("mode 0644"), "{error}");
}
