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
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{Value, json};

use crate::deliverylog::now_us;

/// A command for one executor.
#[derive(Clone, Debug)]
pub enum ControlCommand {
    QueueList,
    Hold(String),
    Release(String),
    Delete(String),
    Requeue(String),
}

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

/// The state behind the control socket.
pub struct ControlPlane {
    pub executors: Vec<crossbeam_channel::Sender<ControlRequest>>,
    pub holds_file: PathBuf,
    pub audit_file: PathBuf,
    pub shutdown: Arc<AtomicBool>,
}

/// Reads the destinations the operator held, saved across restarts.
pub fn load_holds(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<Vec<String>>(&text).unwrap_or_else(|error| {
            tracing::error!(path = %path.display(), %error, "control: holds file is invalid; starting with no holds");
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
    pub fn serve(self, listener: UnixListener) {
        let mut holds: BTreeSet<String> = load_holds(&self.holds_file).into_iter().collect();
        if let Err(error) = listener.set_nonblocking(true) {
            tracing::error!(%error, "control: socket could not be made non-blocking; control commands are unavailable");
            return;
        }
        while !self.shutdown.load(Ordering::Acquire) {
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

    fn handle(&self, stream: UnixStream, holds: &mut BTreeSet<String>) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let credentials = getsockopt(&stream, PeerCredentials)
            .map_err(|errno| std::io::Error::from_raw_os_error(errno as i32))?;
        let uid = credentials.uid();
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            let response = match serde_json::from_str::<Value>(&line) {
                Ok(request) => self.execute(&request, uid, holds),
                Err(error) => {
                    json!({"ok": false, "error": format!("request is not valid JSON: {error}")})
                }
            };
            let mut text = response.to_string();
            text.push('\n');
            writer.write_all(text.as_bytes())?;
            line.clear();
        }
        Ok(())
    }

    fn execute(&self, request: &Value, uid: u32, holds: &mut BTreeSet<String>) -> Value {
        let command = request.get("command").and_then(Value::as_str).unwrap_or("");
        let destination = request
            .get("destination")
            .and_then(Value::as_str)
            .map(|text| text.trim().trim_end_matches('.').to_ascii_lowercase());
        self.audit(uid, command, destination.as_deref());
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
                return json!({"ok": false, "error": format!("unknown command {other:?}; expected queue.list, queue.hold, queue.release, queue.delete, queue.requeue or ping")});
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

    fn audit(&self, uid: u32, command: &str, destination: Option<&str>) {
        let line = json!({
            "at_us": now_us(),
            "event": "admin",
            "operator_uid": uid,
            "command": command,
            "destination": destination,
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
    serde_json::from_str(&line)
        .map_err(|error| format!("control socket sent invalid JSON: {error}"))
}
