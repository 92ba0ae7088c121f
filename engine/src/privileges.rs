//! Dropping root after the sockets are open.

use std::path::Path;

use caduceus_policy::config::Config;
use nix::unistd::{Gid, Uid, User, chown, geteuid, setgid, setgroups, setuid};

/// When running as root, switches to `config.user` (after handing it the
/// state directory); refuses to go on as root when no user is configured.
/// Must run before any thread is spawned, because `setuid` changes only the
/// calling thread's credentials at the kernel level and glibc broadcasts it
/// to threads that exist.
pub fn drop_if_root(config: &Config) -> Result<(), String> {
    if !geteuid().is_root() {
        return Ok(());
    }
    let Some(name) = config.user.as_deref() else {
        return Err("refusing to run as root: set `user = \"NAME\"` in the config to the unprivileged user Caduceus should switch to after opening its sockets".into());
    };
    let user = User::from_name(name)
        .map_err(|error| format!("cannot look up user {name:?}: {error}"))?
        .ok_or_else(|| format!("user {name:?} (config `user`) does not exist; create it with `useradd --system {name}` or name another user"))?;
    if user.uid.is_root() {
        return Err(format!(
            "config `user = {name:?}` is root; name an unprivileged user"
        ));
    }
    hand_over(&config.state_dir, user.uid, user.gid)?;
    setgroups(&[user.gid]).map_err(|error| format!("setgroups failed: {error}"))?;
    setgid(user.gid).map_err(|error| format!("setgid({}) failed: {error}", user.gid))?;
    setuid(user.uid).map_err(|error| format!("setuid({}) failed: {error}", user.uid))?;
    tracing::info!(
        user = name,
        uid = user.uid.as_raw(),
        "engine: dropped root privileges"
    );
    Ok(())
}

/// Gives the state directory tree to the engine's user. Sockets keep the
/// owner their config sets; the process already holds their listening fds.
fn hand_over(dir: &Path, uid: Uid, gid: Gid) -> Result<(), String> {
    chown(dir, Some(uid), Some(gid))
        .map_err(|error| format!("cannot chown {}: {error}", dir.display()))?;
    let entries = std::fs::read_dir(dir)
        .map_err(|error| format!("cannot read {}: {error}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            hand_over(&path, uid, gid)?;
        } else if kind.is_file() {
            chown(&path, Some(uid), Some(gid))
                .map_err(|error| format!("cannot chown {}: {error}", path.display()))?;
        }
    }
    Ok(())
}
