//! The `caduceus` command as a user meets it: the demo, and the messages a
//! mistake in the configuration produces.

mod common;

use std::process::Command;

use common::{binary, state_dir};

fn run(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary())
        .args(args)
        .output()
        .expect("run caduceus");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn demo_delivers_everything() {
    let (success, stdout, stderr) = run(&["demo", "--transactional", "40", "--bulk", "400"]);
    assert!(success, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("every message was delivered"), "{stdout}");
    assert!(stdout.contains("transactional"), "{stdout}");
    assert!(stdout.contains("440 delivered"), "{stdout}");
}

#[test]
fn serve_refuses_root_without_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let state = state_dir();
    let config = state.path().join("caduceus.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n",
            state.path().join("engine").display()
        ),
    )
    .expect("write config");
    let (success, _, stderr) = run(&["serve", "--config", config.to_str().expect("utf-8 path")]);
    assert!(!success, "serve ran as root without a user");
    assert!(stderr.contains("refusing to run as root"), "{stderr}");
    assert!(
        stderr.contains("user = "),
        "the message names the fix: {stderr}"
    );
}

#[test]
fn policy_check_names_file_line_and_column() {
    let state = state_dir();
    let config = state.path().join("broken.toml");
    std::fs::write(
        &config,
        "hostname = \"mta.example.com\"\n\n[delivery]\nconect_timeout = \"5s\"\n",
    )
    .expect("write config");
    let path = config.to_str().expect("utf-8 path");
    let (success, _, stderr) = run(&["policy", "check", path]);
    assert!(!success, "a misspelt key passed the check");
    assert!(stderr.contains(&format!("{path}:4:")), "{stderr}");
    assert!(stderr.contains("conect_timeout"), "{stderr}");
}

#[test]
fn policy_check_accepts_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/caduceus.example.toml");
    let (success, stdout, stderr) = run(&["policy", "check", example]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
}

#[test]
fn policy_explain_names_the_rule() {
    let state = state_dir();
    let config = state.path().join("rules.toml");
    std::fs::write(
        &config,
        "[[rule]]\ndomain = \"*.example.org\"\ntls = \"verified\"\n",
    )
    .expect("write config");
    let (success, stdout, stderr) = run(&[
        "policy",
        "explain",
        "patient@mail.example.org",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("*.example.org"), "{stdout}");
    assert!(stdout.contains("verified"), "{stdout}");
}

#[test]
fn cores_rejects_overlapping_lanes() {
    let state = state_dir();
    let config = state.path().join("cores.toml");
    std::fs::write(
        &config,
        "[lanes.transactional]\ncores = [0]\n\n[lanes.bulk]\ncores = [0]\n",
    )
    .expect("write config");
    let (success, _, stderr) = run(&["cores", "--config", config.to_str().expect("utf-8 path")]);
    assert!(!success, "overlapping cores were accepted");
    assert!(
        stderr.contains("transactional") && stderr.contains("bulk"),
        "{stderr}"
    );
}

#[test]
fn queue_without_engine_explains_itself() {
    let state = state_dir();
    let config = state.path().join("caduceus.toml");
    std::fs::write(
        &config,
        format!("state_dir = \"{}\"\n", state.path().display()),
    )
    .expect("write config");
    let (success, _, stderr) = run(&[
        "queue",
        "list",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    assert!(!success);
    assert!(stderr.contains("control.sock"), "{stderr}");
    assert!(stderr.contains("is `caduceus serve` running"), "{stderr}");
}

#[test]
fn spool_commands_report_a_stopped_engine() {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"held.test\"\nroute = \"127.0.0.1:9\"\nhold = true\n",
        common::engine_config(None)
    );
    let mut engine =
        caduceus_tests::Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let acked = Mutex::new(Vec::new());
    common::inject(
        engine.socket(caduceus_tests::Lane::Bulk),
        "held.test",
        vec![1, 2, 3],
        &acked,
        &AtomicBool::new(false),
    );
    assert_eq!(acked.lock().expect("acked").len(), 3);
    engine.sigterm().expect("SIGTERM");
    engine
        .wait_exit(std::time::Duration::from_secs(60))
        .expect("engine exit");
    let config_path = engine.state_dir().join("caduceus.toml");
    let config_arg = config_path.to_str().expect("utf-8 path");

    let (success, stdout, stderr) = run(&["spool", "stats", "--config", config_arg]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("live messages:   3"), "{stdout}");
    assert!(stdout.contains("damaged ranges:  0"), "{stdout}");

    let (success, stdout, stderr) = run(&["spool", "verify", "--config", config_arg]);
    assert!(success, "{stdout}{stderr}");
    assert!(stdout.contains("0 problems"), "{stdout}");

    let (success, stdout, stderr) = run(&["spool", "ls", "--config", config_arg]);
    assert!(success, "{stderr}");
    assert_eq!(stdout.matches(" message ").count(), 3, "{stdout}");
    assert!(
        !stdout.contains("held.test"),
        "ls shows no address: {stdout}"
    );
}

#[test]
fn two_core_tuning_profile_is_valid() {
    let profile = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning/2-cores.toml");
    let (success, stdout, stderr) = run(&["cores", "--config", profile]);
    assert!(success, "{stderr}");
    assert!(
        stdout.contains("executor 0 on CPU 0: transactional"),
        "{stdout}"
    );
    assert!(stdout.contains("executor 1 on CPU 1: bulk"), "{stdout}");
}

#[test]
fn closed_stdout_stops_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // The reader is gone before the command starts, as with `| head -0`.
    // Closing it only after the start would race with the command's write.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = Command::new(binary())
        .args(["policy", "explain", "someone@example.com"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run caduceus");
    let output = child.wait_with_output().expect("wait for caduceus");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        output.status.signal(),
        Some(13),
        "stopped by SIGPIPE, as Unix tools are: {:?}",
        output.status
    );
}

#[test]
fn policy_explain_fails_on_invalid_address() {
    for input in ["a@", "@rx.example", "a@-bad.com"] {
        let (success, stdout, stderr) = run(&["policy", "explain", input]);
        assert!(!success, "{input:?} was explained: {stdout}");
        assert!(stderr.contains(&format!("{input:?}")), "{stderr}");
        assert!(stderr.contains("invalid"), "{stderr}");
    }
}

#[test]
fn policy_check_warns_about_small_segments() {
    let state = state_dir();
    let config = state.path().join("caduceus.toml");
    std::fs::write(&config, "[spool]\nsegment_size_bytes = 1048576\n").expect("write config");
    let (success, _, stderr) = run(&["policy", "check", config.to_str().expect("utf-8 path")]);
    assert!(success, "a valid file passes: {stderr}");
    assert!(stderr.contains("SIZE 983040"), "{stderr}");
    assert!(stderr.contains("raise segment_size_bytes"), "{stderr}");
}

#[test]
fn policy_check_warns_about_this_machine() {
    let state = state_dir();
    let config = state.path().join("caduceus.toml");
    std::fs::write(
        &config,
        "user = \"no-such-user-for-caduceus\"\n\n[lanes.bulk]\nsocket_group = \"no-such-group-for-caduceus\"\n",
    )
    .expect("write config");
    let (success, stdout, stderr) = run(&["policy", "check", config.to_str().expect("utf-8 path")]);
    assert!(success, "a valid file passes: {stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(
        stderr.contains("user \"no-such-user-for-caduceus\""),
        "{stderr}"
    );
    assert!(stderr.contains("useradd --system"), "{stderr}");
    assert!(
        stderr.contains("group \"no-such-group-for-caduceus\" (lanes.bulk.socket_group)"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_state_dir_in_use() {
    use caduceus_tests::{Engine, Lane};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let state = state_dir();
    let engine = Engine::start(&common::engine_config(None), &state.path().join("engine"))
        .expect("engine start");
    // A draining engine has closed its lane sockets but still owns its
    // spool and lists for up to 30 s. A second `serve` found no socket
    // accepting connections, took the state directory over and ran beside
    // it. Removing the socket files gives a second start the same view.
    for lane in [Lane::Transactional, Lane::Bulk] {
        std::fs::remove_file(engine.socket(lane)).expect("remove socket");
    }
    let mut second = Command::new(binary())
        .args(["serve", "--config"])
        .arg(engine.state_dir().join("caduceus.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second engine");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        second.kill().expect("kill second engine");
        second.wait().expect("reap second engine");
        panic!("a second engine started on the state directory of a running one");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another caduceus process"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&engine.state_dir().display().to_string()),
        "{stderr}"
    );
}

#[test]
fn policy_check_warns_about_missing_cpus() {
    // The README promises a warning when the CPU allocation does not fit
    // this machine, so that a profile for a larger production host can be
    // checked on a small one. A CPU that is not online was an error.
    let profile = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning/64-cores.toml");
    let (success, stdout, stderr) = run(&["policy", "check", profile]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    let online = std::thread::available_parallelism().map_or(1, usize::from);
    if online < 64 {
        assert!(stderr.contains("warning: on this machine"), "{stderr}");
        assert!(stderr.contains("CPU"), "{stderr}");
    }
}
