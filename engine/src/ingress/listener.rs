//! The glommio side of the submission sockets: binding, accepting,
//! SO_PEERCRED checks and the per-connection read/write loop.
//!
//! Accepting uses a non-blocking std `UnixListener` polled from the
//! executor, not glommio's `UnixListener`, because glommio 0.9 can neither
//! wrap an already bound listener nor expose the raw fd of an accepted
//! `UnixStream`, and SO_PEERCRED needs that fd. The accepted std stream is
//! checked first and then handed to glommio with `FromRawFd`, which glommio
//! 0.9 implements for `UnixStream`. The poll interval starts at
//! `MIN_ACCEPT_POLL` after each accepted connection and doubles up to
//! `MAX_ACCEPT_POLL` while the socket is idle. That bounds the added
//! connect latency at 10 ms and the idle cost at 100 wakeups a second. A
//! helper thread blocking in accept(2) was rejected: it would need its own
//! shutdown path and would move connections between threads.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use caduceus_policy::Lane;
use caduceus_policy::config::{IngressConfig, LaneConfig};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use nix::sys::socket::{MsgFlags, getsockopt, send, sockopt};
use nix::unistd::{Gid, Group, Uid, User, chown};

use super::session::{Progress, Session, SessionLimits};
use super::{Admission, PeerCredentials};
use crate::smtp::{EnhancedStatus, Reply};

const MIN_ACCEPT_POLL: Duration = Duration::from_millis(1);
const MAX_ACCEPT_POLL: Duration = Duration::from_millis(10);
/// The wait after an accept error such as EMFILE, so that a full fd table
/// does not turn the accept loop into a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How often shutdown checks whether the remaining sessions ended.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// One read from a connection. Replies to one read are written together,
/// so this also bounds the output queued per read.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// A failure to set up a submission socket. Each message names the path
/// and what to change.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "cannot create the socket directory {path}: {source}; create it or fix the permissions of its parent"
    )]
    CreateDirectory { path: PathBuf, source: io::Error },
    #[error(
        "{path} exists and is not a socket; remove it or set another `socket` path for the lane"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "{path} is in use by a running server; stop that server or set another `socket` path for the lane"
    )]
    InUse { path: PathBuf },
    #[error("cannot remove the stale socket {path}: {source}; remove it by hand")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind {path}: {source}; check that the directory is writable")]
    Bind { path: PathBuf, source: io::Error },
    #[error("invalid socket_mode {mode:?} for {path}: expected an octal string such as \"0660\"")]
    InvalidMode { path: PathBuf, mode: String },
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    SetMode {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error(
        "socket_owner {name:?} for {path} is not a known user; use an existing user name or a numeric uid"
    )]
    UnknownUser { path: PathBuf, name: String },
    #[error(
        "socket_group {name:?} for {path} is not a known group; use an existing group name or a numeric gid"
    )]
    UnknownGroup { path: PathBuf, name: String },
    #[error(
        "cannot change the owner of {path}: {source}; giving a socket to another user needs root (CAP_CHOWN)"
    )]
    Chown { path: PathBuf, source: io::Error },
}

/// Binds a lane's submission socket.
///
/// Creates the parent directory, removes a stale socket file left by a
/// previous run (but refuses to touch a live socket or any other file), then
/// sets the mode and owner from `lane_config`. The socket file is created
/// under the process umask, so the mode is set explicitly after bind.
/// Between bind and chmod the file carries the umask's mode; the uid and gid
/// allow-lists still apply to any peer that connects in that window.
pub fn bind_socket(path: &Path, lane_config: &LaneConfig) -> Result<UnixListener, BindError> {
    let mode = parse_mode(&lane_config.socket_mode).ok_or_else(|| BindError::InvalidMode {
        path: path.to_path_buf(),
        mode: lane_config.socket_mode.clone(),
    })?;
    let owner = lane_config
        .socket_owner
        .as_deref()
        .map(|name| resolve_user(path, name))
        .transpose()?;
    let group = lane_config
        .socket_group
        .as_deref()
        .map(|name| resolve_group(path, name))
        .transpose()?;

    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| BindError::CreateDirectory {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    remove_stale_socket(path)?;

    let listener = UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        BindError::SetMode {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    if owner.is_some() || group.is_some() {
        chown(path, owner, group).map_err(|errno| BindError::Chown {
            path: path.to_path_buf(),
            source: io::Error::from(errno),
        })?;
    }
    tracing::info!(path = %path.display(), mode = format!("{mode:04o}"), "ingress: socket bound");
    Ok(listener)
}

fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|byte| (b'0'..=b'7').contains(&byte)) {
        return None;
    }
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
}

fn resolve_user(path: &Path, name: &str) -> Result<Uid, BindError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid),
        _ => Err(BindError::UnknownUser {
            path: path.to_path_buf(),
            name: name.to_string(),
        }),
    }
}

fn resolve_group(path: &Path, name: &str) -> Result<Gid, BindError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        _ => Err(BindError::UnknownGroup {
            path: path.to_path_buf(),
            name: name.to_string(),
        }),
    }
}

/// Removes a socket file that no server listens on any more.
fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::RemoveStale {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(BindError::InUse {
            path: path.to_path_buf(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BindError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A one-shot shutdown signal for [`serve_socket`], shared through an `Rc`
/// on one executor thread. Another thread cannot trigger it directly. A
/// signal handler or control thread relays the request to a task on this
/// executor, for example through an atomic flag that the task polls, and
/// that task calls [`Shutdown::trigger`].
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: Cell<bool>,
    next_waiter_id: Cell<u64>,
    waiters: RefCell<HashMap<u64, Waker>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown and wakes every waiting session.
    pub fn trigger(&self) {
        self.triggered.set(true);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waker in waiters.into_values() {
            waker.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Returns a future that resolves once [`Shutdown::trigger`] was called.
    pub fn wait(&self) -> ShutdownWait<'_> {
        let id = self.next_waiter_id.get();
        self.next_waiter_id.set(id + 1);
        ShutdownWait { shutdown: self, id }
    }
}

/// The future returned by [`Shutdown::wait`]. Dropping it removes its
/// waker, so finished sessions leave nothing behind.
#[derive(Debug)]
pub struct ShutdownWait<'a> {
    shutdown: &'a Shutdown,
    id: u64,
}

impl Future for ShutdownWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.shutdown.triggered.get() {
            return Poll::Ready(());
        }
        self.shutdown
            .waiters
            .borrow_mut()
            .insert(self.id, context.waker().clone());
        Poll::Pending
    }
}

impl Drop for ShutdownWait<'_> {
    fn drop(&mut self) {
        self.shutdown.waiters.borrow_mut().remove(&self.id);
    }
}

/// Serves one lane's socket on the current glommio executor until
/// `shutdown` is triggered. Then it stops accepting, closes idle sessions
/// with `421 4.3.2`, lets sessions in DATA finish their message, and returns
/// once every session ended. Accept errors are logged and retried; only a
/// failure to configure the listener is returned.
pub async fn serve_socket<A: Admission + 'static>(
    listener: UnixListener,
    lane: Lane,
    lane_config: Rc<LaneConfig>,
    ingress: Rc<IngressConfig>,
    hostname: Rc<str>,
    admission: Rc<A>,
    shutdown: Rc<Shutdown>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let active_sessions = Rc::new(Cell::new(0_usize));
    let mut poll_interval = MIN_ACCEPT_POLL;
    tracing::info!(lane = lane.as_str(), "ingress: accepting connections");
    while !shutdown.is_triggered() {
        match listener.accept() {
            Ok((stream, _)) => {
                poll_interval = MIN_ACCEPT_POLL;
                let Some(peer) = check_peer(&stream, lane, &lane_config) else {
                    continue;
                };
                let fd = stream.into_raw_fd();
                // SAFETY: `into_raw_fd` gave up ownership of an open, connected
                // stream socket, so glommio becomes its only owner and closes
                // it exactly once. On Linux, accept(2) does not pass the
                // listener's O_NONBLOCK on, so the fd is blocking, like the
                // sockets glommio accepts itself.
                let stream = unsafe { glommio::net::UnixStream::from_raw_fd(fd) };
                let session = Session::new(
                    lane,
                    lane_config.default_category,
                    hostname.clone(),
                    peer,
                    SessionLimits::from(&*ingress),
                );
                active_sessions.set(active_sessions.get() + 1);
                let task_sessions = active_sessions.clone();
                let task = run_session(
                    stream,
                    session,
                    admission.clone(),
                    ingress.clone(),
                    shutdown.clone(),
                    lane,
                    peer,
                );
                glommio::spawn_local(async move {
                    task.await;
                    task_sessions.set(task_sessions.get() - 1);
                })
                .detach();
                // A burst of connections must not keep the new sessions
                // from running.
                glommio::yield_if_needed().await;
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                let wait = async {
                    glommio::timer::sleep(poll_interval).await;
                };
                futures_lite::future::or(wait, shutdown.wait()).await;
                poll_interval = (poll_interval * 2).min(MAX_ACCEPT_POLL);
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => {
                // EMFILE and ENFILE are the likely causes; raising
                // `ulimit -n` (LimitNOFILE in systemd) is the usual fix.
                tracing::warn!(lane = lane.as_str(), error = %error, "ingress: accept failed; retrying");
                glommio::timer::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    drop(listener);
    tracing::info!(
        lane = lane.as_str(),
        sessions = active_sessions.get(),
        "ingress: stopped accepting; waiting for sessions to end"
    );
    while active_sessions.get() > 0 {
        glommio::timer::sleep(DRAIN_POLL).await;
    }
    tracing::info!(lane = lane.as_str(), "ingress: all sessions ended");
    Ok(())
}

/// Reads SO_PEERCRED and applies the lane's allow-lists. A rejected peer
/// gets `554 5.7.1` and is closed.
fn check_peer(
    stream: &UnixStream,
    lane: Lane,
    lane_config: &LaneConfig,
) -> Option<PeerCredentials> {
    let credentials = match getsockopt(stream, sockopt::PeerCredentials) {
        Ok(credentials) => credentials,
        Err(errno) => {
            tracing::warn!(lane = lane.as_str(), error = %errno, "ingress: SO_PEERCRED failed; connection closed");
            return None;
        }
    };
    let peer = PeerCredentials {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: u32::try_from(credentials.pid()).unwrap_or(0),
    };

    let lists_empty = lane_config.allowed_uids.is_empty() && lane_config.allowed_gids.is_empty();
    let allowed = lists_empty
        || lane_config.allowed_uids.contains(&peer.uid)
        || lane_config.allowed_gids.contains(&peer.gid);
    if allowed {
        return Some(peer);
    }

    tracing::warn!(
        lane = lane.as_str(),
        uid = peer.uid,
        gid = peer.gid,
        pid = peer.pid,
        "ingress: peer not in allowed_uids or allowed_gids; connection rejected"
    );
    let rejection = Reply::new(
        554,
        EnhancedStatus::new(5, 7, 1),
        "Submission not permitted for this user",
    )
    .to_wire();
    // The socket is new and its send buffer empty, so one non-blocking
    // send of a short reply completes. If it does not, the peer only misses
    // the reason, because the connection is closed either way.
    let _ = send(
        std::os::fd::AsRawFd::as_raw_fd(stream),
        &rejection,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
    None
}

/// The outcome of waiting for input.
enum Wakeup {
    Read(io::Result<usize>),
    TimedOut,
    Shutdown,
}

async fn run_session<A: Admission>(
    mut stream: glommio::net::UnixStream,
    mut session: Session,
    admission: Rc<A>,
    ingress: Rc<IngressConfig>,
    shutdown: Rc<Shutdown>,
    lane: Lane,
    peer: PeerCredentials,
) {
    tracing::debug!(
        lane = lane.as_str(),
        uid = peer.uid,
        pid = peer.pid,
        "ingress: session started"
    );
    let mut buffer = vec![0_u8; READ_BUFFER_BYTES];
    loop {
        if session.has_output() && !write_output(&mut stream, &mut session, &ingress, lane).await {
            return;
        }
        if session.is_closed() {
            break;
        }
        if shutdown.is_triggered() && !session.in_data() {
            session.close_with(&Reply::new(
                421,
                EnhancedStatus::new(4, 3, 2),
                "Service shutting down, closing connection",
            ));
            continue;
        }
        let in_data = session.in_data();
        let timeout = if in_data {
            ingress.data_timeout.get()
        } else {
            ingress.command_timeout.get()
        };
        let read = async { Wakeup::Read(stream.read(&mut buffer).await) };
        let timer = async {
            glommio::timer::sleep(timeout).await;
            Wakeup::TimedOut
        };
        let stop = async {
            if in_data {
                std::future::pending::<()>().await;
            } else {
                shutdown.wait().await;
            }
            Wakeup::Shutdown
        };
        let wakeup = futures_lite::future::or(read, futures_lite::future::or(timer, stop)).await;
        match wakeup {
            Wakeup::Read(Ok(0)) => {
                tracing::debug!(
                    lane = lane.as_str(),
                    pid = peer.pid,
                    "ingress: client closed the connection"
                );
                break;
            }
            Wakeup::Read(Ok(length)) => {
                session.push_input(&buffer[..length]);
                if !advance_session(&mut stream, &mut session, &*admission, &ingress, lane).await {
                    return;
                }
            }
            Wakeup::Read(Err(error)) => {
                tracing::info!(lane = lane.as_str(), pid = peer.pid, error = %error, "ingress: read failed; session ended");
                break;
            }
            Wakeup::TimedOut => {
                tracing::info!(
                    lane = lane.as_str(),
                    pid = peer.pid,
                    timeout_ms = timeout.as_millis() as u64,
                    in_data,
                    "ingress: client timed out"
                );
                session.close_with(&Reply::new(
                    421,
                    EnhancedStatus::new(4, 4, 2),
                    "Timeout exceeded, closing connection",
                ));
            }
            Wakeup::Shutdown => {}
        }
    }
    let _ = stream.close().await;
}

/// Runs the session over the buffered input, submitting complete messages.
/// Returns false when the connection failed.
async fn advance_session<A: Admission>(
    stream: &mut glommio::net::UnixStream,
    session: &mut Session,
    admission: &A,
    ingress: &IngressConfig,
    lane: Lane,
) -> bool {
    loop {
        match session.advance(admission, SystemTime::now()) {
            Progress::NeedInput | Progress::Close => return true,
            Progress::Submit(submission) => {
                // Replies queued before the final dot go out before the
                // possibly slow durable append (RFC 2920 §3.2).
                if session.has_output() && !write_output(stream, session, ingress, lane).await {
                    return false;
                }
                let message_id = submission.message_id;
                let recipients = submission.recipients.len();
                let size_bytes = submission.body.len();
                let category = submission.category;
                let result = admission.submit(*submission).await;
                match &result {
                    // Debug level: the delivery log's `received` line
                    // already records every accepted message, and a
                    // formatted line per message costs throughput.
                    Ok(()) => tracing::debug!(
                        lane = lane.as_str(),
                        message_id = %hex::encode(message_id),
                        category = category.as_str(),
                        recipients,
                        size_bytes,
                        "ingress: message queued"
                    ),
                    Err(reply) => tracing::info!(
                        lane = lane.as_str(),
                        message_id = %hex::encode(message_id),
                        reply = %reply,
                        "ingress: message not queued"
                    ),
                }
                session.finish_submission(message_id, result);
            }
        }
    }
}

/// Writes the queued replies within the command timeout. Returns false when
/// the connection failed.
async fn write_output(
    stream: &mut glommio::net::UnixStream,
    session: &mut Session,
    ingress: &IngressConfig,
    lane: Lane,
) -> bool {
    let output = session.take_output();
    let timeout = ingress.command_timeout.get();
    let write = async { Some(stream.write_all(&output).await) };
    let timer = async {
        glommio::timer::sleep(timeout).await;
        None
    };
    match futures_lite::future::or(write, timer).await {
        Some(Ok(())) => true,
        Some(Err(error)) => {
            tracing::info!(lane = lane.as_str(), error = %error, "ingress: write failed; session ended");
            false
        }
        None => {
            tracing::info!(
                lane = lane.as_str(),
                timeout_ms = timeout.as_millis() as u64,
                "ingress: write timed out; session ended"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests;
