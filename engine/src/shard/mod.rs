//! One core's share of the engine: its spool shard, its queue, its
//! connections and its submission sockets.
//!
//! Everything here runs on one glommio executor pinned to one CPU. State is
//! shared between that executor's tasks through `Rc` and `RefCell`; a
//! `RefCell` borrow is never held across an `.await`.

mod admission;
mod compaction;
mod deliver;
pub mod mesh;
pub mod queue;
mod sources;
pub mod throttle;

use std::cell::{Cell, RefCell};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use caduceus_policy::config::{Config, IngressConfig};
use caduceus_policy::lists::Change;
use caduceus_policy::{Lane, Lists, Policy, SiteKey};
use caduceus_spool::{
    Keyring, MessageId, RecordRef, Shard as SpoolShard, SpoolOptions, SpoolReader,
};
use glommio::{Latency, Shares, TaskQueueHandle};

use crate::control::{ControlCommand, ControlRequest};
use crate::cores::ExecutorSpec;
use crate::deliverylog::{DeliveryLog, now_us};
use crate::dns::Resolver;
use crate::outbound::TlsContext;
use crate::policy_swap::PolicyCell;
use crate::spool_show::{RecordFacts, envelope_view};
use queue::{Queue, QueuedMessage};

/// Everything an executor needs to start, built on the main thread.
pub struct ShardSetup {
    pub spec: ExecutorSpec,
    /// How many executors run; shards numbered at or above it belong to an
    /// earlier, larger allocation and are adopted (see `adopt_orphans`).
    pub executors: u16,
    pub config: Arc<Config>,
    pub policy: Arc<PolicyCell>,
    pub keyring: Option<Keyring>,
    pub site_key: SiteKey,
    /// Consent and suppression lists, published by the control thread.
    pub lists: Arc<ArcSwap<Lists>>,
    /// Where hard bounces are reported for automatic suppression.
    pub auto_suppress: crossbeam_channel::Sender<Change>,
    /// The submission sockets this executor accepts on, one per lane.
    pub listeners: Vec<(Lane, UnixListener)>,
    pub control: crossbeam_channel::Receiver<ControlRequest>,
    pub shutdown: Arc<AtomicBool>,
    /// Destinations held by the operator when the engine started.
    pub holds: Vec<String>,
    /// This executor's ends of the channels to the executors it shares a
    /// lane with, and which executors serve each lane.
    pub mesh: mesh::MeshEnds,
    pub lane_cores: mesh::LaneCores,
}

/// The shared state of one executor.
pub struct Shard {
    pub index: u16,
    pub config: Arc<Config>,
    pub policy: Arc<PolicyCell>,
    pub spool: Rc<SpoolShard>,
    /// Reads records of other executors' shards handed to this one.
    pub reader: SpoolReader,
    pub mesh: Rc<mesh::Mesh>,
    pub resolver: Rc<Resolver>,
    pub tls: Rc<TlsContext>,
    pub log: Rc<DeliveryLog>,
    pub site_key: SiteKey,
    pub lists: Arc<ArcSwap<Lists>>,
    pub auto_suppress: crossbeam_channel::Sender<Change>,
    pub queue: RefCell<Queue>,
    pub hostname: Rc<str>,
    /// Deliveries in flight on this executor, all destinations together.
    pub inflight: Cell<u32>,
    /// Set when SIGTERM arrives: no new deliveries start.
    pub draining: Cell<bool>,
    /// Set when free disk space falls below `spool.reserve_bytes`.
    pub below_reserve: Cell<bool>,
    /// Source addresses in turn, with their rate and connection limits.
    pub sources: sources::Sources,
    pub delivery_queue: TaskQueueHandle,
}

/// Runs one executor until shutdown. Called inside the executor. Sends its
/// index with `Ok(())` on `ready` once the spool is recovered and the
/// sockets accept, or with the error that stopped the start.
pub async fn run_with_ready(
    setup: ShardSetup,
    ready: crossbeam_channel::Sender<(u16, Result<(), String>)>,
) -> Result<(), String> {
    let index = setup.spec.index;
    let started = match start(setup).await {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send((index, Err(error.clone())));
            return Err(error);
        }
    };
    tracing::debug!(core = index, "core: start reported");
    let _ = ready.send((index, Ok(())));
    serve(started).await
}

struct Started {
    shard: Rc<Shard>,
    listeners: Vec<(Lane, UnixListener)>,
    control: crossbeam_channel::Receiver<ControlRequest>,
    shutdown: Arc<AtomicBool>,
    peers: Vec<(u16, mesh::PeerReceiver)>,
}

async fn start(setup: ShardSetup) -> Result<Started, String> {
    let ShardSetup {
        spec,
        executors,
        config,
        policy,
        keyring,
        site_key,
        lists,
        auto_suppress,
        listeners,
        control,
        shutdown,
        holds,
        mesh: mesh_ends,
        lane_cores,
    } = setup;
    let started = std::time::Instant::now();
    let options = SpoolOptions {
        dir: config.spool_dir(),
        shard: spec.index,
        segment_size_bytes: config.spool.segment_size_bytes,
        commit_max_wait: config.spool.commit_max_wait.get(),
        commit_max_batch: config.spool.commit_max_batch,
        keyring: keyring.clone(),
        reserve_bytes: config.spool.reserve_bytes,
        list_appends: crate::audit::appends_to_check(),
    };
    let (spool, mut recovered, report) = SpoolShard::open(options.clone())
        .await
        .map_err(|error| format!("core {}: spool shard failed to open: {error}", spec.index))?;
    crate::audit::reconcile_spool(&spool, &report)
        .map_err(|error| format!("core {}: {error}", spec.index))?;
    adopt_orphans(&spool, &options, executors, &mut recovered).await?;
    tracing::info!(
        core = spec.index,
        cpu = spec.cpu,
        lanes = ?spec.lanes,
        messages = recovered.len(),
        records = report.records,
        quarantined = report.quarantined.len(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "core: spool recovered"
    );
    let resolver = Resolver::new(&config.dns)
        .map_err(|error| format!("core {}: resolver setup failed: {error}", spec.index))?;
    let tls = TlsContext::new(config.tls.ca_file.as_deref(), config.tls.session_resumption)
        .map_err(|error| format!("core {}: TLS setup failed: {error}", spec.index))?;
    let log_dir = config.log_dir();
    let log = DeliveryLog::open(
        &log_dir,
        spec.index,
        config.delivery_log.max_file_bytes,
        config.recipient_logging,
        site_key.clone(),
    )
    .map_err(|error| {
        format!(
            "core {}: delivery log in {} failed to open: {error}",
            spec.index,
            log_dir.display()
        )
    })?;
    let transactional = spec.lanes.contains(&Lane::Transactional);
    let latency = if transactional {
        Latency::Matters(Duration::from_millis(1))
    } else {
        Latency::NotImportant
    };
    let delivery_queue =
        glommio::executor().create_task_queue(Shares::default(), latency, "delivery");
    let sources = sources::Sources::new(
        sources::SourceLimits::share(&config.lanes.transactional, lane_cores.transactional.len()),
        sources::SourceLimits::share(&config.lanes.bulk, lane_cores.bulk.len()),
    );
    let (mesh, peers) = mesh::Mesh::connect(
        spec.index,
        &spec.lanes,
        lane_cores,
        mesh_ends,
        mesh::CHANNEL_CAPACITY,
    )
    .await;
    let reader = SpoolReader::new(&config.spool_dir(), keyring.clone().map(Arc::new));
    let shard = Rc::new(Shard {
        index: spec.index,
        hostname: Rc::from(config.hostname.as_str()),
        config: config.clone(),
        policy,
        spool,
        reader,
        mesh: Rc::new(mesh),
        resolver: Rc::new(resolver),
        tls: Rc::new(tls),
        log: Rc::new(log),
        site_key,
        lists,
        auto_suppress,
        queue: RefCell::new(Queue {
            own: spec.index,
            ..Queue::default()
        }),
        inflight: Cell::new(0),
        draining: Cell::new(false),
        below_reserve: Cell::new(false),
        sources,
        delivery_queue,
    });
    {
        let mut queue = shard.queue.borrow_mut();
        for domain in holds {
            let key = queue.intern(&domain);
            if let Some(destination) = queue.destinations.get_mut(&key) {
                destination.held = true;
            }
        }
        let now = now_us();
        for message in recovered {
            let envelope = Rc::new(message.envelope);
            queue.insert(
                message.record,
                QueuedMessage::new(envelope, message.states),
                now,
            );
        }
    }
    tracing::info!(
        core = spec.index,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "core: ready"
    );
    Ok(Started {
        shard,
        listeners,
        control,
        shutdown,
        peers,
    })
}

async fn serve(started: Started) -> Result<(), String> {
    let Started {
        shard,
        listeners,
        control,
        shutdown,
        peers,
    } = started;
    let config = shard.config.clone();
    let peer_tasks: Vec<_> = peers
        .into_iter()
        .map(|(peer, receiver)| {
            glommio::spawn_local(deliver::serve_peer(shard.clone(), peer, receiver)).detach()
        })
        .collect();

    let ingress_stop = Rc::new(crate::ingress::Shutdown::new());
    let mut servers = Vec::new();
    for (lane, listener) in listeners {
        let admission = Rc::new(admission::ShardAdmission {
            shard: shard.clone(),
        });
        let lane_config = Rc::new(config.lanes.get(lane).clone());
        let ingress_config = Rc::new(IngressConfig {
            max_message_size_bytes: config.effective_max_message_size_bytes(),
            ..config.ingress.clone()
        });
        let hostname = shard.hostname.clone();
        let stop = ingress_stop.clone();
        servers.push(glommio::spawn_local(async move {
            crate::ingress::serve_socket(
                listener,
                lane,
                lane_config,
                ingress_config,
                hostname,
                admission,
                stop,
            )
            .await
        }));
    }

    deliver::dispatch_all(&shard);
    let scheduler = glommio::spawn_local(deliver::scheduler(shard.clone())).detach();
    let compactor = compaction::spawn(&shard);

    // The control loop: operator commands, the shutdown flag and the log
    // flush all run on one 20 ms tick.
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        shard.log.flush();
        crate::metrics::sample_shard(&shard);
        while let Ok(request) = control.try_recv() {
            handle_control(&shard, request);
        }
        if shutdown.load(Ordering::Acquire) {
            break;
        }
    }

    tracing::info!(core = shard.index, "core: draining");
    ingress_stop.trigger();
    for server in servers {
        if let Err(error) = server.await {
            tracing::warn!(core = shard.index, %error, "core: ingress ended with an error");
        }
    }
    shard.draining.set(true);
    let drain_deadline = std::time::Instant::now() + Duration::from_secs(30);
    while shard.inflight.get() > 0 && std::time::Instant::now() < drain_deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if shard.inflight.get() > 0 {
        tracing::warn!(
            core = shard.index,
            inflight = shard.inflight.get(),
            "core: deliveries still in flight after 30 s; they stay pending and are retried after restart"
        );
    }
    scheduler.cancel();
    compactor.cancel();
    for task in peer_tasks {
        task.cancel();
    }
    deliver::close_idle(&shard).await;
    shard.log.flush();
    shard
        .spool
        .close()
        .await
        .map_err(|error| format!("core {}: final spool sync failed: {error}", shard.index))?;
    tracing::info!(core = shard.index, "core: stopped");
    Ok(())
}

/// Moves the pending mail of shards that no executor owns any more (the
/// allocation shrank since they were written) into this executor's shard.
///
/// Shard `j` is adopted by executor `j % executors`. Each pending message
/// is appended to this executor's shard with its pending recipients only;
/// once that copy is durable the old shard's files are deleted. A crash
/// between the two leaves both copies, so the adopted mail may be
/// delivered twice but is never lost.
async fn adopt_orphans(
    spool: &Rc<SpoolShard>,
    options: &SpoolOptions,
    executors: u16,
    recovered: &mut Vec<caduceus_spool::RecoveredMessage>,
) -> Result<(), String> {
    let own = options.shard;
    let orphans: Vec<u16> = existing_shards(&options.dir)
        .into_iter()
        .filter(|shard| *shard >= executors && shard % executors == own)
        .collect();
    for orphan in orphans {
        let mut orphan_options = options.clone();
        orphan_options.shard = orphan;
        orphan_options.list_appends = crate::audit::orphan_appends_to_check(orphan)
            .map_err(|error| format!("core {own}: {error}"))?;
        let (old, messages, report) = SpoolShard::open(orphan_options).await.map_err(|error| {
            format!("core {own}: spool shard {orphan} failed to open for adoption: {error}")
        })?;
        crate::audit::reconcile_orphan(orphan, &report)
            .map_err(|error| format!("core {own}: {error}"))?;
        let mut seqs = Vec::new();
        let mut adopted = Vec::new();
        for message in messages {
            let stored = old.read_message(message.record).map_err(|error| {
                format!("core {own}: message {} of shard {orphan} unreadable during adoption: {error}; the shard is left in place", message.record)
            })?;
            let mut envelope = message.envelope;
            let pending: Vec<bool> = message
                .states
                .iter()
                .map(|state| !state.is_final())
                .collect();
            let mut index = 0;
            envelope.recipients.retain(|_| {
                index += 1;
                pending[index - 1]
            });
            let states: Vec<_> = message
                .states
                .into_iter()
                .filter(|state| !state.is_final())
                .collect();
            let (record, seq) = spool
                .append_message(&envelope, &stored.body)
                .map_err(|error| format!("core {own}: adopting shard {orphan} failed: {error}"))?;
            crate::audit::adopted(&envelope, record, orphan);
            seqs.push(seq);
            adopted.push(caduceus_spool::RecoveredMessage {
                record,
                envelope,
                states,
            });
        }
        // A failed sync fails only its own segment, so each copy is checked
        // before the old shard's files go.
        for seq in seqs {
            spool.durable(seq).await.map_err(|error| {
                format!("core {own}: adopting shard {orphan} failed to sync: {error}")
            })?;
        }
        // The old shard's files go next, so its messages' records must be
        // durable here first.
        crate::audit::sync_all()
            .await
            .map_err(|error| format!("core {own}: adopting shard {orphan}: {error}"))?;
        let _ = old.close().await;
        drop(old);
        remove_shard_files(&options.dir, orphan)?;
        tracing::info!(
            core = own,
            shard = orphan,
            messages = adopted.len(),
            "core: adopted the pending mail of a shard no executor owns"
        );
        recovered.extend(adopted);
    }
    Ok(())
}

/// The shard numbers that have segment files in the spool directory.
fn existing_shards(dir: &std::path::Path) -> Vec<u16> {
    let mut shards: Vec<u16> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(caduceus_spool::storage::parse_segment_file_name)
                .map(|(shard, _)| shard)
        })
        .collect();
    shards.sort_unstable();
    shards.dedup();
    shards
}

fn remove_shard_files(dir: &std::path::Path, shard: u16) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let belongs = name
            .to_str()
            .and_then(caduceus_spool::storage::parse_segment_file_name)
            .is_some_and(|(owner, _)| owner == shard);
        if belongs {
            std::fs::remove_file(entry.path()).map_err(|error| {
                format!(
                    "cannot remove {} after adopting its mail: {error}",
                    entry.path().display()
                )
            })?;
        }
    }
    Ok(())
}

fn handle_control(shard: &Rc<Shard>, request: ControlRequest) {
    let now = now_us();
    let response = match &request.command {
        ControlCommand::QueueList => {
            let rows = shard.queue.borrow().summary();
            let policy = shard.current_policy();
            let destinations: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|row| {
                    // Mail that the policy keeps queued (a rule's `hold`, or
                    // a lane that a reload barred) waits like held mail.
                    let policy_hold = row.lanes.iter().any(|lane| {
                        let rule = policy.for_domain(&row.domain, *lane);
                        rule.hold || !rule.lane_allowed
                    });
                    serde_json::json!({
                        "destination": row.domain,
                        "pending": row.pending,
                        "held": row.held,
                        "policy_hold": policy_hold,
                    })
                })
                .collect();
            serde_json::json!({"core": shard.index, "destinations": destinations})
        }
        ControlCommand::Hold(domain) => {
            let mut queue = shard.queue.borrow_mut();
            let key = queue.intern(domain);
            if let Some(destination) = queue.destinations.get_mut(&key) {
                destination.held = true;
            }
            serde_json::json!({"core": shard.index})
        }
        ControlCommand::Release(domain) => {
            {
                let mut queue = shard.queue.borrow_mut();
                let key = queue.intern(domain);
                if let Some(destination) = queue.destinations.get_mut(&key) {
                    destination.held = false;
                }
            }
            deliver::dispatch(shard, domain);
            serde_json::json!({"core": shard.index})
        }
        ControlCommand::Requeue(domain) => {
            let count = shard.queue.borrow_mut().requeue_domain(domain, now);
            let ready = shard.queue.borrow_mut().release_due(now);
            for domain in ready {
                deliver::dispatch(shard, &domain);
            }
            serde_json::json!({"core": shard.index, "requeued": count})
        }
        ControlCommand::Delete(domain) => {
            let count = deliver::delete_domain(shard, domain);
            serde_json::json!({"core": shard.index, "deleted": count})
        }
        ControlCommand::Show {
            message_id,
            content,
        } => show_message(shard, *message_id, *content),
        ControlCommand::InstallKeyring(keyring) => {
            match shard.spool.set_keyring(Keyring::clone(keyring)) {
                Ok(()) => {
                    shard.reader.set_keyring(Some(keyring.clone()));
                    tracing::info!(
                        core = shard.index,
                        active_key_id = keyring.active_id(),
                        "keys: spool keyring replaced"
                    );
                    serde_json::json!({"core": shard.index, "active_key_id": keyring.active_id()})
                }
                Err(error) => {
                    tracing::error!(core = shard.index, %error, "keys: spool keyring not replaced");
                    serde_json::json!({"core": shard.index, "error": error})
                }
            }
        }
    };
    // The requester may have given up waiting; a closed reply channel is
    // not an error here.
    let _ = request.reply.send(response);
}

/// Builds this executor's reply to `spool.show`: `found: false` unless its
/// queue contains the message. The owner reads its own record, so the key id, sizes
/// and (for `content`) the body come from the spool, and the recipient
/// states from the queue, which is ahead of the spool by at most the
/// outcomes not yet committed.
fn show_message(shard: &Shard, message_id: MessageId, content: bool) -> serde_json::Value {
    // A linear search, because the queue is keyed by record location. It
    // runs once per operator command.
    let found = shard
        .queue
        .borrow()
        .messages
        .iter()
        .find(|(_, message)| message.envelope.message_id == message_id)
        .map(|(record, message)| (*record, message.states.clone()));
    let Some((record, states)) = found else {
        return serde_json::json!({"core": shard.index, "found": false});
    };
    let (header, stored) = match shard.spool.inspect_message(record) {
        Ok(read) => read,
        Err(error) => {
            tracing::error!(core = shard.index, %message_id, %record, %error, "spool: show could not read a queued message's record");
            return serde_json::json!({
                "core": shard.index,
                "found": true,
                "error": format!("message {message_id} is queued on core {} but its record {record} could not be read: {error}", shard.index),
            });
        }
    };
    let facts = RecordFacts::from_header(shard.index, record, &header, stored.body.len() as u64);
    let mut view = envelope_view(&facts, &stored.envelope, &states);
    if content {
        use base64::Engine as _;
        view["content_base64"] =
            serde_json::json!(base64::engine::general_purpose::STANDARD.encode(&stored.body));
    }
    serde_json::json!({"core": shard.index, "found": true, "message": view})
}

/// Where the spool keeps its files, for `caduceus spool` commands.
pub fn spool_dir(config: &Config) -> PathBuf {
    config.spool_dir()
}

impl Shard {
    pub fn lane_of(&self, record: &RecordRef) -> Option<Lane> {
        self.queue
            .borrow()
            .messages
            .get(record)
            .map(|message| message.envelope.lane)
    }

    pub fn current_policy(&self) -> Arc<Policy> {
        self.policy.load()
    }
}
