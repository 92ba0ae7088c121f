//! The `caduceus` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use caduceus_engine::{audit, control, cores, demo, runtime};
use caduceus_policy::config::Config;
use caduceus_policy::{Lane, Policy, load_config, policy_digest};
use clap::{Parser, Subcommand};
use serde_json::json;

/// Caduceus: an outbound MTA for mail that carries protected health
/// information.
#[derive(Parser)]
#[command(name = "caduceus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: accept mail on the lane sockets and deliver it.
    Serve {
        /// Configuration file (TOML). Without it, the built-in defaults apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the engine on the embedded default configuration against a local
    /// receiver, inject a realistic mix, and report latency per lane.
    Demo(demo::DemoArgs),
    /// Inspect or change the queue of a running engine.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Print the CPUs and the lane allocation the config gives.
    Cores {
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check the configuration and its policy rules.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Change or query the suppression list of a running engine (opt-outs,
    /// hard bounces, complaints).
    Suppress {
        #[command(subcommand)]
        action: ListAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Change or query the marketing consent list of a running engine.
    Consent {
        #[command(subcommand)]
        action: ListAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Inspect the spool of a stopped engine, or show one message.
    Spool {
        #[command(subcommand)]
        action: SpoolAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Manage the spool's encryption keys in a running engine.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Check the tamper-evident audit trail, or print its anchors.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Print every message accepted between two UTC dates (inclusive) with
    /// each recipient's outcome, from the audit trail.
    Report {
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        to: String,
        /// csv (one row per recipient) or json (one object per message).
        #[arg(long, default_value = "csv")]
        format: String,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a benchmark scenario (runs `caduceus-bench`, built from the
    /// bench/ crate, with the same arguments).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Add a new random key to the key file and seal new records with it;
    /// older keys stay to read the records they sealed.
    Rotate,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Pending recipients per destination on every core.
    List,
    /// Stop deliveries to a destination domain until it is released.
    Hold { destination: String },
    /// Resume deliveries to a held destination.
    Release { destination: String },
    /// Drop every pending recipient of a destination, without a bounce.
    Delete { destination: String },
    /// Retry every pending recipient of a destination now.
    Requeue { destination: String },
}

#[derive(Subcommand)]
enum ListAction {
    /// Add an address.
    Add {
        address: String,
        /// For suppressions: opt-out, hard-bounce or complaint.
        #[arg(long, default_value = "opt-out")]
        reason: String,
    },
    /// Remove an address, or for suppressions one of its reasons. Prints
    /// the entries the address still has.
    Remove {
        address: String,
        /// For suppressions: the reason to remove (opt-out, hard-bounce or
        /// complaint); the address keeps its other reasons.
        #[arg(long, default_value = "opt-out")]
        reason: String,
    },
    /// Show whether an address has consent and which suppressions it has.
    Check { address: String },
    /// Add every address of a CSV file (`address[,reason]`, one per line).
    /// The engine reads the file, so its user must be able to read it.
    Import {
        file: PathBuf,
        /// Reason for lines without one (suppressions only).
        #[arg(long, default_value = "opt-out")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum SpoolAction {
    /// Segments, bytes and records per shard, and how many messages are live.
    Stats,
    /// One line per record: location, kind, key id, lane and size. Message
    /// content is not shown.
    Ls,
    /// Check every record's checksum and decrypt every payload; exits 1 when
    /// any record is damaged or cannot be opened.
    Verify,
    /// One message's envelope: lane, category, sender, each recipient's
    /// state, sizes, times, attempts and record location. Asks the running
    /// engine when there is one, otherwise reads the spool files.
    Show {
        /// The message id, 32 hex digits as logs and `spool ls` show it.
        id: String,
        /// Also print the decrypted message. Needs the running engine,
        /// which writes a `content_viewed` audit record first.
        #[arg(long)]
        content: bool,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Recompute every stream's hash chain and check the signed
    /// checkpoints; names the first edited, inserted or removed record and
    /// a cut tail. Exits 1 on any problem.
    Verify {
        /// Checkpoint lines kept off the host (from `caduceus audit
        /// anchor`); catches a tail cut back past them.
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
    /// Print the newest signed checkpoint of each stream, to keep off the
    /// host.
    Anchor,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Validate a configuration file; errors give file:line:column.
    Check {
        /// The configuration file (TOML) to validate.
        file: PathBuf,
    },
    /// Recompile the config file's rules in the running engine; deliveries
    /// in flight finish under the old rules.
    Reload {
        /// Configuration file (TOML), only to find the control socket; the
        /// engine rereads the file it was started with. Without it, the
        /// built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Compile the rules into a compiled policy file, which `serve` maps
    /// at start and on reload while the config still matches it.
    Compile {
        /// Configuration file (TOML) whose rules are compiled.
        #[arg(long, short)]
        config: PathBuf,
        /// The output file; `serve` reads `<state_dir>/policy.compiled`.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Show which rule applies to an address, and why.
    Explain {
        /// An address such as patient@example.org, or a bare domain, in
        /// U-label or A-label form.
        address: String,
        /// Configuration file (TOML), for the state directory and sockets;
        /// without it, the built-in defaults apply (`/var/lib/caduceus`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The lane whose defaults apply: transactional or bulk.
        #[arg(long, default_value = "bulk")]
        lane: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print for an operator stop quietly when the reader of
    // their output goes away (`caduceus report ... | head`), as Unix tools
    // do: the default action of SIGPIPE, which Rust's runtime ignores.
    // `serve` and `demo` keep ignoring it, because a peer closing a socket
    // must never stop the engine.
    if !matches!(cli.command, Command::Serve { .. } | Command::Demo(_))
        && let Err(error) = signal_hook::flag::register_conditional_default(
            signal_hook::consts::SIGPIPE,
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        )
    {
        eprintln!("caduceus: cannot restore the default SIGPIPE action: {error}");
    }
    // The demo prints its own report; only warnings and errors go with it.
    init_logging(if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    });
    let result = match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::Demo(args) => demo::run(args),
        Command::Queue { action, config } => queue(action, config.as_deref()),
        Command::Keys { action, config } => keys(action, config.as_deref()),
        Command::Cores { config } => print_cores(config.as_deref()),
        Command::Policy { action } => policy(action),
        Command::Spool { action, config } => spool(action, config.as_deref()),
        Command::Suppress { action, config } => lists("suppress", action, config.as_deref()),
        Command::Consent { action, config } => lists("consent", action, config.as_deref()),
        Command::Audit { action, config } => {
            read_config(config.as_deref()).and_then(|config| match action {
                AuditAction::Verify { anchor } => audit::run_verify(&config, anchor.as_deref()),
                AuditAction::Anchor => audit::run_anchor(&config),
            })
        }
        Command::Report {
            from,
            to,
            format,
            config,
        } => read_config(config.as_deref())
            .and_then(|config| audit::run_report(&config, &from, &to, &format)),
        Command::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("caduceus: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default_level` unless CADUCEUS_LOG sets a filter.
/// glommio's own warning about unregistered io_uring buffers is left out
/// because the engine logs the cause (RLIMIT_MEMLOCK) and its fix itself.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CADUCEUS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},glommio::sys::uring=error"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Returns what would stop `serve` on this machine although the config is
/// valid: the core allocation, and users and groups that do not exist.
fn machine_problems(config: &Config) -> Vec<String> {
    use nix::unistd::{Group, User};
    let mut problems = Vec::new();
    if let Err(error) = cores::allocate(config, &cores::available_cpus()) {
        problems.push(error);
    }
    let user_exists =
        |name: &str| name.parse::<u32>().is_ok() || matches!(User::from_name(name), Ok(Some(_)));
    let group_exists =
        |name: &str| name.parse::<u32>().is_ok() || matches!(Group::from_name(name), Ok(Some(_)));
    if let Some(user) = &config.user
        && !user_exists(user)
    {
        problems.push(format!(
            "user {user:?} (config `user`) does not exist; create it with `useradd --system {user}`"
        ));
    }
    for lane in Lane::ALL {
        let lane_config = config.lanes.get(lane);
        if let Some(owner) = &lane_config.socket_owner
            && !user_exists(owner)
        {
            problems.push(format!(
                "user {owner:?} (lanes.{}.socket_owner) does not exist",
                lane.as_str()
            ));
        }
        if let Some(group) = &lane_config.socket_group
            && !group_exists(group)
        {
            problems.push(format!(
                "group {group:?} (lanes.{}.socket_group) does not exist; create it with `groupadd --system {group}`",
                lane.as_str()
            ));
        }
    }
    problems
}

fn read_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(path) => load_config(path).map_err(|error| error.to_string()),
        None => Ok(Config::default()),
    }
}

fn serve(config_path: Option<&Path>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let config = read_config(config_path)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let engine = runtime::start_with_config_file(config, config_path.map(Path::to_path_buf))?;
    for signal in signals.forever() {
        match signal {
            SIGHUP => match control::reload_policy(config_path, &engine.policy) {
                Ok(rules) => tracing::info!(rules, "policy: reloaded on SIGHUP"),
                Err(error) => {
                    tracing::error!(%error, "policy: reload rejected; the previous policy stays in force")
                }
            },
            _ => {
                tracing::info!(signal, "engine: draining on signal");
                engine.request_shutdown();
                break;
            }
        }
    }
    engine.wait()
}

fn keys(action: KeysAction, config_path: Option<&Path>) -> Result<(), String> {
    let config = read_config(config_path)?;
    match action {
        KeysAction::Rotate => {
            let response = control_request(&config, &json!({"command": "keys.rotate"}))?;
            println!(
                "spool key rotated: new records are sealed with key {} (was key {}); keep every key in {}, because older records need them",
                response["key_id"],
                response["previous_key_id"],
                response["key_file"].as_str().unwrap_or("the key file")
            );
            Ok(())
        }
    }
}

fn queue(action: QueueAction, config_path: Option<&Path>) -> Result<(), String> {
    let config = read_config(config_path)?;
    let request = match &action {
        QueueAction::List => json!({"command": "queue.list"}),
        QueueAction::Hold { destination } => {
            json!({"command": "queue.hold", "destination": destination})
        }
        QueueAction::Release { destination } => {
            json!({"command": "queue.release", "destination": destination})
        }
        QueueAction::Delete { destination } => {
            json!({"command": "queue.delete", "destination": destination})
        }
        QueueAction::Requeue { destination } => {
            json!({"command": "queue.requeue", "destination": destination})
        }
    };
    let response = control_request(&config, &request)?;
    let executors = response["executors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = |field: &str| -> u64 {
        executors
            .iter()
            .filter_map(|executor| executor[field].as_u64())
            .sum()
    };
    match &action {
        QueueAction::List => {
            println!(
                "{:<40} {:>10} {:>6} {:>5}",
                "DESTINATION", "PENDING", "HELD", "CORE"
            );
            for executor in &executors {
                for row in executor["destinations"].as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {:>10} {:>6} {:>5}",
                        row["destination"].as_str().unwrap_or("?"),
                        row["pending"].as_u64().unwrap_or(0),
                        if row["held"].as_bool() == Some(true) {
                            "yes"
                        } else if row["policy_hold"].as_bool() == Some(true) {
                            "policy"
                        } else {
                            "no"
                        },
                        executor["core"].as_u64().unwrap_or(0),
                    );
                }
            }
        }
        QueueAction::Hold { destination } => println!(
            "held {destination}: no delivery starts until `caduceus queue release {destination}`"
        ),
        QueueAction::Release { destination } => println!("released {destination}"),
        QueueAction::Delete { destination } => println!(
            "deleted {} pending recipients of {destination}",
            total("deleted")
        ),
        QueueAction::Requeue { destination } => println!(
            "requeued {} pending recipients of {destination} for delivery now",
            total("requeued")
        ),
    }
    Ok(())
}

fn lists(list: &str, action: ListAction, config_path: Option<&Path>) -> Result<(), String> {
    let config = read_config(config_path)?;
    let request = match &action {
        ListAction::Add { address, reason } => {
            json!({"command": format!("{list}.add"), "address": address, "reason": reason})
        }
        ListAction::Remove { address, reason } => {
            json!({"command": format!("{list}.remove"), "address": address, "reason": reason})
        }
        ListAction::Check { address } => {
            json!({"command": format!("{list}.check"), "address": address})
        }
        ListAction::Import { file, reason } => {
            let path = file
                .canonicalize()
                .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
            json!({"command": format!("{list}.import"), "path": path, "reason": reason})
        }
    };
    let response = control_request(&config, &request)?;
    println!("{response}");
    Ok(())
}

/// Sends a command over the control socket; an `ok: false` answer becomes
/// the error.
fn control_request(
    config: &Config,
    request: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let response = control::request(&config.control_socket(), request)?;
    if response.get("ok").and_then(|ok| ok.as_bool()) != Some(true) {
        let error = response
            .get("error")
            .and_then(|error| error.as_str())
            .unwrap_or("the engine rejected the command");
        return Err(error.to_string());
    }
    Ok(response)
}

fn spool(action: SpoolAction, config_path: Option<&Path>) -> Result<(), String> {
    use caduceus_spool::inspect::{RecordSummary, scan};
    let config = read_config(config_path)?;
    if let SpoolAction::Show { id, content } = &action {
        return caduceus_engine::spool_show::run(&config, id, *content);
    }
    let keyring = runtime::load_keyring(&config)?;
    let dir = config.spool_dir();
    let records = scan(&dir, keyring.as_ref()).map_err(|error| error.to_string())?;
    match action {
        SpoolAction::Ls => {
            println!(
                "{:>5} {:>22} {:<9} {:>6} {:<14} {:>10}  DETAIL",
                "SHARD", "RECORD", "KIND", "KEY", "LANE", "BYTES"
            );
            for record in &records {
                let lane = Lane::from_u8(record.lane).map_or("?", |lane| lane.as_str());
                let (kind, detail) = match &record.summary {
                    RecordSummary::Message { message_id, .. } => (
                        "message",
                        format!(
                            "id {} recipients {}",
                            message_id.as_deref().unwrap_or("(sealed)"),
                            record.recipient_count
                        ),
                    ),
                    RecordSummary::Outcome {
                        message,
                        recipient_index,
                        outcome,
                        ..
                    } => (
                        "outcome",
                        format!(
                            "for {} recipient {} {:?}",
                            message.map_or("?".to_string(), |message| message.to_string()),
                            recipient_index.map_or("?".to_string(), |index| index.to_string()),
                            outcome
                        ),
                    ),
                    RecordSummary::Damaged { reason } => ("damaged", reason.clone()),
                    RecordSummary::TornTail { end_offset } => (
                        "torn",
                        format!("interrupted write up to offset {end_offset}"),
                    ),
                };
                println!(
                    "{:>5} {:>22} {:<9} {:>6} {:<14} {:>10}  {}",
                    record.shard,
                    record.record.to_string(),
                    kind,
                    record.key_id,
                    lane,
                    record.length_bytes,
                    detail
                );
            }
            Ok(())
        }
        SpoolAction::Stats => {
            let mut segments = std::collections::BTreeSet::new();
            let (mut messages, mut outcomes, mut damaged) = (0u64, 0u64, 0u64);
            let mut final_recipients: std::collections::HashMap<
                (u16, caduceus_spool::RecordRef),
                u32,
            > = std::collections::HashMap::new();
            let mut recipients: std::collections::HashMap<(u16, caduceus_spool::RecordRef), u32> =
                std::collections::HashMap::new();
            for record in &records {
                segments.insert((record.shard, record.record.segment));
                match &record.summary {
                    RecordSummary::Message { .. } => {
                        messages += 1;
                        recipients.insert((record.shard, record.record), record.recipient_count);
                    }
                    RecordSummary::Outcome {
                        message: Some(message),
                        outcome: Some(outcome),
                        ..
                    } => {
                        outcomes += 1;
                        if !matches!(outcome, caduceus_spool::Outcome::Deferred { .. }) {
                            *final_recipients
                                .entry((record.shard, *message))
                                .or_default() += 1;
                        }
                    }
                    RecordSummary::Outcome { .. } => outcomes += 1,
                    RecordSummary::Damaged { .. } | RecordSummary::TornTail { .. } => damaged += 1,
                }
            }
            let live = recipients
                .iter()
                .filter(|(key, count)| final_recipients.get(*key).copied().unwrap_or(0) < **count)
                .count();
            let bytes: u64 = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter_map(|entry| entry.metadata().ok())
                        .map(|metadata| metadata.len())
                        .sum()
                })
                .unwrap_or(0);
            println!("spool: {}", dir.display());
            println!("segments:        {}", segments.len());
            println!("bytes on disk:   {bytes}");
            println!("message records: {messages}");
            println!("outcome records: {outcomes}");
            println!("live messages:   {live}");
            println!("damaged ranges:  {damaged}");
            if keyring.is_none() {
                println!("(encryption is off; outcome counts are exact)");
            }
            Ok(())
        }
        SpoolAction::Verify => {
            let mut problems = 0;
            for record in &records {
                let problem = match &record.summary {
                    RecordSummary::Damaged { reason } => Some(reason.clone()),
                    RecordSummary::TornTail { end_offset } => {
                        Some(format!("interrupted write up to offset {end_offset}"))
                    }
                    _ => record.payload_error.clone(),
                };
                if let Some(problem) = problem {
                    problems += 1;
                    println!("shard {} record {}: {problem}", record.shard, record.record);
                }
            }
            println!(
                "{} records checked, {problems} {}",
                records.len(),
                if problems == 1 { "problem" } else { "problems" }
            );
            if problems > 0 {
                return Err(format!("{problems} damaged or unreadable records"));
            }
            Ok(())
        }
        SpoolAction::Show { .. } => unreachable!("spool show returned above"),
    }
}

/// Replaces this process with `caduceus-bench` from the same directory.
/// The harness lives in its own binary so that the MTA does not link the
/// load generator and the Postfix comparison.
fn bench(args: &[std::ffi::OsString]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let own =
        std::env::current_exe().map_err(|error| format!("cannot find this executable: {error}"))?;
    let harness = own.with_file_name("caduceus-bench");
    if !harness.is_file() {
        return Err(format!(
            "{} not found; build it with `cargo build --release -p caduceus-bench`",
            harness.display()
        ));
    }
    let error = std::process::Command::new(&harness).args(args).exec();
    Err(format!("cannot run {}: {error}", harness.display()))
}

fn print_cores(config_path: Option<&Path>) -> Result<(), String> {
    let config = read_config(config_path)?;
    let cpus = cores::available_cpus();
    println!("{}", cores::topology_report(&cpus));
    let allocation = cores::allocate(&config, &cpus)?;
    println!("allocation:");
    for spec in allocation {
        let lanes: Vec<&str> = spec.lanes.iter().map(|lane| lane.as_str()).collect();
        println!(
            "  executor {} on CPU {}: {}",
            spec.index,
            spec.cpu,
            lanes.join(", ")
        );
    }
    Ok(())
}

fn policy(action: PolicyAction) -> Result<(), String> {
    match action {
        PolicyAction::Check { file } => {
            let config = caduceus_policy::load_config_for_any_machine(&file)
                .map_err(|error| error.to_string())?;
            let policy = Policy::compile(&config).map_err(|error| error.to_string())?;
            println!("{}: valid ({} rules)", file.display(), config.rules.len());
            drop(policy);
            // The file may be meant for another machine, so what only this
            // machine decides is a warning, not an error.
            for problem in machine_problems(&config) {
                eprintln!(
                    "warning: on this machine, {problem}; `caduceus serve` would stop with this error"
                );
            }
            if let Some(warning) = config.message_size_warning() {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        PolicyAction::Reload {
            config: config_path,
        } => {
            // The engine recompiles the file it was started with; the file
            // given here only locates the control socket.
            let config = read_config(config_path.as_deref()).map_err(|error| {
                format!("{error}; the engine was not asked to reload, so its current policy stays in force")
            })?;
            let response = control_request(&config, &json!({"command": "policy.reload"}))?;
            let rules = &response["rules"];
            // An engine built before the reply named its file sends no
            // `config`, and one running on built-in defaults sends null.
            let engine_file = match response.get("config") {
                None => {
                    println!("policy reloaded ({rules} rules)");
                    return Ok(());
                }
                Some(serde_json::Value::String(path)) => path,
                Some(_) => {
                    println!("policy reloaded from the built-in defaults ({rules} rules)");
                    return Ok(());
                }
            };
            println!("policy reloaded from {engine_file} ({rules} rules)");
            if let Some(requested_file) = config_path {
                let requested_file = requested_file.canonicalize().unwrap_or(requested_file);
                if requested_file != Path::new(engine_file) {
                    eprintln!(
                        "warning: the engine reloaded {engine_file}, not {}; copy your changes into {engine_file} and reload again",
                        requested_file.display()
                    );
                }
            }
            Ok(())
        }
        PolicyAction::Compile { config, out } => {
            let config = load_config(&config).map_err(|error| error.to_string())?;
            let policy = Policy::compile(&config).map_err(|error| error.to_string())?;
            policy
                .write_compiled(&out, policy_digest(&config))
                .map_err(|error| format!("cannot write {}: {error}", out.display()))?;
            println!("{}: {} rules compiled", out.display(), policy.rule_count());
            Ok(())
        }
        PolicyAction::Explain {
            address,
            config,
            lane,
        } => {
            let lane = match lane.as_str() {
                "transactional" => Lane::Transactional,
                "bulk" => Lane::Bulk,
                other => {
                    return Err(format!(
                        "invalid --lane {other:?}: expected transactional or bulk"
                    ));
                }
            };
            let config = read_config(config.as_deref())?;
            let policy = Policy::compile(&config).map_err(|error| error.to_string())?;
            println!("{}", policy.explain(&address, lane)?);
            Ok(())
        }
    }
}
