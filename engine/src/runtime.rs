//! Starting and stopping the engine: directories, keys, sockets, the
//! privilege drop, one glommio executor per allocated CPU, and the control
//! thread.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use caduceus_policy::config::Config;
use caduceus_policy::{Lane, SiteKey};
use caduceus_spool::Keyring;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use caduceus_policy::lists::ListStore;

use crate::control::{
    CONTROL_CHANNEL_CAPACITY, ControlPlane, SUPPRESSION_CHANNEL_CAPACITY, load_holds,
};
use crate::cores::{ExecutorSpec, allocate, available_cpus};
use crate::policy_file::{compiled_policy_path, load_policy};
use crate::policy_swap::PolicyCell;
use crate::shard::{self, ShardSetup};

/// Environment variable holding the spool key in hex, instead of a key file.
pub const SPOOL_KEY_ENV: &str = "CADUCEUS_SPOOL_KEY";

/// How often the start logs the cores that have not reported ready yet.
const STARTUP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// A running engine.
pub struct Engine {
    shutdown: Arc<AtomicBool>,
    executors: Vec<ExecutorJoinHandle<Result<(), String>>>,
    control: Option<JoinHandle<()>>,
    metrics: Option<JoinHandle<()>>,
    webhooks: Vec<JoinHandle<()>>,
    pub policy: Arc<PolicyCell>,
    pub allocation: Vec<ExecutorSpec>,
    /// The open lock file of the state directory; dropping the engine
    /// releases the lock (see [`lock_state_dir`]).
    _state_lock: std::fs::File,
}

/// Starts every executor and returns once each has recovered its spool and
/// its sockets accept connections. `policy.reload` over the control socket
/// then recompiles the built-in defaults; see [`start_with_config_file`].
pub fn start(config: Config) -> Result<Engine, String> {
    start_with_config_file(config, None)
}

/// Like [`start`], with the config file that `policy.reload` recompiles.
pub fn start_with_config_file(
    config: Config,
    config_path: Option<PathBuf>,
) -> Result<Engine, String> {
    let config = Arc::new(config);
    let allocation = allocate(&config, &available_cpus())?;
    if let Some(warning) = config.message_size_warning() {
        tracing::warn!("config: {warning}");
    }

    for dir in [
        config.state_dir.clone(),
        config.state_dir.join("run"),
        config.spool_dir(),
        config.log_dir(),
        config.state_dir.join("keys"),
        config.state_dir.join("lists"),
    ] {
        std::fs::create_dir_all(&dir).map_err(|error| {
            format!(
                "cannot create {}: {error}; check that state_dir is writable",
                dir.display()
            )
        })?;
    }
    let state_lock = lock_state_dir(&config.state_dir)?;
    restrict_mode(&config.state_dir.join("keys"), 0o700)?;
    restrict_mode(&config.spool_dir(), 0o700)?;

    // Loaded before the privilege drop, which hands a file written here to
    // the engine's user with the rest of the state directory.
    let compiled_policy = compiled_policy_path(&config.state_dir);
    let (policy, _) = load_policy(&config, &compiled_policy)?;
    let policy = Arc::new(PolicyCell::new(policy, compiled_policy));

    // Webhook secret files are read while the process may still be root,
    // and before any socket exists, so a bad secret stops the start early.
    let webhook_endpoints = crate::webhook::prepare(&config)?;
    let keyring = load_keyring(&config)?;
    let site_key_path = config.state_dir.join("keys").join("site.key");
    let site_key = SiteKey::load_or_create(&site_key_path).map_err(|error| error.to_string())?;
    let lists_dir = config.state_dir.join("lists");
    let lists = ListStore::open(
        &lists_dir.join("lists.bin"),
        &lists_dir.join("journal.log"),
        site_key.clone(),
    )
    .map_err(|error| {
        format!(
            "consent and suppression lists in {} failed to load: {error}",
            lists_dir.display()
        )
    })?;
    let (auto_suppress_sender, auto_suppress) =
        crossbeam_channel::bounded(SUPPRESSION_CHANNEL_CAPACITY);

    let mut lane_listeners: Vec<(Lane, UnixListener)> = Vec::new();
    for lane in Lane::ALL {
        let path = config.lane_socket(lane);
        let listener = crate::ingress::bind_socket(&path, config.lanes.get(lane))
            .map_err(|error| error.to_string())?;
        lane_listeners.push((lane, listener));
    }
    let control_path = config.control_socket();
    let _ = std::fs::remove_file(&control_path);
    let control_listener = UnixListener::bind(&control_path).map_err(|error| {
        format!(
            "cannot bind the control socket {}: {error}",
            control_path.display()
        )
    })?;
    restrict_mode(&control_path, 0o600)?;

    raise_memlock_limit();
    crate::privileges::drop_if_root(&config)?;
    let audit = crate::audit::AuditSetup::open(&config)?;
    let control_stream = match &audit {
        Some(audit) => Some(audit.open_stream("control")?),
        None => None,
    };

    let shutdown = Arc::new(AtomicBool::new(false));
    let metrics = crate::metrics::Registry::new(
        allocation.iter().map(|spec| spec.index).collect(),
        shutdown.clone(),
    );
    let holds_file = config.state_dir.join("holds.json");
    let holds = load_holds(&holds_file);
    let (ready_sender, ready_receiver) = crossbeam_channel::bounded(allocation.len());
    let mut control_senders = Vec::new();
    let mut executors = Vec::new();
    let lane_cores = shard::mesh::LaneCores::from_allocation(&allocation);
    let mut mesh_ends = shard::mesh::build(&allocation, shard::mesh::CHANNEL_CAPACITY).into_iter();
    for spec in &allocation {
        let mut listeners = Vec::new();
        for (lane, listener) in &lane_listeners {
            if spec.lanes.contains(lane) {
                let copy = listener.try_clone().map_err(|error| {
                    format!("cannot share the {} socket: {error}", lane.as_str())
                })?;
                listeners.push((*lane, copy));
            }
        }
        let (control_sender, control_receiver) =
            crossbeam_channel::bounded(CONTROL_CHANNEL_CAPACITY);
        control_senders.push(control_sender);
        let setup = ShardSetup {
            spec: spec.clone(),
            executors: allocation.len() as u16,
            config: config.clone(),
            policy: policy.clone(),
            keyring: keyring.clone(),
            site_key: site_key.clone(),
            lists: lists.published(),
            auto_suppress: auto_suppress_sender.clone(),
            listeners,
            control: control_receiver,
            shutdown: shutdown.clone(),
            holds: holds.clone(),
            mesh: mesh_ends.next().unwrap_or_default(),
            lane_cores: lane_cores.clone(),
        };
        let ready = ready_sender.clone();
        let audit = audit.clone();
        let core_metrics = metrics.core(spec.index);
        let index = spec.index;
        let transactional = spec.lanes.contains(&Lane::Transactional);
        let name = format!(
            "caduceus-{}-{}",
            if transactional { "tx" } else { "bulk" },
            spec.index
        );
        // A short preemption timer lets latency-sensitive task queues
        // (transactional delivery) run within 1 ms of becoming ready.
        let preempt = if transactional {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        };
        let handle = LocalExecutorBuilder::new(Placement::Fixed(spec.cpu))
            .name(&name)
            .preempt_timer(preempt)
            .spawn(move || async move {
                if let Some(core_metrics) = core_metrics {
                    crate::metrics::install_core(core_metrics);
                }
                if let Some(audit) = &audit
                    && let Err(error) = crate::audit::install_core(audit, index)
                {
                    let _ = ready.send((index, Err(error.clone())));
                    return Err(error);
                }
                let result = shard::run_with_ready(setup, ready).await;
                crate::audit::close_core().await;
                if let Err(error) = &result {
                    tracing::error!(%error, "core: stopped with an error");
                }
                result
            })
            .map_err(|error| format!("cannot start executor on CPU {}: {error}", spec.cpu))?;
        executors.push(handle);
    }
    drop(ready_sender);
    // A signal during the start stops it. The caller's own handlers only
    // run once the start returns, and a core that never finishes starting
    // would otherwise keep the process from stopping at all.
    let stop_requested = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(error) = signal_hook::flag::register(signal, stop_requested.clone()) {
            tracing::warn!(signal, %error, "engine: cannot watch for signals during the start");
        }
    }
    let mut pending: Vec<u16> = allocation.iter().map(|spec| spec.index).collect();
    let started_at = Instant::now();
    let mut next_report = started_at + STARTUP_REPORT_INTERVAL;
    while !pending.is_empty() {
        if stop_requested.load(Ordering::Acquire) {
            shutdown.store(true, Ordering::Release);
            return Err(format!(
                "stopped by a signal while cores {pending:?} had not finished starting"
            ));
        }
        let received = match ready_receiver.recv_timeout(Duration::from_millis(100)) {
            Ok(received) => Ok(received),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if Instant::now() >= next_report {
                    next_report += STARTUP_REPORT_INTERVAL;
                    tracing::warn!(
                        cores = ?pending,
                        waited_ms = started_at.elapsed().as_millis() as u64,
                        "engine: cores have not finished starting (spool recovery, audit stream or executor setup)"
                    );
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(()),
        };
        match received {
            Ok((index, Ok(()))) => pending.retain(|core| *core != index),
            Ok((_, Err(error))) => {
                shutdown.store(true, Ordering::Release);
                return Err(error);
            }
            Err(()) => {
                shutdown.store(true, Ordering::Release);
                let mut message = "an executor stopped during start".to_string();
                for handle in executors {
                    if let Ok(Err(error)) = handle.join() {
                        message = error;
                    }
                }
                return Err(message);
            }
        }
    }
    let plane = ControlPlane {
        executors: control_senders,
        holds_file,
        audit_file: config.log_dir().join("audit.log"),
        shutdown: shutdown.clone(),
        lists,
        site_key,
        auto_suppress,
        policy: policy.clone(),
        config_path,
        spool_key: spool_key_source(&config),
    };
    let control_cpus = control_plane_cpus(&allocation);
    let control = std::thread::Builder::new()
        .name("caduceus-control".into())
        .spawn(move || {
            pin_current_thread(&control_cpus);
            if let Some(stream) = control_stream {
                crate::audit::install_control(stream);
            }
            plane.serve(control_listener);
            crate::audit::close_control();
        })
        .map_err(|error| format!("cannot start the control thread: {error}"))?;
    metrics.mark_all_ready();
    let metrics_thread = match config.metrics.listen {
        Some(address) => Some(crate::metrics::http::start(
            address,
            metrics.clone(),
            control_plane_cpus(&allocation),
        )?),
        None => None,
    };
    let webhooks = crate::webhook::spawn(
        webhook_endpoints,
        &config,
        control_plane_cpus(&allocation),
        shutdown.clone(),
    )?;
    tracing::info!(executors = allocation.len(), "engine: started");
    Ok(Engine {
        shutdown,
        executors,
        control: Some(control),
        metrics: metrics_thread,
        webhooks,
        policy,
        allocation,
        _state_lock: state_lock,
    })
}

/// Takes an exclusive lock on `<state_dir>/engine.lock`, held until the
/// engine is dropped or the process exits.
///
/// A draining engine has closed its lane sockets but still owns its spool
/// and lists for up to 30 s, so a socket that accepts no connection does
/// not prove to a second start that the state directory is free.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, String> {
    use std::fs::{OpenOptions, TryLockError};
    use std::os::unix::fs::OpenOptionsExt;

    let path = state_dir.join("engine.lock");
    // A lock file left by a start as root may be read-only to this user,
    // and a lock needs no write access.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .or_else(|_| std::fs::File::open(&path))
        .map_err(|error| format!("cannot open the lock file {}: {error}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(format!(
            "the state directory {} is in use by another caduceus process, which has locked {}. Stop that engine and wait until it exits (a drain takes up to 30 s), then start again",
            state_dir.display(),
            path.display()
        )),
        Err(TryLockError::Error(error)) => Err(format!("cannot lock {}: {error}", path.display())),
    }
}

impl Engine {
    /// Asks every executor to drain: stop accepting, finish deliveries in
    /// flight, sync the spool.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Waits for every executor to stop. Returns the first error.
    pub fn wait(mut self) -> Result<(), String> {
        let mut first_error = None;
        for handle in self.executors.drain(..) {
            let result = match handle.join() {
                Ok(result) => result,
                Err(_) => Err("an executor thread panicked".to_string()),
            };
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        self.shutdown.store(true, Ordering::Release);
        if let Some(control) = self.control.take() {
            let _ = control.join();
        }
        if let Some(metrics) = self.metrics.take() {
            let _ = metrics.join();
        }
        for webhook in self.webhooks.drain(..) {
            if webhook.join().is_err() {
                tracing::error!("engine: a webhook thread panicked");
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Raises the locked-memory limit as far as allowed: glommio registers its
/// io_uring buffers in locked memory and skips registration (with slower
/// I/O) when the limit is too low. Root may lift the hard limit too, before
/// the privilege drop.
fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return;
    };
    let target = if nix::unistd::geteuid().is_root() {
        nix::sys::resource::RLIM_INFINITY
    } else {
        hard
    };
    if soft < target && setrlimit(Resource::RLIMIT_MEMLOCK, target, target.max(hard)).is_err() {
        tracing::warn!(
            soft_bytes = soft,
            "engine: RLIMIT_MEMLOCK could not be raised; io_uring buffers may go unregistered (raise it with `ulimit -l` or LimitMEMLOCK=infinity)"
        );
    }
}

/// The CPUs control-plane threads may run on: those of the bulk lane's
/// executors, so that list imports, reloads and reports never take time
/// from a transactional core. With a single executor serving both lanes
/// there is no other choice than its CPU.
pub fn control_plane_cpus(allocation: &[ExecutorSpec]) -> Vec<usize> {
    let bulk: Vec<usize> = allocation
        .iter()
        .filter(|spec| spec.lanes == [Lane::Bulk])
        .map(|spec| spec.cpu)
        .collect();
    if bulk.is_empty() {
        allocation.iter().map(|spec| spec.cpu).collect()
    } else {
        bulk
    }
}

/// Restricts the calling thread to `cpus`; logs and carries on when the
/// kernel refuses.
pub fn pin_current_thread(cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus {
        if set.set(*cpu).is_err() {
            return;
        }
    }
    if let Err(error) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
        tracing::warn!(?cpus, %error, "engine: control-plane thread could not be restricted to the bulk lane's CPUs");
    }
}

fn restrict_mode(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|error| format!("cannot set mode {mode:o} on {}: {error}", path.display()))
}

/// Loads the spool keyring the config names, or `None` when encryption is
/// off. Creates the key file on first use.
pub fn load_keyring(config: &Config) -> Result<Option<Keyring>, String> {
    match spool_key_source(config) {
        SpoolKeySource::Off => {
            tracing::warn!(
                "spool: encryption at rest is off (spool.encryption = false); message content is stored in the clear"
            );
            Ok(None)
        }
        SpoolKeySource::Environment(hex) => Keyring::from_hex(1, hex.trim())
            .map(Some)
            .map_err(|error| format!("{SPOOL_KEY_ENV}: {error}")),
        SpoolKeySource::File(path) => {
            if !path.exists() {
                reject_new_key_for_sealed_spool(&path, &config.spool_dir())?;
            }
            Keyring::load_or_create(&path)
                .map(Some)
                .map_err(|error| error.to_string())
        }
    }
}

/// Returns an error when the spool directory contains records sealed with
/// a key, because a new key cannot open them, so recovery would quarantine
/// every acknowledged message as damaged. Records written with encryption
/// off (key id 0) need no key, so turning encryption on keeps them.
fn reject_new_key_for_sealed_spool(key_file: &Path, spool_dir: &Path) -> Result<(), String> {
    if !spool_dir.exists() {
        return Ok(());
    }
    let records = caduceus_spool::inspect::scan(spool_dir, None).map_err(|error| {
        format!(
            "cannot scan {} for sealed records before creating {}: {error}",
            spool_dir.display(),
            key_file.display()
        )
    })?;
    let sealed = records.iter().filter(|record| record.key_id != 0).count();
    if sealed == 0 {
        return Ok(());
    }
    Err(format!(
        "the spool key file {} is missing, but {} contains {sealed} record(s) sealed with it; restore the key file from its backup (docs/operations.md), or move the segments out of the spool directory to start with an empty spool",
        key_file.display(),
        spool_dir.display()
    ))
}

/// The source of the spool's keys.
#[derive(Clone)]
pub enum SpoolKeySource {
    /// `spool.encryption = false`.
    Off,
    /// One hex key in `CADUCEUS_SPOOL_KEY`.
    Environment(String),
    /// The key file: `spool.key_file`, or `<state_dir>/keys/spool.key`.
    File(PathBuf),
}

impl std::fmt::Debug for SpoolKeySource {
    // The environment variable contains a key, so it is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolKeySource::Off => f.write_str("Off"),
            SpoolKeySource::Environment(_) => f.write_str("Environment"),
            SpoolKeySource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Returns the source of the spool's keys under `config`.
pub fn spool_key_source(config: &Config) -> SpoolKeySource {
    if !config.spool.encryption {
        return SpoolKeySource::Off;
    }
    if let Ok(hex) = std::env::var(SPOOL_KEY_ENV) {
        return SpoolKeySource::Environment(hex);
    }
    SpoolKeySource::File(
        config
            .spool
            .key_file
            .clone()
            .unwrap_or_else(|| config.state_dir.join("keys").join("spool.key")),
    )
}
