//! The audit trail: who submitted which message, what became of each
//! recipient, which DSNs were generated and which administrative commands
//! ran, kept so that an edit by an insider is detectable.
//!
//! Each executor writes its own stream (`core-<N>`) and the control thread
//! writes `control`, so no mutable state is shared between threads. Streams
//! live in `<state_dir>/log/audit/` as daily files, hash-chained and
//! checkpointed with Ed25519 signatures (see [`chain`]). Subjects, bodies
//! and reply texts never appear: a remote reply may quote the recipient's
//! address, which `recipient_logging = "hmac"` promises to hide.
//!
//! Durability: the `accepted` record shares the spool's group commit. It is
//! staged when the message is appended to the spool, and the `250` waits
//! for the spool's sync only. The flush task writes and syncs the staged
//! records every 100 ms through io_uring (`fdatasync` on a glommio
//! `BufferedFile` opened on the same path). A crash can lose staged records,
//! but not the spool record that contains the same fields, so the start
//! rebuilds the lost `accepted` records from the spool (see [`reconcile`]).
//! A finished message is released from the spool only once its records are
//! synced.

pub mod chain;
pub mod date;
pub mod key;
pub mod reconcile;
pub mod record;
pub mod report;
pub mod verify;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use caduceus_policy::config::Config;
use caduceus_spool::{
    Envelope, ListAppends, MessageId, RecordRef, RecoveryReport, Shard as SpoolShard,
};
use glommio::io::BufferedFile;

use crate::deliverylog::{Entry, Event, now_us};
use chain::{Record, StreamWriter};
use key::AuditKey;
use record::Fields;

/// How often an executor writes and syncs its staged records.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Staged bytes that are written out at once rather than at the next flush,
/// to bound the buffer.
const WRITE_OUT_BYTES: usize = 1 << 20;

/// One audit record's own fields; the chain fields come first on the line.
/// The fields borrow from the caller, so building a record copies nothing.
/// [`Record::write_fields`] below sets the field names and their order.
#[derive(Debug)]
pub enum AuditEvent<'a> {
    /// A stream opened (engine start).
    Started { pid: u32 },
    /// A message was accepted from a client on a lane socket. `recovered`
    /// marks a record rebuilt from the spool at start, after a crash kept
    /// the original from the file.
    Accepted {
        message_id: MessageId,
        lane: &'static str,
        category: &'static str,
        peer_uid: u32,
        peer_gid: u32,
        peer_pid: u32,
        recipients: usize,
        size_bytes: u64,
        received_at_us: u64,
        /// The spool record (see [`reconcile`]); absent from a record
        /// rebuilt from an adopted shard.
        spool: Option<RecordRef>,
        recovered: bool,
        /// The adopted shard whose spool a record was rebuilt from.
        from_shard: Option<u16>,
    },
    /// A message of another executor's spool shard, left by an earlier
    /// allocation of cores, was copied into this executor's shard.
    Adopted {
        message_id: MessageId,
        from_shard: u16,
        lane: &'static str,
        category: &'static str,
        /// The recipients still pending, which the copy carries.
        recipients: usize,
        spool: RecordRef,
    },
    /// The start checked the spool shard for `accepted` records that a
    /// crash kept from the files, and rebuilt `recovered` of them. `spool`
    /// is the shard's last append then; absent when the shard was empty.
    SpoolReconciled {
        spool: Option<RecordRef>,
        recovered: usize,
    },
    /// One recipient's outcome: delivered, deferred, bounced, expired or
    /// deleted (the `outcome` field).
    Outcome(OutcomeRecord<'a>),
    /// A delivery status notification was generated for a message.
    Dsn {
        message_id: &'a str,
        dsn_message_id: &'a str,
        action: &'static str,
        lane: &'static str,
        /// The DSN's spool record.
        spool: RecordRef,
    },
    /// An administrative command on the control socket.
    Admin {
        operator_uid: u32,
        command: &'a str,
        destination: Option<&'a str>,
        /// The HMAC of the address a suppression or consent command named.
        address_hmac: Option<&'a str>,
    },
    /// A `keys.rotate` command finished: new records are sealed with
    /// `key_id`.
    KeyRotated {
        operator_uid: u32,
        key_id: u32,
        previous_key_id: u32,
    },
    /// An operator was shown a spooled message's envelope with `caduceus
    /// spool show`: addresses, states and sizes, but no content.
    EnvelopeViewed {
        operator_uid: u32,
        message_id: &'a str,
        /// The spool shard that contains the message.
        shard: u16,
    },
    /// An operator was shown a spooled message's decrypted content with
    /// `caduceus spool show --content`. The content itself is never
    /// recorded.
    ContentViewed {
        operator_uid: u32,
        message_id: &'a str,
        shard: u16,
    },
    /// Files past the retention period were deleted.
    RetentionDeleted {
        files: &'a [String],
        through_seq: u64,
        retention_days: u64,
    },
    /// Checkpoint files past the retention period were deleted. Any
    /// stream's retention may delete them, so the stream that deleted them
    /// records it.
    CheckpointsDeleted {
        files: &'a [String],
        retention_days: u64,
    },
    /// A crash interrupted a line's write; the fragment was cut off when
    /// the stream reopened.
    TornTailDiscarded { file: &'a str, bytes: u64 },
}

impl Record for AuditEvent<'_> {
    fn write_fields(&self, fields: &mut Fields<'_>) {
        match self {
            AuditEvent::Started { pid } => {
                fields.str("event", "started");
                fields.u64("pid", u64::from(*pid));
            }
            AuditEvent::Accepted {
                message_id,
                lane,
                category,
                peer_uid,
                peer_gid,
                peer_pid,
                recipients,
                size_bytes,
                received_at_us,
                spool,
                recovered,
                from_shard,
            } => {
                fields.str("event", "accepted");
                fields.message_id("message_id", message_id);
                fields.str("lane", lane);
                fields.str("category", category);
                fields.u64("peer_uid", u64::from(*peer_uid));
                fields.u64("peer_gid", u64::from(*peer_gid));
                fields.u64("peer_pid", u64::from(*peer_pid));
                fields.u64("recipients", *recipients as u64);
                fields.u64("size_bytes", *size_bytes);
                fields.u64("received_at_us", *received_at_us);
                if let Some(spool) = spool {
                    fields.location("spool", *spool);
                }
                if *recovered {
                    fields.bool("recovered", true);
                }
                fields.opt_u64("from_shard", from_shard.map(u64::from));
            }
            AuditEvent::Adopted {
                message_id,
                from_shard,
                lane,
                category,
                recipients,
                spool,
            } => {
                fields.str("event", "adopted");
                fields.message_id("message_id", message_id);
                fields.u64("from_shard", u64::from(*from_shard));
                fields.str("lane", lane);
                fields.str("category", category);
                fields.u64("recipients", *recipients as u64);
                fields.location("spool", *spool);
            }
            AuditEvent::SpoolReconciled { spool, recovered } => {
                fields.str("event", "spool_reconciled");
                if let Some(spool) = spool {
                    fields.location("spool", *spool);
                }
                fields.u64("recovered", *recovered as u64);
            }
            AuditEvent::Outcome(outcome) => {
                fields.str("event", "outcome");
                outcome.write_fields(fields);
            }
            AuditEvent::Dsn {
                message_id,
                dsn_message_id,
                action,
                lane,
                spool,
            } => {
                fields.str("event", "dsn");
                fields.str("message_id", message_id);
                fields.str("dsn_message_id", dsn_message_id);
                fields.str("action", action);
                fields.str("lane", lane);
                fields.location("spool", *spool);
            }
            AuditEvent::Admin {
                operator_uid,
                command,
                destination,
                address_hmac,
            } => {
                fields.str("event", "admin");
                fields.u64("operator_uid", u64::from(*operator_uid));
                fields.str("command", command);
                fields.opt_str("destination", *destination);
                fields.opt_str("address_hmac", *address_hmac);
            }
            AuditEvent::KeyRotated {
                operator_uid,
                key_id,
                previous_key_id,
            } => {
                fields.str("event", "key_rotated");
                fields.u64("operator_uid", u64::from(*operator_uid));
                fields.u64("key_id", u64::from(*key_id));
                fields.u64("previous_key_id", u64::from(*previous_key_id));
            }
            AuditEvent::EnvelopeViewed {
                operator_uid,
                message_id,
                shard,
            } => {
                fields.str("event", "envelope_viewed");
                fields.u64("operator_uid", u64::from(*operator_uid));
                fields.str("message_id", message_id);
                fields.u64("shard", u64::from(*shard));
            }
            AuditEvent::ContentViewed {
                operator_uid,
                message_id,
                shard,
            } => {
                fields.str("event", "content_viewed");
                fields.u64("operator_uid", u64::from(*operator_uid));
                fields.str("message_id", message_id);
                fields.u64("shard", u64::from(*shard));
            }
            AuditEvent::RetentionDeleted {
                files,
                through_seq,
                retention_days,
            } => {
                fields.str("event", "retention_deleted");
                fields.str_list("files", files);
                fields.u64("through_seq", *through_seq);
                fields.u64("retention_days", *retention_days);
            }
            AuditEvent::CheckpointsDeleted {
                files,
                retention_days,
            } => {
                fields.str("event", "checkpoints_deleted");
                fields.str_list("files", files);
                fields.u64("retention_days", *retention_days);
            }
            AuditEvent::TornTailDiscarded { file, bytes } => {
                fields.str("event", "torn_tail_discarded");
                fields.str("file", file);
                fields.u64("bytes", *bytes);
            }
        }
    }
}

/// The fields of an outcome record, borrowed from its delivery log entry.
#[derive(Debug)]
pub struct OutcomeRecord<'a> {
    pub outcome: &'static str,
    pub message_id: &'a str,
    pub lane: &'static str,
    pub category: &'static str,
    /// The address or `hmac:<hex>`, per `recipient_logging`.
    pub recipient: Option<&'a str>,
    pub remote_host: Option<&'a str>,
    pub remote_ip: Option<&'a str>,
    pub reply_code: Option<u16>,
    pub tls_version: Option<&'a str>,
    pub tls_cipher: Option<&'a str>,
    pub attempt: Option<u32>,
    pub received_at_us: u64,
}

fn event_name(event: Event) -> &'static str {
    match event {
        Event::Received => "received",
        Event::Delivered => "delivered",
        Event::Deferred => "deferred",
        Event::Bounced => "bounced",
        Event::Expired => "expired",
        Event::Deleted => "deleted",
    }
}

impl<'a> OutcomeRecord<'a> {
    /// Takes the fields of a delivery log entry. The recipient there is
    /// already in the form `recipient_logging` asks for.
    pub fn from_entry(entry: &'a Entry<'_>) -> OutcomeRecord<'a> {
        OutcomeRecord {
            outcome: event_name(entry.event),
            message_id: entry.message_id,
            lane: entry.lane.as_str(),
            category: entry.category.as_str(),
            recipient: entry.recipient.as_deref(),
            remote_host: entry.remote_host,
            remote_ip: entry.remote_ip.as_deref(),
            reply_code: entry.reply_code,
            tls_version: entry.tls_version,
            tls_cipher: entry.tls_cipher,
            attempt: entry.attempt,
            received_at_us: entry.received_at_us,
        }
    }

    /// Writes the fields after `"event":"outcome"`.
    fn write_fields(&self, fields: &mut Fields<'_>) {
        fields.str("outcome", self.outcome);
        fields.str("message_id", self.message_id);
        fields.str("lane", self.lane);
        fields.str("category", self.category);
        fields.opt_str("recipient", self.recipient);
        fields.opt_str("remote_host", self.remote_host);
        fields.opt_str("remote_ip", self.remote_ip);
        fields.opt_u64("reply_code", self.reply_code.map(u64::from));
        fields.opt_str("tls_version", self.tls_version);
        fields.opt_str("tls_cipher", self.tls_cipher);
        fields.opt_u64("attempt", self.attempt.map(u64::from));
        fields.u64("received_at_us", self.received_at_us);
    }
}

/// The directory of the audit streams.
pub fn audit_dir(config: &Config) -> PathBuf {
    config.log_dir().join("audit")
}

/// Settings shared by every stream of one engine: the directory, the
/// signing key and the retention. Built once on the main thread.
pub struct AuditSetup {
    dir: PathBuf,
    key: Arc<AuditKey>,
    retention: Duration,
}

impl AuditSetup {
    /// Creates the audit directory and loads or creates the signing key.
    /// Returns `None` when `[audit] enabled = false`.
    pub fn open(config: &Config) -> Result<Option<Arc<AuditSetup>>, String> {
        if !config.audit.enabled {
            tracing::warn!(
                "audit: the audit trail is off (audit.enabled = false); accepted messages and outcomes are not recorded in it"
            );
            return Ok(None);
        }
        let dir = audit_dir(config);
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let key = AuditKey::load_or_create(&config.state_dir.join("keys"))?;
        Ok(Some(Arc::new(AuditSetup {
            dir,
            key: Arc::new(key),
            retention: config.audit.retention.get(),
        })))
    }

    /// Opens a stream, records the start and any repaired tail, and
    /// applies retention.
    pub fn open_stream(&self, name: &str) -> Result<StreamWriter, String> {
        let now = now_us();
        let (mut writer, recovery) =
            StreamWriter::open(&self.dir, name, self.key.clone(), self.retention, now).map_err(
                |error| {
                    format!(
                        "audit stream {name} in {} failed to open: {error}",
                        self.dir.display()
                    )
                },
            )?;
        let mut record = || -> std::io::Result<()> {
            if let Some(file) = recovery.torn_file.clone() {
                tracing::warn!(
                    stream = name,
                    file,
                    bytes = recovery.torn_bytes,
                    "audit: cut off an incomplete last line left by a crash"
                );
                writer.stage(
                    &AuditEvent::TornTailDiscarded {
                        file: &file,
                        bytes: recovery.torn_bytes,
                    },
                    now,
                )?;
            }
            writer.stage(
                &AuditEvent::Started {
                    pid: std::process::id(),
                },
                now,
            )?;
            writer.apply_retention(now)?;
            writer.write_and_sync()
        };
        record().map_err(|error| format!("audit stream {name} failed to write: {error}"))?;
        Ok(writer)
    }
}

/// An executor's stream, with io_uring syncs shared by concurrent callers.
pub struct CoreStream {
    writer: RefCell<StreamWriter>,
    /// A read-only handle on the current file for io_uring `fdatasync`,
    /// reopened after a rotation (the generation changes).
    sync_file: RefCell<Option<(u64, Rc<BufferedFile>)>>,
    /// One sync at a time; callers that queue behind it usually find their
    /// record covered when they get the permit.
    sync_lock: glommio::sync::Semaphore,
    synced_seq: Cell<u64>,
    closed: Cell<bool>,
    /// The spool records that may lack their `accepted` records, found when
    /// the stream opened (see [`reconcile`]).
    appends_to_check: ListAppends,
    /// Finished messages to release from the spool once the stream is
    /// synced through the seq beside them, in seq order.
    releases: RefCell<Vec<(u64, RecordRef)>>,
    spool: RefCell<Option<Rc<SpoolShard>>>,
    /// The audit directory, to read the streams of adopted shards.
    dir: PathBuf,
}

thread_local! {
    static CORE: RefCell<Option<Rc<CoreStream>>> = const { RefCell::new(None) };
    static CONTROL: RefCell<Option<StreamWriter>> = const { RefCell::new(None) };
}

fn core_stream() -> Option<Rc<CoreStream>> {
    CORE.with(|core| core.borrow().clone())
}

/// Opens executor `index`'s stream and makes it this thread's stream.
/// Call inside the executor before it opens its spool shard. Starts the
/// flush task.
pub fn install_core(setup: &AuditSetup, index: u16) -> Result<(), String> {
    let name = format!("core-{index}");
    let writer = setup.open_stream(&name)?;
    let appends_to_check = stream_appends_to_check(&setup.dir, index)?;
    let synced = writer.head().seq;
    let stream = Rc::new(CoreStream {
        writer: RefCell::new(writer),
        sync_file: RefCell::new(None),
        sync_lock: glommio::sync::Semaphore::new(1),
        synced_seq: Cell::new(synced),
        closed: Cell::new(false),
        appends_to_check,
        releases: RefCell::new(Vec::new()),
        spool: RefCell::new(None),
        dir: setup.dir.clone(),
    });
    CORE.with(|core| *core.borrow_mut() = Some(stream.clone()));
    glommio::spawn_local(async move {
        while !stream.closed.get() {
            glommio::timer::sleep(FLUSH_INTERVAL).await;
            let target = {
                let writer = stream.writer.borrow();
                (writer.has_buffered() || writer.needs_sync()).then(|| writer.head().seq)
            };
            if let Some(seq) = target
                && let Err(error) = stream.sync_through(seq).await
            {
                tracing::error!(core = index, %error, "audit: records failed to write or sync; retrying");
            }
        }
    })
    .detach();
    Ok(())
}

/// Reads stream `core-<shard>` back for [`reconcile::appends_to_check`].
fn stream_appends_to_check(dir: &Path, shard: u16) -> Result<ListAppends, String> {
    let name = format!("core-{shard}");
    let files = chain::list_streams(dir)
        .map_err(|error| format!("cannot list {}: {error}", dir.display()))?
        .into_iter()
        .find(|(stream, _)| *stream == name)
        .map(|(_, files)| files)
        .unwrap_or_default();
    reconcile::appends_to_check(&files).map_err(|error| {
        format!(
            "audit stream {name} in {} could not be read back: {error}",
            dir.display()
        )
    })
}

/// Syncs and checkpoints this executor's stream; call when the executor
/// stops.
pub async fn close_core() {
    let Some(stream) = core_stream() else {
        return;
    };
    let target = stream.writer.borrow().head().seq;
    if let Err(error) = stream.sync_through(target).await {
        tracing::error!(%error, "audit: final sync failed");
    }
    stream.closed.set(true);
    if let Err(error) = stream.writer.borrow_mut().close() {
        tracing::error!(%error, "audit: final checkpoint failed");
    }
    CORE.with(|core| core.borrow_mut().take());
}

impl CoreStream {
    /// Writes out buffered records and waits until every record up to
    /// `seq` is durable, then releases the messages waiting for it.
    async fn sync_through(&self, seq: u64) -> std::io::Result<()> {
        let _permit = self
            .sync_lock
            .acquire_permit(1)
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        if self.synced_seq.get() >= seq {
            return Ok(());
        }
        let (head, generation, path) = {
            let mut writer = self.writer.borrow_mut();
            writer.write_out()?;
            (*writer.head(), writer.generation(), writer.current_path())
        };
        let file = self.sync_handle(generation, &path).await?;
        file.fdatasync()
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        self.synced_seq.set(head.seq);
        self.release_synced();
        self.writer.borrow_mut().mark_synced(head)
    }

    /// Releases the messages whose records are now durable.
    fn release_synced(&self) {
        let synced = self.synced_seq.get();
        let mut releases = self.releases.borrow_mut();
        let ready = releases.partition_point(|(seq, _)| *seq <= synced);
        if ready == 0 {
            return;
        }
        let spool = self.spool.borrow();
        let Some(spool) = spool.as_ref() else {
            return;
        };
        for (_, record) in releases.drain(..ready) {
            spool.release(record);
        }
    }

    async fn sync_handle(&self, generation: u64, path: &Path) -> std::io::Result<Rc<BufferedFile>> {
        if let Some((cached, file)) = &*self.sync_file.borrow()
            && *cached == generation
        {
            return Ok(file.clone());
        }
        let file = Rc::new(
            BufferedFile::open(path)
                .await
                .map_err(|error| std::io::Error::other(error.to_string()))?,
        );
        *self.sync_file.borrow_mut() = Some((generation, file.clone()));
        Ok(file)
    }

    /// Stages a record, and writes out the buffer when it has grown large.
    fn stage(&self, event: &AuditEvent<'_>) -> std::io::Result<u64> {
        let mut writer = self.writer.borrow_mut();
        let seq = writer.stage(event, now_us())?;
        if writer.buffered_bytes() >= WRITE_OUT_BYTES {
            writer.write_out()?;
        }
        Ok(seq)
    }
}

/// Returns which spool records of this executor's shard may lack their
/// `accepted` records. Pass it to the spool's recovery, then hand its
/// report to [`reconcile_spool`]. `Off` without an audit stream here.
pub fn appends_to_check() -> ListAppends {
    core_stream().map_or(ListAppends::Off, |stream| stream.appends_to_check)
}

/// Rebuilds the `accepted` records of the spool records that recovery
/// listed, records the check and syncs the stream. Call once per start,
/// after the spool shard opened and before it takes new mail. A listed DSN
/// whose `dsn` record was lost is rebuilt as a recovered `accepted` record
/// too.
pub fn reconcile_spool(spool: &Rc<SpoolShard>, report: &RecoveryReport) -> Result<(), String> {
    let Some(stream) = core_stream() else {
        return Ok(());
    };
    *stream.spool.borrow_mut() = Some(spool.clone());
    stream.rebuild(report, None)
}

/// Returns which spool records of the adopted shard `orphan` may lack
/// their `accepted` records, read from that shard's own stream. `Off`
/// without an audit stream on this thread.
pub fn orphan_appends_to_check(orphan: u16) -> Result<ListAppends, String> {
    match core_stream() {
        Some(stream) => stream_appends_to_check(&stream.dir, orphan),
        None => Ok(ListAppends::Off),
    }
}

/// Rebuilds, in this executor's stream, the `accepted` records that the
/// adopted shard `orphan`'s stream lacks; see [`orphan_appends_to_check`].
pub fn reconcile_orphan(orphan: u16, report: &RecoveryReport) -> Result<(), String> {
    match core_stream() {
        Some(stream) if !report.appends.is_empty() => stream.rebuild(report, Some(orphan)),
        _ => Ok(()),
    }
}

impl CoreStream {
    /// Stages a recovered `accepted` record per listed append, then the
    /// `spool_reconciled` record when `orphan` is `None` (the own shard),
    /// and writes and syncs them.
    fn rebuild(&self, report: &RecoveryReport, orphan: Option<u16>) -> Result<(), String> {
        let mut writer = self.writer.borrow_mut();
        let now = now_us();
        let mut stage = |event: &AuditEvent<'_>| {
            writer.stage(event, now).map_err(|error| {
                format!("audit stream {} failed to write: {error}", writer.stream())
            })
        };
        for append in &report.appends {
            let spool = orphan.is_none().then_some(append.record);
            stage(&accepted_event(
                &append.envelope,
                spool,
                append.body_bytes,
                Some(orphan),
            ))?;
        }
        if orphan.is_none() {
            stage(&AuditEvent::SpoolReconciled {
                spool: report.last_append,
                recovered: report.appends.len(),
            })?;
        }
        writer
            .write_and_sync()
            .map_err(|error| format!("audit stream {} failed to sync: {error}", writer.stream()))?;
        self.synced_seq.set(writer.head().seq);
        if !report.appends.is_empty() {
            tracing::warn!(
                stream = writer.stream(),
                from_shard = orphan,
                recovered = report.appends.len(),
                "audit: rebuilt accepted records from the spool that a crash kept from the audit files"
            );
        }
        Ok(())
    }
}

/// Builds the `accepted` record of a message. `rebuilt` is `None` at
/// acceptance. For a record rebuilt at start, it contains the adopted shard
/// that the message came from, if any.
fn accepted_event(
    envelope: &Envelope,
    spool: Option<RecordRef>,
    size_bytes: u64,
    rebuilt: Option<Option<u16>>,
) -> AuditEvent<'static> {
    AuditEvent::Accepted {
        message_id: envelope.message_id,
        lane: envelope.lane.as_str(),
        category: envelope.category.as_str(),
        peer_uid: envelope.peer_uid,
        peer_gid: envelope.peer_gid,
        peer_pid: envelope.peer_pid,
        recipients: envelope.recipients.len(),
        size_bytes,
        received_at_us: envelope.received_at_us,
        spool,
        recovered: rebuilt.is_some(),
        from_shard: rebuilt.flatten(),
    }
}

/// Stages the record of a message accepted into the spool at `record`.
/// Call right after the append, before anything else is appended, so that
/// records stay in append order. The `250` need not wait for the record:
/// the spool's commit makes it recoverable (see [`reconcile`]).
pub fn accepted(envelope: &Envelope, record: RecordRef, size_bytes: usize) -> Result<(), String> {
    let Some(stream) = core_stream() else {
        return Ok(());
    };
    stream
        .stage(&accepted_event(
            envelope,
            Some(record),
            size_bytes as u64,
            None,
        ))
        .map(|_| ())
        .map_err(|error| format!("audit record failed to write: {error}"))
}

/// Records a message adopted from shard `from_shard` into this executor's
/// spool shard at `record`. Call right after the append.
pub fn adopted(envelope: &Envelope, record: RecordRef, from_shard: u16) {
    let Some(stream) = core_stream() else {
        return;
    };
    let event = AuditEvent::Adopted {
        message_id: envelope.message_id,
        from_shard,
        lane: envelope.lane.as_str(),
        category: envelope.category.as_str(),
        recipients: envelope.recipients.len(),
        spool: record,
    };
    if let Err(error) = stream.stage(&event) {
        tracing::error!(message_id = %envelope.message_id, %error, "audit: adoption record failed to write");
    }
}

/// Writes and syncs every staged record of this executor's stream.
/// Compaction calls it before copying messages, so that no copy outlives
/// the only spool record of a message whose `accepted` record is not yet
/// durable.
pub async fn sync_all() -> Result<(), String> {
    let Some(stream) = core_stream() else {
        return Ok(());
    };
    let head = stream.writer.borrow().head().seq;
    stream
        .sync_through(head)
        .await
        .map_err(|error| format!("audit records failed to sync: {error}"))
}

/// Releases a finished message from the spool once the audit records
/// staged so far, its own among them, are durable, or at once without an
/// audit stream. The wait matters because releasing may delete the
/// message's segment, which [`reconcile`] needs to rebuild a lost record.
pub fn release(spool: &SpoolShard, record: RecordRef) {
    let Some(stream) = core_stream() else {
        spool.release(record);
        return;
    };
    let head = stream.writer.borrow().head().seq;
    if stream.synced_seq.get() >= head {
        spool.release(record);
    } else {
        stream.releases.borrow_mut().push((head, record));
    }
}

/// Records a delivery outcome from its delivery log entry (delivered,
/// deferred, bounced, expired, deleted); `received` entries are ignored
/// because [`accepted`] and [`dsn_generated`] record them.
pub fn record_outcome(entry: &Entry<'_>) {
    if entry.event == Event::Received {
        return;
    }
    let Some(stream) = core_stream() else {
        return;
    };
    let event = AuditEvent::Outcome(OutcomeRecord::from_entry(entry));
    if let Err(error) = stream.stage(&event) {
        tracing::error!(message_id = entry.message_id, %error, "audit: outcome record failed to write");
    }
}

/// Records a DSN generated for `message_id`, from the DSN's own `received`
/// delivery log entry (its note is `dsn failed` or `dsn relayed`).
pub fn dsn_generated(message_id: &str, dsn_entry: &Entry<'_>, record: RecordRef) {
    let Some(stream) = core_stream() else {
        return;
    };
    let action = match dsn_entry.note {
        Some(note) if note.contains("relayed") => "relayed",
        _ => "failed",
    };
    let event = AuditEvent::Dsn {
        message_id,
        dsn_message_id: dsn_entry.message_id,
        action,
        lane: dsn_entry.lane.as_str(),
        spool: record,
    };
    if let Err(error) = stream.stage(&event) {
        tracing::error!(message_id, %error, "audit: DSN record failed to write");
    }
}

/// Makes `writer` (from [`AuditSetup::open_stream`]) the calling thread's
/// control stream.
pub fn install_control(writer: StreamWriter) {
    CONTROL.with(|control| *control.borrow_mut() = Some(writer));
}

/// Records an administrative command and syncs it before the command runs.
/// Returns false when this thread has no control stream (auditing off).
pub fn admin(
    operator_uid: u32,
    command: &str,
    destination: Option<&str>,
    address_hmac: Option<&str>,
) -> bool {
    let event = AuditEvent::Admin {
        operator_uid,
        command,
        destination,
        address_hmac,
    };
    write_control_record(&event).map(|result| {
        if let Err(error) = result {
            tracing::error!(operator_uid, command, %error, "audit: admin record failed to write");
        }
    })
    .is_some()
}

/// Records a finished spool key rotation in the control stream and syncs
/// it. Returns `false` when this thread has no control stream (auditing
/// off).
pub fn key_rotated(operator_uid: u32, key_id: u32, previous_key_id: u32) -> bool {
    let event = AuditEvent::KeyRotated {
        operator_uid,
        key_id,
        previous_key_id,
    };
    write_control_record(&event).map(|result| {
        if let Err(error) = result {
            tracing::error!(operator_uid, key_id, %error, "audit: key rotation record failed to write");
        }
    })
    .is_some()
}

/// Stages `event` in this thread's control stream and syncs it. Returns
/// `None` when this thread has no control stream.
fn write_control_record(event: &AuditEvent<'_>) -> Option<std::io::Result<()>> {
    CONTROL.with(|control| {
        let mut control = control.borrow_mut();
        let writer = control.as_mut()?;
        Some(
            writer
                .stage(event, now_us())
                .and_then(|_| writer.write_and_sync()),
        )
    })
}

/// Records that an operator was shown a spooled message (its content when
/// `content` is true) and syncs the record. Returns `None` when this thread
/// has no control stream (auditing off). The caller must not show the
/// message when this returns an error.
pub fn message_viewed(
    operator_uid: u32,
    message_id: &str,
    shard: u16,
    content: bool,
) -> Option<Result<(), String>> {
    CONTROL.with(|control| {
        let mut control = control.borrow_mut();
        let writer = control.as_mut()?;
        let event = if content {
            AuditEvent::ContentViewed {
                operator_uid,
                message_id,
                shard,
            }
        } else {
            AuditEvent::EnvelopeViewed {
                operator_uid,
                message_id,
                shard,
            }
        };
        let result = writer
            .stage(&event, now_us())
            .and_then(|_| writer.write_and_sync())
            .map_err(|error| error.to_string());
        if let Err(error) = &result {
            tracing::error!(
                message_id,
                operator_uid,
                %error,
                "audit: message view record failed to write"
            );
        }
        Some(result)
    })
}

/// Syncs and checkpoints the control stream, at shutdown.
pub fn close_control() {
    CONTROL.with(|control| {
        if let Some(mut writer) = control.borrow_mut().take()
            && let Err(error) = writer.close()
        {
            tracing::error!(%error, "audit: control stream failed to close");
        }
    });
}

#[cfg(test)]
mod tests;

/// `caduceus audit verify`: prints each problem and a summary per stream;
/// fails when any problem was found.
pub fn run_verify(config: &Config, anchor: Option<&Path>) -> Result<(), String> {
    let dir = audit_dir(config);
    let public = key::read_public_hex(&config.state_dir.join("keys"))?;
    let anchors = match anchor {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read the anchor {}: {error}", path.display()))?;
            verify::parse_anchors(&text)?
        }
        None => Vec::new(),
    };
    let report = verify::verify(&dir, &public, &anchors);
    for problem in &report.problems {
        println!("{problem}");
    }
    for (stream, summary) in &report.streams {
        println!(
            "{stream}: {} records, seq {}..={}, {} checkpoints checked",
            summary.records, summary.first_seq, summary.last_seq, summary.checkpoints_checked
        );
    }
    if report.problems.is_empty() {
        println!("audit trail intact");
        Ok(())
    } else {
        let count = report.problems.len();
        Err(format!(
            "{count} {} in the audit trail under {}",
            if count == 1 { "problem" } else { "problems" },
            dir.display()
        ))
    }
}

/// `caduceus audit anchor`: prints the newest checkpoint of each stream.
pub fn run_anchor(config: &Config) -> Result<(), String> {
    for line in verify::latest_checkpoints(&audit_dir(config))? {
        println!("{line}");
    }
    Ok(())
}

/// `caduceus report`: the per-message table for `from..=to` (YYYY-MM-DD,
/// UTC) as CSV or JSON.
pub fn run_report(config: &Config, from: &str, to: &str, format: &str) -> Result<(), String> {
    let parse = |text: &str, flag: &str| {
        date::Date::parse(text)
            .filter(|_| text.len() == 10)
            .ok_or_else(|| format!("invalid --{flag} {text:?}: expected a date such as 2026-12-04"))
    };
    let (from, to) = (parse(from, "from")?, parse(to, "to")?);
    if from > to {
        return Err(format!("--from {from} is after --to {to}"));
    }
    let rows = report::build(&audit_dir(config), from, to)?;
    match format {
        "csv" => print!("{}", report::to_csv(&rows)),
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|error| error.to_string())?
        ),
        other => return Err(format!("invalid --format {other:?}: expected csv or json")),
    }
    Ok(())
}
