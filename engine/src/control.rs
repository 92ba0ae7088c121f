//! The control socket, `<state_dir>/run/control.sock`: administrative
//! commands as JSON lines.
//!
//! A plain thread, not pinned to any CPU, accepts on the socket so that
//! control-plane work never runs on a transactional core. It identifies the
//! operator by uid through SO_PEERCRED, writes an audit line for every
//! command, and forwards queue commands to every executor over bounded
//! crossbeam channels. Each executor answers on a reply channel.
//!
//! Request: `{"command":"queue.hold","destination":"example.net"}`.
//! Response: `{"ok":true,...}` or `{"ok":false,"error":"..."}`, one line.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use caduceus_policy::lists::{
    Change, ChangeOp, Entry, ImportList, ImportOptions, ListStore, Reason, import_csv,
};
use caduceus_policy::{SiteKey, normalise_address};
use caduceus_spool::{Keyring, MessageId};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{Value, json};

use crate::deliverylog::now_us;
use crate::policy_swap::PolicyCell;
use crate::runtime::SpoolKeySource;

/// A command for one executor.
#[derive(Clone, Debug)]
pub enum ControlCommand {
    QueueList,
    Hold(String),
    Release(String),
    Delete(String),
    Requeue(String),
    /// `spool.show`: the executor whose queue contains the message replies
    /// with its envelope view, and with its content when `content` is set.
    Show {
        message_id: MessageId,
        content: bool,
    },
    /// `keys.rotate`: replaces the spool keyring of the executor's shard
    /// and of its reader of other shards.
    InstallKeyring(Arc<Keyring>),
}

/// The maximum length of a request line on the control socket. Commands
/// are small JSON objects, and imports pass a file path, not the file.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

pub struct ControlRequest {
    pub command: ControlCommand,
    pub reply: crossbeam_channel::Sender<Value>,
}

/// Capacity of each executor's command channel. Operators send a handful
/// of commands; a full channel means an executor is stuck, and the command
/// fails rather than queueing without bound.
pub const CONTROL_CHANNEL_CAPACITY: usize = 64;

/// How long the control thread waits for each executor's answer.
const EXECUTOR_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Capacity of the channel on which executors report addresses to
/// suppress after a permanent "no such user" failure. When it is full the
/// executor logs the address's HMAC and drops the report: suppression is
/// an optimisation that the next bounce repeats, never a delivery fault.
pub const SUPPRESSION_CHANNEL_CAPACITY: usize = 4096;

/// The state behind the control socket.
pub struct ControlPlane {
    pub executors: Vec<crossbeam_channel::Sender<ControlRequest>>,
    pub holds_file: PathBuf,
    pub audit_file: PathBuf,
    pub shutdown: Arc<AtomicBool>,
    /// Consent and suppression lists; only this thread changes them.
    pub lists: ListStore,
    pub site_key: SiteKey,
    /// Suppressions reported by the executors (hard bounces).
    pub auto_suppress: crossbeam_channel::Receiver<Change>,
    pub policy: Arc<PolicyCell>,
    /// The config file to recompile on `policy.reload`; `None` when the
    /// engine runs on built-in defaults.
    pub config_path: Option<PathBuf>,
    /// The source of the spool's keys, which `keys.rotate` reads and writes.
    pub spool_key: SpoolKeySource,
}

/// Loads the policy of the config file, from the compiled file when it
/// matches or else by compiling, and swaps it in. A config that fails to
/// load or compile is rejected and the old policy stays in force.
pub fn reload_policy(config_path: Option<&Path>, cell: &PolicyCell) -> Result<usize, String> {
    let _reloading = cell.lock_reload();
    let config = match config_path {
        Some(path) => caduceus_policy::load_config(path).map_err(|error| error.to_string())?,
        None => caduceus_policy::config::Config::default(),
    };
    let (policy, _) = crate::policy_file::load_policy(&config, cell.compiled_file())?;
    let rules = policy.rule_count();
    cell.store(policy);
    Ok(rules)
}

/// Reads the destinations the operator held, saved across restarts.
pub fn load_holds(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<Vec<String>>(&text).unwrap_or_else(|error| {
            tracing::error!(path = %path.display(), %error, "control: holds file is invalid; starting with no destination on hold (fix or delete the file)");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

fn save_holds(path: &Path, holds: &BTreeSet<String>) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let text = serde_json::to_string(&holds.iter().collect::<Vec<_>>())?;
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

impl ControlPlane {
    /// Serves the socket until shutdown. Runs on its own thread.
    pub fn serve(mut self, listener: UnixListener) {
        let mut holds: BTreeSet<String> = load_holds(&self.holds_file).into_iter().collect();
        if let Err(error) = listener.set_nonblocking(true) {
            tracing::error!(%error, "control: socket could not be made non-blocking; control commands are unavailable");
            return;
        }
        while !self.shutdown.load(Ordering::Acquire) {
            self.take_auto_suppressions();
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(error) = self.handle(stream, &mut holds) {
                        tracing::warn!(%error, "control: connection failed");
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => {
                    tracing::warn!(%error, "control: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Journals the suppressions the executors reported since the last
    /// call, in one batch.
    fn take_auto_suppressions(&mut self) {
        let changes: Vec<Change> = self.auto_suppress.try_iter().collect();
        if changes.is_empty() {
            return;
        }
        match self.lists.apply(&changes) {
            Ok(()) => tracing::info!(
                count = changes.len(),
                "lists: suppressed addresses after permanent no-such-user failures"
            ),
            Err(error) => tracing::error!(
                count = changes.len(),
                %error,
                "lists: automatic suppressions could not be journalled and are dropped"
            ),
        }
    }

    fn handle(&mut self, stream: UnixStream, holds: &mut BTreeSet<String>) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let credentials = getsockopt(&stream, PeerCredentials)
            .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))?;
        let uid = credentials.uid();
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = Vec::new();
        loop {
            line.clear();
            // Reading one byte past the limit distinguishes an over-long line
            // from one exactly at it.
            let read = (&mut reader)
                .take(MAX_REQUEST_BYTES + 1)
                .read_until(b'\n', &mut line)?;
            if read == 0 {
                break;
            }
            let too_long = line.len() as u64 > MAX_REQUEST_BYTES;
            let response = if too_long {
                json!({"ok": false, "error": format!("request is longer than {MAX_REQUEST_BYTES} bytes; send one JSON object per line (imports take a file path, not its content)")})
            } else {
                match std::str::from_utf8(&line) {
                    Ok(text) => match serde_json::from_str::<Value>(text) {
                        Ok(request) => self.execute(&request, uid, holds),
                        Err(error) => {
                            json!({"ok": false, "error": format!("request is not valid JSON: {error}")})
                        }
                    },
                    Err(error) => {
                        json!({"ok": false, "error": format!("request is not UTF-8: {error}")})
                    }
                }
            };
            let mut text = response.to_string();
            text.push('\n');
            writer.write_all(text.as_bytes())?;
            if too_long {
                // The rest of the line is unread; close rather than parse it
                // as further requests.
                break;
            }
        }
        Ok(())
    }

    fn execute(&mut self, request: &Value, uid: u32, holds: &mut BTreeSet<String>) -> Value {
        let command = request.get("command").and_then(Value::as_str).unwrap_or("");
        // Destinations are compared in the lowercase A-label form that
        // ingress stores, so `Bücher.example.` and `xn--bcher-kva.example`
        // name the same destination, and anything that is not a domain is
        // rejected before it reaches the executors or holds.json.
        let destination = match request.get("destination").and_then(Value::as_str) {
            Some(text) => {
                match caduceus_policy::normalise_domain(text.trim().trim_end_matches('.')) {
                    Ok(domain) => Some(domain),
                    Err(error) => {
                        return json!({"ok": false, "error": format!("{error}; give a destination domain such as example.net")});
                    }
                }
            }
            None => None,
        };
        if let Some(response) = self.execute_lists(request, command, uid) {
            return response;
        }
        if command == "policy.reload" {
            self.audit(uid, command, None, None);
            return match reload_policy(self.config_path.as_deref(), &self.policy) {
                Ok(rules) => {
                    tracing::info!(rules, operator_uid = uid, "policy: reloaded");
                    // The absolute path, so that the CLI can tell whether
                    // the engine read the file the operator named.
                    let config = self.config_path.as_deref().map(|path| {
                        std::fs::canonicalize(path)
                            .unwrap_or_else(|_| path.to_path_buf())
                            .display()
                            .to_string()
                    });
                    json!({"ok": true, "rules": rules, "config": config})
                }
                Err(error) => {
                    tracing::error!(%error, "policy: reload rejected; the previous policy stays in force");
                    json!({"ok": false, "error": format!("reload rejected, the previous policy stays in force: {error}")})
                }
            };
        }
        if command == "spool.show" {
            self.audit(uid, command, None, None);
            return self.show_message(request, uid);
        }
        if command == "keys.rotate" {
            self.audit(uid, command, None, None);
            return self.rotate_spool_key(uid);
        }
        self.audit(uid, command, destination.as_deref(), None);
        let needs_destination = |build: fn(String) -> ControlCommand| match &destination {
            Some(domain) if !domain.is_empty() => Ok(build(domain.clone())),
            _ => Err(
                json!({"ok": false, "error": format!("{command} needs a \"destination\" (a domain such as example.net)")}),
            ),
        };
        let executor_command = match command {
            "queue.list" => Ok(ControlCommand::QueueList),
            "queue.hold" => needs_destination(ControlCommand::Hold),
            "queue.release" => needs_destination(ControlCommand::Release),
            "queue.delete" => needs_destination(ControlCommand::Delete),
            "queue.requeue" => needs_destination(ControlCommand::Requeue),
            "ping" => return json!({"ok": true}),
            other => {
                return json!({"ok": false, "error": format!("unknown command {other:?}; expected queue.list, queue.hold, queue.release, queue.delete, queue.requeue, suppress.add, suppress.remove, suppress.check, suppress.import, consent.add, consent.remove, consent.check, consent.import, policy.reload, spool.show, keys.rotate or ping")});
            }
        };
        let executor_command = match executor_command {
            Ok(command) => command,
            Err(response) => return response,
        };
        match &executor_command {
            ControlCommand::Hold(domain) => {
                holds.insert(domain.clone());
            }
            ControlCommand::Release(domain) => {
                holds.remove(domain);
            }
            _ => {}
        }
        if matches!(
            executor_command,
            ControlCommand::Hold(_) | ControlCommand::Release(_)
        ) && let Err(error) = save_holds(&self.holds_file, holds)
        {
            tracing::error!(path = %self.holds_file.display(), %error, "control: holds file could not be written; the hold is in force but will not survive a restart");
        }
        let answers = self.broadcast(executor_command);
        json!({"ok": true, "executors": answers})
    }

    /// Runs the `suppress.*` and `consent.*` commands; `None` for any
    /// other command. Addresses are hashed at once and never stored or
    /// logged in the clear.
    fn execute_lists(&mut self, request: &Value, command: &str, uid: u32) -> Option<Value> {
        let (list, action) = command.split_once('.')?;
        if list != "suppress" && list != "consent" {
            return None;
        }
        let reason = match request.get("reason").and_then(Value::as_str) {
            None => Reason::OptOut,
            Some(text) => match Reason::parse(text) {
                Some(reason) => reason,
                None => {
                    return Some(
                        json!({"ok": false, "error": format!("invalid reason {text:?}: expected opt-out, hard-bounce or complaint")}),
                    );
                }
            },
        };
        let entry = if list == "consent" {
            Entry::Consent
        } else {
            Entry::Suppression(reason)
        };
        if action == "import" {
            self.audit(uid, command, None, None);
            return Some(self.import(request, list, reason));
        }
        let Some(address) = request.get("address").and_then(Value::as_str) else {
            return Some(json!({"ok": false, "error": format!("{command} needs an \"address\"")}));
        };
        let hmac = match normalise_address(address) {
            Ok(_) => self.site_key.hmac_address(address),
            Err(error) => {
                return Some(
                    json!({"ok": false, "error": format!("{error}; give an address such as user@example.net")}),
                );
            }
        };
        self.audit(uid, command, None, Some(&hex::encode(hmac)));
        let op = match action {
            "add" => ChangeOp::Add,
            "remove" => ChangeOp::Remove,
            "check" => return Some(self.list_status(&hmac)),
            other => {
                return Some(
                    json!({"ok": false, "error": format!("unknown action {other:?}: expected add, remove, check or import")}),
                );
            }
        };
        let change = Change {
            op,
            entry,
            hmac,
            time_unix_ms: now_us() / 1000,
        };
        // The reply carries the address's entries after the change,
        // because `suppress remove` removes one reason and keeps the others.
        Some(match self.lists.apply(&[change]) {
            Ok(()) => self.list_status(&hmac),
            Err(error) => {
                json!({"ok": false, "error": format!("the change could not be journalled: {error}")})
            }
        })
    }

    /// Returns whether the address with this HMAC has consent and which
    /// suppression reasons it has, as the reply to a list command.
    fn list_status(&self, hmac: &[u8; 32]) -> Value {
        let lists = self.lists.snapshot();
        let suppressed: Vec<&str> = Reason::ALL
            .into_iter()
            .filter(|reason| lists.contains(hmac, Entry::Suppression(*reason)))
            .map(Reason::as_str)
            .collect();
        json!({
            "ok": true,
            "consent": lists.contains(hmac, Entry::Consent),
            "suppressed": suppressed,
        })
    }

    /// Imports a CSV file (`address[,reason]`) that the engine's user can
    /// read. Hashing runs on this thread and one more, never on a lane core.
    fn import(&mut self, request: &Value, list: &str, reason: Reason) -> Value {
        let Some(path) = request.get("path").and_then(Value::as_str) else {
            return json!({"ok": false, "error": "import needs a \"path\" to a CSV file"});
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) => {
                return json!({"ok": false, "error": format!("cannot open {path}: {error}; the engine's user must be able to read it")});
            }
        };
        let options = ImportOptions {
            list: if list == "consent" {
                ImportList::Consent
            } else {
                ImportList::Suppression {
                    default_reason: Some(reason),
                }
            },
            threads: 2,
        };
        let started = std::time::Instant::now();
        let imported = match import_csv(std::io::BufReader::new(file), &self.site_key, &options) {
            Ok(imported) => imported,
            Err(error) => return json!({"ok": false, "error": format!("{path}: {error}")}),
        };
        let count = imported.len();
        match self.lists.import(imported) {
            Ok(()) => {
                json!({"ok": true, "imported": count, "elapsed_ms": started.elapsed().as_millis() as u64})
            }
            Err(error) => json!({"ok": false, "error": format!("import failed: {error}")}),
        }
    }

    /// Runs `spool.show`: sends the request to every executor, takes the
    /// owner's reply, and audits the view before returning it. The view is withheld when
    /// its audit record cannot be written and synced.
    fn show_message(&self, request: &Value, uid: u32) -> Value {
        let text = request
            .get("message_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let message_id = match text.parse::<MessageId>() {
            Ok(message_id) => message_id,
            Err(error) => return json!({"ok": false, "error": error.to_string()}),
        };
        let content = match request.get("content") {
            None => false,
            Some(Value::Bool(content)) => *content,
            Some(other) => {
                return json!({"ok": false, "error": format!("\"content\" must be true or false, not {other}")});
            }
        };
        let answers = self.broadcast(ControlCommand::Show {
            message_id,
            content,
        });
        let owner = answers
            .iter()
            .find(|answer| answer.get("found").and_then(Value::as_bool) == Some(true));
        let Some(owner) = owner else {
            if answers.len() < self.executors.len()
                || answers.iter().any(|answer| answer.get("found").is_none())
            {
                return json!({"ok": false, "error": format!("message {message_id} was not found, but not every executor answered; retry, and check the engine log if this repeats")});
            }
            return json!({"ok": false, "error": format!("message {message_id} is not in the running engine's queue: it was never accepted, or every recipient is final (delivered, bounced, expired or deleted)")});
        };
        if let Some(error) = owner.get("error").and_then(Value::as_str) {
            return json!({"ok": false, "error": error});
        }
        let shard = owner
            .get("core")
            .and_then(Value::as_u64)
            .and_then(|core| u16::try_from(core).ok())
            .unwrap_or(u16::MAX);
        if let Err(error) = self.audit_message_viewed(uid, message_id, shard, content) {
            return json!({"ok": false, "error": format!("the view of message {message_id} is withheld because its audit record could not be written: {error}")});
        }
        tracing::info!(
            message_id = %message_id,
            operator_uid = uid,
            shard,
            content,
            "control: spooled message shown to an operator"
        );
        json!({"ok": true, "message": owner["message"]})
    }

    /// Writes and syncs an `envelope_viewed` or `content_viewed` record in
    /// the control stream, or in the plain audit file when the audit trail
    /// is off.
    fn audit_message_viewed(
        &self,
        uid: u32,
        message_id: MessageId,
        shard: u16,
        content: bool,
    ) -> Result<(), String> {
        let message_id = message_id.to_string();
        if let Some(result) = crate::audit::message_viewed(uid, &message_id, shard, content) {
            return result;
        }
        let line = json!({
            "at_us": now_us(),
            "event": if content { "content_viewed" } else { "envelope_viewed" },
            "operator_uid": uid,
            "message_id": message_id,
            "shard": shard,
        });
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_file)
            .and_then(|mut file| {
                file.write_all(format!("{line}\n").as_bytes())?;
                file.sync_data()
            })
            .map_err(|error| format!("{}: {error}", self.audit_file.display()))
    }

    /// Adds a new random spool key and makes it the one that seals new
    /// records, keeping every older key for the records it sealed.
    ///
    /// Every executor first gets the new key inactive, so that any core can
    /// read records sealed with it. The key file is then replaced durably,
    /// and only then is the key activated, so a record sealed with it is
    /// never durable while the key is not.
    fn rotate_spool_key(&self, uid: u32) -> Value {
        let path = match &self.spool_key {
            SpoolKeySource::File(path) => path,
            SpoolKeySource::Off => {
                return json!({"ok": false, "error": "spool encryption is off (spool.encryption = false), so there is no key to rotate"});
            }
            SpoolKeySource::Environment(_) => {
                return json!({"ok": false, "error": format!("the spool key comes from {}, which holds one key; move it into a key file (spool.key_file) to rotate", crate::runtime::SPOOL_KEY_ENV)});
            }
        };
        let failed = |step: &str, error: String| {
            tracing::error!(path = %path.display(), %error, "keys: rotation failed while {step}; the previous key stays active");
            json!({"ok": false, "error": format!("rotation failed while {step}, and the previous key stays active: {error}")})
        };
        // The new file is renamed over the old one, which needs only a
        // writable directory. A key file the engine's user cannot write
        // (mode 0400, or another owner) is kept by the operator or by
        // configuration management, which could later restore it without
        // the new key, so rotation leaves it alone.
        if let Err(error) = OpenOptions::new().write(true).open(path) {
            return failed(
                "checking that the key file is writable",
                format!(
                    "cannot open {} for writing: {error}; add a `key` line, point `active` at it, and restart, or make the file writable by the engine's user",
                    path.display()
                ),
            );
        }
        let mut keyring = match std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))
            .and_then(|text| Keyring::parse(path, &text).map_err(|error| error.to_string()))
        {
            Ok(keyring) => keyring,
            Err(error) => return failed("reading the key file", error),
        };
        let previous = keyring.active_id();
        let new_id = match keyring.rotate() {
            Ok(id) => id,
            Err(error) => return failed("creating a key", error.to_string()),
        };

        let mut staged = keyring.clone();
        if let Err(error) = staged.set_active(previous) {
            return failed("staging the new key", error.to_string());
        }
        if let Err(error) = self.install_keyring(staged) {
            return failed("giving every core the new key", error);
        }
        if let Err(error) = keyring.save(path) {
            return failed("writing the key file", error.to_string());
        }
        // From here the key file names the new key, and the next start
        // seals with it even if a core misses the switch below.
        crate::audit::key_rotated(uid, new_id, previous);
        if let Err(error) = self.install_keyring(keyring) {
            tracing::error!(key_id = new_id, %error, "keys: the key file names the new key, but not every core uses it yet; they do after a restart");
            return json!({"ok": false, "error": format!("key {new_id} is saved as the active key in {}, but not every core switched to it: {error}; restart the engine to finish", path.display())});
        }
        tracing::info!(
            key_id = new_id,
            previous_key_id = previous,
            operator_uid = uid,
            "keys: spool key rotated"
        );
        json!({"ok": true, "key_id": new_id, "previous_key_id": previous, "key_file": path.display().to_string()})
    }

    /// Sends `keyring` to every executor and checks that each installed it.
    fn install_keyring(&self, keyring: Keyring) -> Result<(), String> {
        let answers = self.broadcast(ControlCommand::InstallKeyring(Arc::new(keyring)));
        if answers.len() != self.executors.len() {
            return Err(format!(
                "{} of {} executors took the command",
                answers.len(),
                self.executors.len()
            ));
        }
        match answers.iter().find_map(|answer| answer.get("error")) {
            Some(error) => Err(error.as_str().unwrap_or("unknown error").to_string()),
            None => Ok(()),
        }
    }

    fn broadcast(&self, command: ControlCommand) -> Vec<Value> {
        let mut pending = Vec::new();
        for executor in &self.executors {
            let (reply, answer) = crossbeam_channel::bounded(1);
            let request = ControlRequest {
                command: command.clone(),
                reply,
            };
            match executor.try_send(request) {
                Ok(()) => pending.push(answer),
                Err(_) => {
                    tracing::error!("control: an executor's command channel is full or closed")
                }
            }
        }
        pending
            .into_iter()
            .map(|answer| {
                answer
                    .recv_timeout(EXECUTOR_REPLY_TIMEOUT)
                    .unwrap_or_else(|_| json!({"error": "executor did not answer within 10 s"}))
            })
            .collect()
    }

    fn audit(
        &self,
        uid: u32,
        command: &str,
        destination: Option<&str>,
        address_hmac: Option<&str>,
    ) {
        // The hash-chained control stream replaces this plain line unless
        // auditing is off.
        if crate::audit::admin(uid, command, destination, address_hmac) {
            return;
        }
        let line = json!({
            "at_us": now_us(),
            "event": "admin",
            "operator_uid": uid,
            "command": command,
            "destination": destination,
            "address_hmac": address_hmac,
        });
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_file)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
        if let Err(error) = result {
            tracing::error!(path = %self.audit_file.display(), %error, "control: audit line could not be written");
        }
    }
}

/// Sends one command to a running engine and returns its response.
pub fn request(socket: &Path, request: &Value) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).map_err(|error| {
        format!(
            "cannot connect to the control socket {}: {error}; is `caduceus serve` running with this state_dir?",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|error| error.to_string())?;
    let mut writer = stream.try_clone().map_err(|error| error.to_string())?;
    writer
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|error| format!("control socket write failed: {error}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|error| format!("control socket read failed: {error}"))?;
    if line.is_empty() {
        // The engine closed the connection before replying, which happens
        // when it stops or dies during the command.
        return Err(format!(
            "the engine closed the control socket {} without a reply; it may have stopped, so check its log and whether the command took effect",
            socket.display()
        ));
    }
    serde_json::from_str(&line)
        .map_err(|error| format!("control socket sent invalid JSON: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that closes the connection without a reply produces an
    /// error naming the closed socket, instead of a JSON parse error.
    #[test]
    fn request_reports_closed_connection() {
        let directory = tempfile::tempdir().expect("tempdir");
        let socket = directory.path().join("control.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("read request");
        });

        let error = request(&socket, &json!({"command": "keys.rotate"})).expect_err("no reply");
        server.join().expect("server thread");
        assert!(error.contains("closed the control socket"), "{error}");
        assert!(!error.contains("invalid JSON"), "{error}");
    }
}
