//! A private Postfix instance on loopback, as a receiving MTA or as a relay.
//!
//! Each instance has its own `config_directory`, `queue_directory`,
//! `data_directory`, Maildir and `maillog_file` under a temporary directory,
//! so several instances run side by side and none touches the system's
//! `/etc/postfix/main.cf`. Starting one requires root, because the Postfix
//! master process runs as root and the daemons drop to `mail_owner`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};

use crate::net::{other_error, poll_until, tail_of_file, wait_for_listener};

/// Path of the `postfix` command on Debian and Ubuntu.
const POSTFIX_COMMAND: &str = "/usr/sbin/postfix";

/// How long `start` waits for the SMTP listener after `postfix start`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `Drop` waits for the daemons to exit after `postfix stop` before
/// it kills what is left.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The reply the policy service gives to a recipient listed in
/// [`PostfixOptions::defer_first`].
pub const DEFER_REPLY: &str = "450 4.2.0 try later";

/// What a [`Postfix`] instance does and where it listens.
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// Address and port of the `smtpd` listener.
    pub listen: SocketAddr,
    /// Domains delivered into the instance's Maildir (`virtual_mailbox_domains`).
    /// Mail for other domains is rejected with `554 5.7.1` unless `relay_to`
    /// is set.
    pub domains: Vec<String>,
    /// Server certificate and key in PEM for STARTTLS. `None` means the
    /// instance does not offer STARTTLS.
    pub tls: Option<(String, String)>,
    /// `check_recipient_access` entries: an address, domain or `user@` key and
    /// a Postfix access action such as `550 5.1.1 no such user` or `OK`.
    pub recipient_access: Vec<(String, String)>,
    /// Recipients that get [`DEFER_REPLY`] for their first `n` RCPT
    /// commands and accepted after that (greylisting). A Postfix lookup table
    /// is stateless, so the harness serves these through a policy service
    /// (`check_policy_service`, see Postfix's SMTPD_POLICY_README).
    pub defer_first: Vec<(String, u32)>,
    /// Relay every message to this SMTP server (`relayhost = [addr]:port`)
    /// and accept mail for any domain from loopback clients. Used by the
    /// benchmarks, with `smtp-source` as the sender.
    pub relay_to: Option<SocketAddr>,
    /// Further `main.cf` settings, written after the harness's own so that
    /// they take precedence.
    pub main_cf: Vec<(String, String)>,
}

impl PostfixOptions {
    /// Configures a receiving MTA for `domains` on `listen` that accepts every
    /// recipient and offers no STARTTLS.
    pub fn receiver(listen: SocketAddr, domains: &[&str]) -> PostfixOptions {
        PostfixOptions {
            listen,
            domains: domains.iter().map(|domain| domain.to_string()).collect(),
            tls: None,
            recipient_access: Vec::new(),
            defer_first: Vec::new(),
            relay_to: None,
            main_cf: Vec::new(),
        }
    }

    /// Configures a relay on `listen` that forwards every message to `relay_to`.
    pub fn relay(listen: SocketAddr, relay_to: SocketAddr) -> PostfixOptions {
        PostfixOptions {
            relay_to: Some(relay_to),
            ..PostfixOptions::receiver(listen, &[])
        }
    }
}

/// A message that Postfix delivered into the Maildir.
#[derive(Clone, Debug)]
pub struct DeliveredMessage {
    /// The envelope recipient, from `X-Original-To` (or `Delivered-To`).
    pub recipient: String,
    /// The Maildir file as written: LF line endings, Postfix's header fields
    /// prepended.
    pub raw: Vec<u8>,
    /// Path of the Maildir file.
    pub path: PathBuf,
}

impl DeliveredMessage {
    /// Returns the message as the sender sent it, with LF line endings: strips
    /// the `Return-Path`, `X-Original-To` and `Delivered-To` fields and the one
    /// `Received` field that Postfix prepends on delivery.
    pub fn original_content(&self) -> &[u8] {
        let mut rest: &[u8] = &self.raw;
        for name in ["return-path", "x-original-to", "delivered-to", "received"] {
            if let Some(after) = strip_field(rest, name) {
                rest = after;
            }
        }
        rest
    }
}

/// Strips one header field called `name` (case-insensitive) with its folded
/// continuation lines from the start of `message`, if the message starts with
/// that field.
fn strip_field<'a>(message: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let prefix_len = name.len() + 1;
    let head = message.get(..prefix_len)?;
    if !head[..name.len()].eq_ignore_ascii_case(name.as_bytes()) || head[name.len()] != b':' {
        return None;
    }
    let mut offset = 0;
    loop {
        let line_end = message[offset..].iter().position(|&byte| byte == b'\n')?;
        offset += line_end + 1;
        // RFC 5322 §2.2.3: a line that starts with white space continues the
        // field.
        match message.get(offset) {
            Some(b' ') | Some(b'\t') => continue,
            _ => return Some(&message[offset..]),
        }
    }
}

/// A running private Postfix instance. Dropping it stops the instance.
pub struct Postfix {
    options: PostfixOptions,
    dir: tempfile::TempDir,
    policy: Option<PolicyService>,
    master_pid: Option<Pid>,
}

impl Postfix {
    /// Writes the configuration, runs `postfix -c <dir> start` and waits for
    /// the SMTP listener.
    pub fn start(options: PostfixOptions) -> io::Result<Postfix> {
        let dir = tempfile::Builder::new()
            .prefix("caduceus-postfix-")
            .tempdir()?;
        // The daemons run as `mail_owner` and the virtual delivery agent as
        // `nobody`, so both must be able to reach their directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;

        let policy = if options.defer_first.is_empty() {
            None
        } else {
            Some(PolicyService::start(&options.defer_first)?)
        };

        let mut postfix = Postfix {
            options,
            dir,
            policy,
            master_pid: None,
        };
        postfix.write_configuration()?;

        let output = Command::new(POSTFIX_COMMAND)
            .arg("-c")
            .arg(postfix.config_dir())
            .arg("start")
            .output()
            .map_err(|error| {
                other_error(format!(
                    "running {POSTFIX_COMMAND} failed: {error}; install the postfix package"
                ))
            })?;
        if !output.status.success() {
            return Err(other_error(format!(
                "postfix start for {} failed ({}): {}{}\nmaillog:\n{}",
                postfix.options.listen,
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                postfix.maillog_tail(40),
            )));
        }
        postfix.master_pid = read_master_pid(&postfix.queue_dir());

        if !wait_for_listener(postfix.options.listen, START_TIMEOUT) {
            return Err(other_error(format!(
                "postfix did not listen on {} within {START_TIMEOUT:?}\nmaillog:\n{}",
                postfix.options.listen,
                postfix.maillog_tail(40),
            )));
        }
        Ok(postfix)
    }

    /// Returns the address of the SMTP listener.
    pub fn addr(&self) -> SocketAddr {
        self.options.listen
    }

    /// Returns the instance's directory: `etc/`, `queue/`, `data/`, `mail/`,
    /// `maillog`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Reads every message delivered so far, oldest first by Maildir file name.
    pub fn messages(&self) -> Vec<DeliveredMessage> {
        let maildir = self.mailbox_dir();
        let mut paths = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(maildir.join(sub)) {
                paths.extend(entries.filter_map(|entry| entry.ok().map(|entry| entry.path())));
            }
        }
        // Maildir names start with the delivery time in seconds and a
        // per-second sequence, so name order is close to delivery order.
        paths.sort_by(|left, right| left.file_name().cmp(&right.file_name()));
        paths
            .into_iter()
            .filter_map(|path| {
                let raw = std::fs::read(&path).ok()?;
                let recipient = header_value(&raw, "x-original-to")
                    .or_else(|| header_value(&raw, "delivered-to"))
                    .unwrap_or_default();
                Some(DeliveredMessage {
                    recipient,
                    raw,
                    path,
                })
            })
            .collect()
    }

    /// Polls the Maildir until at least `count` messages arrived and returns
    /// them. On timeout the error carries the tail of the maillog.
    pub fn wait_for_messages(
        &self,
        count: usize,
        timeout: Duration,
    ) -> io::Result<Vec<DeliveredMessage>> {
        poll_until(timeout, || {
            let messages = self.messages();
            (messages.len() >= count).then_some(messages)
        })
        .ok_or_else(|| {
            other_error(format!(
                "postfix {}: {} of {count} messages delivered within {timeout:?}\nmaillog:\n{}",
                self.options.listen,
                self.messages().len(),
                self.maillog_tail(40),
            ))
        })
    }

    /// Returns the whole maillog so far.
    pub fn maillog(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.maillog_path()).unwrap_or_default())
            .into_owned()
    }

    fn maillog_tail(&self, max_lines: usize) -> String {
        tail_of_file(&self.maillog_path(), max_lines)
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    fn maillog_path(&self) -> PathBuf {
        self.dir.path().join("maillog")
    }

    fn mailbox_dir(&self) -> PathBuf {
        self.dir.path().join("mail").join("inbox")
    }

    fn write_configuration(&self) -> io::Result<()> {
        let root = self.dir.path();
        let mail_owner = lookup_user("postfix")?;
        let delivery_user = lookup_user("nobody")?;
        for sub in ["etc", "queue", "data", "mail", "tls"] {
            std::fs::create_dir(root.join(sub))?;
        }
        chown(&root.join("data"), Some(mail_owner.uid), None)?;
        chown(
            &root.join("mail"),
            Some(delivery_user.uid),
            Some(delivery_user.gid),
        )?;

        let etc = self.config_dir();
        std::fs::write(etc.join("master.cf"), self.master_cf())?;
        let mut access_table = String::new();
        for (key, action) in &self.options.recipient_access {
            let _ = writeln!(access_table, "{key} {action}");
        }
        std::fs::write(etc.join("recipient_access"), access_table)?;
        if let Some((cert_pem, key_pem)) = &self.options.tls {
            std::fs::write(root.join("tls").join("server.crt"), cert_pem)?;
            let key_path = root.join("tls").join("server.key");
            std::fs::write(&key_path, key_pem)?;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(
            etc.join("main.cf"),
            self.main_cf(delivery_user.uid.as_raw()),
        )?;
        Ok(())
    }

    fn main_cf(&self, delivery_uid: u32) -> String {
        let root = self.dir.path().display().to_string();
        let options = &self.options;
        let ipv6 = options.listen.is_ipv6() || options.relay_to.is_some_and(|addr| addr.is_ipv6());
        let mut settings: Vec<(String, String)> = vec![
            ("compatibility_level".into(), "3.6".into()),
            ("queue_directory".into(), format!("{root}/queue")),
            ("data_directory".into(), format!("{root}/data")),
            // The machine has no syslog daemon; postlogd writes this file.
            ("maillog_file".into(), format!("{root}/maillog")),
            ("maillog_file_prefixes".into(), root.clone()),
            ("myhostname".into(), "postfix.caduceus.test".into()),
            ("mydestination".into(), String::new()),
            // Postfix accepts only addresses configured on an interface here,
            // and 127.0.0.x other than 127.0.0.1 is routed to `lo` without
            // being configured on it. The `ADDR:PORT` service name in
            // master.cf is what restricts the listener.
            ("inet_interfaces".into(), "all".into()),
            (
                "inet_protocols".into(),
                if ipv6 { "all" } else { "ipv4" }.into(),
            ),
            ("mynetworks".into(), "127.0.0.0/8 [::1]/128".into()),
            // Without this Postfix rewrites headers of mail from its own
            // interfaces (adds Date, Message-ID, completes addresses), and
            // the tests compare content byte for byte.
            ("local_header_rewrite_clients".into(), String::new()),
            ("alias_maps".into(), String::new()),
            ("alias_database".into(), String::new()),
            ("local_recipient_maps".into(), String::new()),
            ("biff".into(), "no".into()),
            ("delay_warning_time".into(), "0".into()),
            ("smtpd_tls_loglevel".into(), "1".into()),
            ("smtpd_tls_received_header".into(), "yes".into()),
        ];
        if let Some((_, _)) = &options.tls {
            settings.push(("smtpd_tls_security_level".into(), "may".into()));
            settings.push((
                "smtpd_tls_cert_file".into(),
                format!("{root}/tls/server.crt"),
            ));
            settings.push((
                "smtpd_tls_key_file".into(),
                format!("{root}/tls/server.key"),
            ));
        } else {
            settings.push(("smtpd_tls_security_level".into(), "none".into()));
        }

        let mut recipient_restrictions = vec![format!(
            "check_recipient_access texthash:{root}/etc/recipient_access"
        )];
        if let Some(policy) = &self.policy {
            recipient_restrictions.push(format!("check_policy_service inet:{}", policy.addr));
        }
        recipient_restrictions.push("permit".into());
        settings.push((
            "smtpd_recipient_restrictions".into(),
            recipient_restrictions.join(", "),
        ));

        match options.relay_to {
            Some(relay_to) => {
                settings.push(("relayhost".into(), bracketed(relay_to)));
                settings.push((
                    "smtpd_relay_restrictions".into(),
                    "permit_mynetworks, reject".into(),
                ));
                settings.push(("smtp_tls_security_level".into(), "may".into()));
            }
            None => {
                settings.push((
                    "smtpd_relay_restrictions".into(),
                    "reject_unauth_destination".into(),
                ));
            }
        }
        if !options.domains.is_empty() {
            settings.push(("virtual_mailbox_domains".into(), options.domains.join(", ")));
            settings.push(("virtual_mailbox_base".into(), format!("{root}/mail")));
            // One Maildir (the trailing slash selects Maildir format) for
            // every recipient; X-Original-To identifies the recipient.
            settings.push(("virtual_mailbox_maps".into(), "static:inbox/".into()));
            settings.push(("virtual_uid_maps".into(), format!("static:{delivery_uid}")));
            settings.push(("virtual_gid_maps".into(), format!("static:{delivery_uid}")));
            settings.push(("virtual_mailbox_limit".into(), "0".into()));
        }
        settings.extend(options.main_cf.iter().cloned());

        let mut text = String::from("# Written by caduceus-tests for one test run.\n");
        for (name, value) in settings {
            let _ = writeln!(text, "{name} = {value}");
        }
        text
    }

    fn master_cf(&self) -> String {
        // Every service runs without chroot, because the instance lives in a
        // temporary directory with none of the files a chroot jail needs.
        let listen = match self.options.listen {
            SocketAddr::V4(addr) => addr.to_string(),
            SocketAddr::V6(addr) => format!("[{}]:{}", addr.ip(), addr.port()),
        };
        let services = [
            format!("{listen} inet n - n - - smtpd"),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "tlsmgr unix - - n 1000? 1 tlsmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "flush unix n - n 1000? 0 flush".into(),
            "proxymap unix - - n - - proxymap".into(),
            "proxywrite unix - - n - 1 proxymap".into(),
            "smtp unix - - n - - smtp".into(),
            "relay unix - - n - - smtp".into(),
            "showq unix n - n - - showq".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "local unix - n n - - local".into(),
            "virtual unix - n n - - virtual".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        let mut text = String::from("# Written by caduceus-tests for one test run.\n");
        for service in services {
            text.push_str(&service);
            text.push('\n');
        }
        text
    }

    fn stop(&mut self) {
        let _ = Command::new(POSTFIX_COMMAND)
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .output();
        let Some(master_pid) = self.master_pid.take() else {
            return;
        };
        // The master is a session leader, so every daemon it started shares
        // its process group. Zombies are ignored because a container's init
        // may never reap the detached master.
        let exited = poll_until(STOP_TIMEOUT, || {
            live_group_members(master_pid).is_empty().then_some(())
        });
        if exited.is_none() {
            let _ = kill(Pid::from_raw(-master_pid.as_raw()), Signal::SIGKILL);
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "postfix {} maillog tail:\n{}",
                self.options.listen,
                self.maillog_tail(40)
            );
        }
        self.stop();
    }
}

fn bracketed(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V6(ip) => format!("[ipv6:{ip}]:{}", addr.port()),
    }
}

fn lookup_user(name: &str) -> io::Result<User> {
    User::from_name(name)?.ok_or_else(|| {
        other_error(format!(
            "user {name} not found; install the postfix package"
        ))
    })
}

fn read_master_pid(queue_dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(queue_dir.join("pid").join("master.pid")).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    (pid > 1).then(|| Pid::from_raw(pid))
}

/// Lists the processes in process group `group` that have not exited, read
/// from `/proc/<pid>/stat`.
fn live_group_members(group: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name in parentheses may contain spaces, so the
            // fields are counted from the last ')': state, ppid, pgrp.
            let after_name = &stat[stat.rfind(')')? + 1..];
            let mut fields = after_name.split_whitespace();
            let state = fields.next()?;
            let _parent = fields.next()?;
            let pgrp: i32 = fields.next()?.parse().ok()?;
            (pgrp == group.as_raw() && state != "Z").then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// Returns the value of the first header field called `name`, unfolded and
/// trimmed.
fn header_value(message: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if let Some((field, value)) = line.split_once(':')
            && field.eq_ignore_ascii_case(name)
        {
            return Some(value.trim().to_string());
        }
    }
    None
}

/// A Postfix policy service (SMTPD_POLICY_README) that defers chosen
/// recipients for their first RCPT commands.
struct PolicyService {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// How long a policy connection may stay idle before the service closes it.
/// `smtpd` reconnects when it needs the service again.
const POLICY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl PolicyService {
    fn start(defer_first: &[(String, u32)]) -> io::Result<PolicyService> {
        let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
        let addr = listener.local_addr()?;
        let remaining: HashMap<String, u32> = defer_first
            .iter()
            .map(|(address, count)| (address.to_ascii_lowercase(), *count))
            .collect();
        let remaining = Arc::new(Mutex::new(remaining));
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stopping = Arc::clone(&stopping);
            thread::Builder::new()
                .name("postfix-policy".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let remaining = Arc::clone(&remaining);
                        let _ = thread::Builder::new()
                            .name("postfix-policy-conn".into())
                            .spawn(move || serve_policy_connection(stream, &remaining));
                    }
                })?
        };
        Ok(PolicyService {
            addr,
            stopping,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for PolicyService {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept so that the thread checks the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve_policy_connection(stream: TcpStream, remaining: &Mutex<HashMap<String, u32>>) {
    let _ = stream.set_read_timeout(Some(POLICY_IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut recipient = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let attribute = line.trim_end_matches(['\r', '\n']);
        if let Some(value) = attribute.strip_prefix("recipient=") {
            recipient = value.to_ascii_lowercase();
            continue;
        }
        if !attribute.is_empty() {
            continue;
        }
        // An empty line ends the request.
        let defer = {
            let mut remaining = remaining
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match remaining.get_mut(&recipient) {
                Some(count) if *count > 0 => {
                    *count -= 1;
                    true
                }
                _ => false,
            }
        };
        let action = if defer { DEFER_REPLY } else { "DUNNO" };
        if writer
            .write_all(format!("action={action}\n\n").as_bytes())
            .is_err()
        {
            return;
        }
        recipient.clear();
    }
}
