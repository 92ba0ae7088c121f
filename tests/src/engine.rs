//! The `caduceus` binary run as a child process.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::net::{other_error, poll_until, tail_of_file};

/// How long `start` waits for both lane sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `restart` waits for a running engine to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A submission lane, named as in the `[lanes]` section of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Transactional,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Transactional, Lane::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }
}

/// A running (or exited) engine process. Dropping it kills the process.
pub struct Engine {
    binary: PathBuf,
    state_dir: PathBuf,
    config_path: PathBuf,
    sockets: [PathBuf; 2],
    child: Option<Child>,
}

impl Engine {
    /// Writes `config_toml` to `<state_dir>/caduceus.toml`, with `state_dir`
    /// set to `state_dir`, runs `caduceus serve --config <file>` and waits
    /// until both lane sockets exist.
    ///
    /// The binary is `$CADUCEUS_BIN` when set, otherwise `caduceus` in the
    /// Cargo target directory of the running test (`target/<profile>/`).
    pub fn start(config_toml: &str, state_dir: &Path) -> io::Result<Engine> {
        Engine::start_binary(&engine_binary()?, config_toml, state_dir)
    }

    /// Like [`Engine::start`], with an explicit binary, such as an installed
    /// `caduceus`.
    pub fn start_binary(binary: &Path, config_toml: &str, state_dir: &Path) -> io::Result<Engine> {
        let binary = binary.to_path_buf();
        std::fs::create_dir_all(state_dir)?;
        let state_dir = state_dir.canonicalize()?;
        let mut config: toml::Table = toml::from_str(config_toml)
            .map_err(|error| other_error(format!("invalid engine configuration: {error}")))?;
        if let Some(existing) = config.get("state_dir")
            && existing.as_str() != state_dir.to_str()
        {
            return Err(other_error(format!(
                "the configuration sets state_dir = {existing}, but the test passed {}",
                state_dir.display()
            )));
        }
        config.insert(
            "state_dir".into(),
            toml::Value::String(state_dir.display().to_string()),
        );
        let sockets = Lane::ALL.map(|lane| lane_socket(&config, &state_dir, lane));
        let config_path = state_dir.join("caduceus.toml");
        let text = toml::to_string(&config)
            .map_err(|error| other_error(format!("engine configuration: {error}")))?;
        std::fs::write(&config_path, text)?;

        let mut engine = Engine {
            binary,
            state_dir,
            config_path,
            sockets,
            child: None,
        };
        engine.spawn()?;
        Ok(engine)
    }

    /// Returns the submission socket of `lane`.
    pub fn socket(&self, lane: Lane) -> &Path {
        match lane {
            Lane::Transactional => &self.sockets[0],
            Lane::Bulk => &self.sockets[1],
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Returns the process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM, the graceful shutdown signal.
    pub fn sigterm(&self) -> io::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL. The page cache survives, so this tests restart and
    /// recovery, not durability.
    pub fn sigkill(&self) -> io::Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| other_error("the engine is not running"))?;
        let status = poll_until(timeout, || child.try_wait().ok().flatten());
        match status {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => Err(other_error(format!(
                "the engine did not exit within {timeout:?}\nstderr:\n{}",
                self.stderr_tail()
            ))),
        }
    }

    /// Stops the engine with SIGTERM if it still runs, then starts it again
    /// with the same configuration and state directory.
    pub fn restart(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            self.sigterm()?;
            self.wait_exit(STOP_TIMEOUT)?;
        }
        self.spawn()
    }

    /// Reads the delivery log, one JSON value per line: `<state_dir>/log/delivery.log`
    /// when it exists (written by earlier versions and by fake engines), then
    /// every per-core file `delivery.<core>.<YYYYMMDD>.<n>.log` ordered by
    /// day, generation and core. A line that is not valid JSON is an error,
    /// because the engine writes whole lines only.
    pub fn delivery_log(&self) -> io::Result<Vec<serde_json::Value>> {
        let dir = self.state_dir.join("log");
        let mut rotated = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    if let Some(order) = rotated_log_order(&name) {
                        rotated.push((order, name));
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        }
        rotated.sort();
        let names = std::iter::once("delivery.log".to_string())
            .chain(rotated.into_iter().map(|(_, name)| name));
        let mut entries = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str(line).map_err(|error| {
                    other_error(format!(
                        "{} line {}: invalid JSON: {error}",
                        path.display(),
                        index + 1
                    ))
                })?;
                entries.push(value);
            }
        }
        Ok(entries)
    }

    /// Returns the engine's standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.stderr_path()).unwrap_or_default()).into_owned()
    }

    fn stderr_path(&self) -> PathBuf {
        self.state_dir.join("engine.stderr")
    }

    fn stderr_tail(&self) -> String {
        tail_of_file(&self.stderr_path(), 60)
    }

    fn signal(&self, signal: Signal) -> io::Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| other_error("the engine is not running"))?;
        let pid = i32::try_from(child.id())
            .map_err(|_| other_error(format!("process id {} out of range", child.id())))?;
        kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }

    fn spawn(&mut self) -> io::Result<()> {
        for socket in &self.sockets {
            // A socket left by a killed engine would pass the wait below.
            match std::fs::remove_file(socket) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())?;
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            .spawn()
            .map_err(|error| {
                other_error(format!("running {} failed: {error}", self.binary.display()))
            })?;
        self.child = Some(child);

        let sockets = self.sockets.clone();
        let child = self.child.as_mut().ok_or_else(|| other_error("no child"))?;
        let outcome = poll_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            sockets
                .iter()
                .all(|socket| socket.exists())
                .then_some(Ok(()))
        });
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(status)) => {
                self.child = None;
                Err(other_error(format!(
                    "the engine exited at start ({status})\nstderr:\n{}",
                    self.stderr_tail()
                )))
            }
            None => Err(other_error(format!(
                "the engine did not create {:?} within {START_TIMEOUT:?}\nstderr:\n{}",
                self.sockets,
                self.stderr_tail()
            ))),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("engine stderr tail:\n{}", self.stderr_tail());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds the `caduceus` binary: `$CADUCEUS_BIN`, else next to the directory of
/// the test executable (`target/<profile>/deps/<test>` has the binary at
/// `target/<profile>/caduceus`).
/// The `caduceus` binary: `$CADUCEUS_BIN` when set, otherwise the one in
/// the running test's target directory, built on first use.
///
/// `cargo test --workspace` builds the binaries of the package under test
/// only, and the engine is another package, so the first call runs
/// `cargo build -p caduceus-engine --bin caduceus` in the same profile (a
/// no-op when it is up to date). Cargo releases its build lock before it
/// runs tests, so the nested build does not deadlock.
pub fn engine_binary() -> io::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("CADUCEUS_BIN") {
        return Ok(PathBuf::from(path));
    }
    BUILT
        .get_or_init(build_engine_binary)
        .clone()
        .map_err(other_error)
}

fn build_engine_binary() -> Result<PathBuf, String> {
    let executable = std::env::current_exe().map_err(|error| error.to_string())?;
    let profile_dir = executable
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("no target directory above {}", executable.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("no target directory above {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            "caduceus-engine",
            "--bin",
            "caduceus",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == "release" {
        command.arg("--release");
    }
    let status = command
        .status()
        .map_err(|error| format!("cannot run cargo to build the engine: {error}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build -p caduceus-engine` failed ({status})"
        ));
    }
    let binary = profile_dir.join("caduceus");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "{} not found after building; set CADUCEUS_BIN to the engine binary",
            binary.display()
        ))
    }
}

/// The lane socket path the engine will use: `lanes.<lane>.socket` when set,
/// otherwise `<state_dir>/run/<lane>.sock`.
// NOTE: a relative `socket` is resolved against the state directory, where the
// config file is. The engine may resolve it differently.
fn lane_socket(config: &toml::Table, state_dir: &Path, lane: Lane) -> PathBuf {
    let configured = config
        .get("lanes")
        .and_then(|lanes| lanes.get(lane.as_str()))
        .and_then(|lane_table| lane_table.get("socket"))
        .and_then(toml::Value::as_str);
    match configured {
        Some(path) if Path::new(path).is_absolute() => PathBuf::from(path),
        Some(path) => state_dir.join(path),
        None => state_dir
            .join("run")
            .join(format!("{}.sock", lane.as_str())),
    }
}

/// Returns the (day, generation, core) of a per-core delivery log file name,
/// `delivery.<core>.<YYYYMMDD>.<n>.log`.
fn rotated_log_order(name: &str) -> Option<(u32, u32, u16)> {
    let inner = name.strip_prefix("delivery.")?.strip_suffix(".log")?;
    let mut parts = inner.split('.');
    let core = parts.next()?.parse().ok()?;
    let day = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((day, generation, core))
}
