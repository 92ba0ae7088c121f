//! Tests over a real Unix socket: a glommio executor on its own thread runs
//! `serve_socket`, and the test thread is a blocking std client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use caduceus_policy::Category;

use super::super::{Submission, SubmittedRecipient};
use super::*;

/// Accepts everything and records the submissions.
#[derive(Default)]
struct RecordingAdmission {
    submissions: RefCell<Vec<Submission>>,
}

impl Admission for RecordingAdmission {
    fn admit_mail(&self, _lane: Lane) -> Result<(), Reply> {
        Ok(())
    }

    fn admit_rcpt(
        &self,
        _lane: Lane,
        _category: Category,
        _sender: &str,
        _recipient: &SubmittedRecipient,
    ) -> Result<(), Reply> {
        Ok(())
    }

    async fn submit(&self, submission: Submission) -> Result<(), Reply> {
        // A short wait takes the place of the group commit.
        glommio::timer::sleep(Duration::from_millis(1)).await;
        self.submissions.borrow_mut().push(submission);
        Ok(())
    }
}

struct TestServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Submission>>>,
    _directory: tempfile::TempDir,
}

impl TestServer {
    fn start(lane_config: LaneConfig, ingress: IngressConfig) -> TestServer {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path().join("run").join("transactional.sock");
        let listener = bind_socket(&path, &lane_config).expect("bind the test socket");
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let admission = Rc::new(RecordingAdmission::default());
                let shutdown = Rc::new(Shutdown::new());
                let trigger = shutdown.clone();
                glommio::spawn_local(async move {
                    while !thread_stop.load(Ordering::SeqCst) {
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                    trigger.trigger();
                })
                .detach();
                serve_socket(
                    listener,
                    Lane::Transactional,
                    Rc::new(lane_config),
                    Rc::new(ingress),
                    Rc::from("mta.example.com"),
                    admission.clone(),
                    shutdown,
                )
                .await
                .expect("serve the test socket");
                admission.submissions.take()
            })
        });
        TestServer {
            path,
            stop,
            thread: Some(thread),
            _directory: directory,
        }
    }

    fn start_default() -> TestServer {
        TestServer::start(
            LaneConfig::default_for(Lane::Transactional),
            IngressConfig::default(),
        )
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the server and returns what it submitted.
    fn stop(mut self) -> Vec<Submission> {
        self.request_stop();
        let thread = self.thread.take().expect("the server runs until stopped");
        thread.join().expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the test socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set a read timeout");
        let writer = stream.try_clone().expect("clone the stream");
        Client {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Reads one reply, all lines of it. Returns "" at end of file.
    fn read_reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let length = self.reader.read_line(&mut line).expect("read a reply line");
            if length == 0 {
                return reply;
            }
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to the server");
    }

    fn command(&mut self, line: &str) -> String {
        self.write(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    fn greeted(path: &Path) -> Client {
        let mut client = Client::connect(path);
        assert!(client.read_reply().starts_with("220 mta.example.com"));
        assert!(
            client
                .command("EHLO client.example.com")
                .contains("250 DSN")
        );
        client
    }

    fn read_to_end(&mut self) -> String {
        let mut rest = String::new();
        self.reader
            .read_to_string(&mut rest)
            .expect("read to end of file");
        rest
    }
}

#[test]
fn socket_mode_set_after_bind() {
    let mut lane_config = LaneConfig::default_for(Lane::Transactional);
    lane_config.socket_mode = "0640".into();
    let uid = nix::unistd::getuid().as_raw();
    lane_config.socket_owner = Some(uid.to_string());
    let server = TestServer::start(lane_config, IngressConfig::default());
    let metadata = std::fs::metadata(&server.path).expect("socket metadata");
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o7777, 0o640);
    server.stop();
}

#[test]
fn invalid_mode_and_owner_named_in_errors() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("lane.sock");
    let mut lane_config = LaneConfig::default_for(Lane::Bulk);
    lane_config.socket_mode = "rw-rw----".into();
    let error = bind_socket(&path, &lane_config).expect_err("invalid mode");
    assert!(matches!(error, BindError::InvalidMode { .. }));
    assert!(error.to_string().contains("lane.sock"));

    let mut lane_config = LaneConfig::default_for(Lane::Bulk);
    lane_config.socket_owner = Some("no-such-user-caduceus".into());
    let error = bind_socket(&path, &lane_config).expect_err("unknown user");
    assert!(matches!(error, BindError::UnknownUser { .. }));
}

#[test]
fn stale_socket_replaced_live_socket_kept() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("nested").join("lane.sock");
    let lane_config = LaneConfig::default_for(Lane::Bulk);
    let first = bind_socket(&path, &lane_config).expect("first bind");
    let error = bind_socket(&path, &lane_config).expect_err("the socket is live");
    assert!(matches!(error, BindError::InUse { .. }), "{error}");
    drop(first);
    assert!(path.exists(), "dropping a listener leaves the file behind");
    let second = bind_socket(&path, &lane_config).expect("stale socket replaced");
    drop(second);

    let regular = directory.path().join("regular");
    std::fs::write(&regular, b"not a socket").expect("write a regular file");
    let error = bind_socket(&regular, &lane_config).expect_err("regular file");
    assert!(matches!(error, BindError::NotASocket { .. }));
    assert!(regular.exists(), "a regular file is never removed");
}

#[test]
fn pipelined_session_over_socket() {
    let server = TestServer::start_default();
    let mut client = Client::greeted(&server.path);
    client.write(
        b"MAIL FROM:<app@example.com> BODY=8BITMIME\r\nRCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE\r\nRCPT TO:<\"odd user\"@Example.NET>\r\nDATA\r\n",
    );
    assert_eq!(client.read_reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.read_reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.read_reply(), "250 2.1.5 Ok\r\n");
    assert!(client.read_reply().starts_with("354 "));
    client.write(b"X-Caduceus-Category: care\r\nSubject: hello\r\n\r\ncaf\xc3\xa9\r\n.\r\n");
    let queued = client.read_reply();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(client.read_to_end(), "");

    let submissions = server.stop();
    assert_eq!(submissions.len(), 1);
    let submission = &submissions[0];
    assert!(queued.contains(&hex::encode(submission.message_id)));
    assert_eq!(submission.lane, Lane::Transactional);
    assert_eq!(submission.category, Category::Care);
    assert!(submission.body_8bit);
    assert_eq!(submission.peer.uid, nix::unistd::getuid().as_raw());
    assert_eq!(submission.peer.pid, std::process::id());
    assert_eq!(submission.helo, "client.example.com");
    assert_eq!(submission.recipients[0].notify, 3);
    assert_eq!(submission.recipients[1].address, "\"odd user\"@Example.NET");
    assert_eq!(submission.recipients[1].domain, "example.net");
    let body = String::from_utf8_lossy(&submission.body);
    assert!(body.contains(&format!(
        "(uid {} pid {})",
        submission.peer.uid, submission.peer.pid
    )));
    assert!(!body.contains("X-Caduceus-Category"));
}

#[test]
fn peer_outside_allow_list_rejected() {
    let uid = nix::unistd::getuid().as_raw();
    let mut lane_config = LaneConfig::default_for(Lane::Transactional);
    lane_config.allowed_uids = vec![uid.wrapping_add(1)];
    let server = TestServer::start(lane_config, IngressConfig::default());
    let mut client = Client::connect(&server.path);
    assert_eq!(
        client.read_reply(),
        "554 5.7.1 Submission not permitted for this user\r\n"
    );
    assert_eq!(
        client.read_to_end(),
        "",
        "the connection is closed after the rejection"
    );
    assert!(server.stop().is_empty());

    let gid = nix::unistd::getgid().as_raw();
    let mut lane_config = LaneConfig::default_for(Lane::Transactional);
    lane_config.allowed_uids = vec![uid.wrapping_add(1)];
    lane_config.allowed_gids = vec![gid];
    let server = TestServer::start(lane_config, IngressConfig::default());
    let mut client = Client::connect(&server.path);
    assert!(
        client.read_reply().starts_with("220 "),
        "a listed gid is enough"
    );
    server.stop();
}

#[test]
fn smuggling_variants_over_socket() {
    let server = TestServer::start_default();
    let variants: [&[u8]; 6] = [
        b"\n.\r\n",
        b"\n.\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r.\n",
        b"\r\n.\r\r\n",
    ];
    for variant in variants {
        let mut client = Client::greeted(&server.path);
        assert!(
            client
                .command("MAIL FROM:<app@example.com>")
                .starts_with("250 ")
        );
        assert!(
            client
                .command("RCPT TO:<user@example.net>")
                .starts_with("250 ")
        );
        assert!(client.command("DATA").starts_with("354 "));
        let mut data =
            b"From: app@example.com\r\nTo: user@example.net\r\nSubject: one\r\n\r\nfirst message"
                .to_vec();
        data.extend_from_slice(variant);
        data.extend_from_slice(
            b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo@example.org\r\nTo: victim@example.net\r\nSubject: smuggled\r\n\r\nsecond message\r\n.\r\nQUIT\r\n",
        );
        client.write(&data);
        let replies = client.read_to_end();
        assert_eq!(
            replies,
            "550 5.5.2 Message rejected: bare CR or LF found; lines must end with CRLF\r\n221 2.0.0 Bye\r\n",
            "variant {variant:?}"
        );
    }
    let submissions = server.stop();
    assert!(submissions.is_empty(), "no message may be queued");
}

#[test]
fn split_terminator_over_socket() {
    let server = TestServer::start_default();
    let mut client = Client::greeted(&server.path);
    client.write(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    for _ in 0..2 {
        client.read_reply();
    }
    assert!(client.read_reply().starts_with("354 "));
    for piece in [
        &b"Subject: split\r\n\r\nbody\r"[..],
        b"\n",
        b".",
        b"\r",
        b"\n",
    ] {
        client.write(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(client.read_reply().starts_with("250 2.0.0 Ok: queued as "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let submissions = server.stop();
    assert_eq!(submissions.len(), 1);
    assert!(submissions[0].body.ends_with(b"\r\n\r\nbody\r\n"));
}

#[test]
fn many_recipients_over_socket() {
    const RECIPIENTS: usize = 100_000;
    let server = TestServer::start_default();
    let mut client = Client::greeted(&server.path);
    assert!(
        client
            .command("MAIL FROM:<app@example.com>")
            .starts_with("250 ")
    );
    // Writing and reading run at once, as a pipelining client must, so
    // neither side's socket buffer fills up and stalls the other.
    let mut writer = client.writer.try_clone().expect("clone the stream");
    let writer_thread = std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(64 * 1024);
        for index in 0..RECIPIENTS {
            batch.extend_from_slice(format!("RCPT TO:<r{index}@example.net>\r\n").as_bytes());
            if batch.len() > 60_000 {
                writer.write_all(&batch).expect("write recipients");
                batch.clear();
            }
        }
        batch.extend_from_slice(b"NOOP\r\n");
        writer.write_all(&batch).expect("write recipients");
    });
    let mut accepted = 0;
    let mut capped = 0;
    for _ in 0..RECIPIENTS {
        let reply = client.read_reply();
        if reply.starts_with("250 2.1.5") {
            accepted += 1;
        } else if reply.starts_with("452 4.5.3") {
            capped += 1;
        } else {
            panic!("unexpected reply {reply:?}");
        }
    }
    writer_thread.join().expect("writer thread");
    assert_eq!(client.read_reply(), "250 2.0.0 Ok\r\n", "still responsive");
    assert_eq!(accepted, 1000);
    assert_eq!(capped, RECIPIENTS - 1000);
    assert!(client.command("DATA").starts_with("354 "));
    client.write(b"Subject: many\r\n\r\nx\r\n.\r\n");
    assert!(client.read_reply().starts_with("250 2.0.0"));
    let submissions = server.stop();
    assert_eq!(submissions[0].recipients.len(), 1000);
}

#[test]
fn shutdown_closes_idle_finishes_data() {
    let server = TestServer::start_default();
    let mut idle = Client::greeted(&server.path);
    let mut sending = Client::greeted(&server.path);
    assert!(
        sending
            .command("MAIL FROM:<app@example.com>")
            .starts_with("250 ")
    );
    assert!(
        sending
            .command("RCPT TO:<user@example.net>")
            .starts_with("250 ")
    );
    assert!(sending.command("DATA").starts_with("354 "));
    sending.write(b"Subject: late\r\n\r\nfirst half\r\n");

    server.request_stop();
    assert_eq!(
        idle.read_reply(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    assert_eq!(idle.read_to_end(), "");
    sending.write(b"second half\r\n.\r\n");
    assert!(sending.read_reply().starts_with("250 2.0.0 Ok: queued as "));
    assert_eq!(
        sending.read_reply(),
        "421 4.3.2 Service shutting down, closing connection\r\n"
    );
    let submissions = server.stop();
    assert_eq!(submissions.len(), 1);
    assert!(
        submissions[0]
            .body
            .ends_with(b"first half\r\nsecond half\r\n")
    );
}

#[test]
fn command_timeout_closes() {
    let ingress = IngressConfig {
        command_timeout: caduceus_policy::duration::ConfigDuration::from_micros(200_000),
        ..IngressConfig::default()
    };
    let server = TestServer::start(LaneConfig::default_for(Lane::Transactional), ingress);
    let mut client = Client::greeted(&server.path);
    assert_eq!(
        client.read_reply(),
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    assert_eq!(client.read_to_end(), "");
    server.stop();
}
