//! Loading the compiled policy at start and on reload: from the compiled
//! file in the state directory when it was compiled from the same config by
//! this build, otherwise by compiling the config and replacing the file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use caduceus_policy::config::Config;
use caduceus_policy::{Policy, compiled_image_digest, policy_digest};

/// The compiled policy's file name in the state directory.
pub const COMPILED_POLICY_FILE: &str = "policy.compiled";

/// Returns the compiled policy file of an engine whose state directory is
/// `state_dir`.
pub fn compiled_policy_path(state_dir: &Path) -> PathBuf {
    state_dir.join(COMPILED_POLICY_FILE)
}

/// The way [`load_policy`] got the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// Loaded from a mapping of the compiled file.
    Mapped,
    /// Compiled from the config.
    Compiled,
}

/// The reason the compiled file could not be used.
enum Unusable {
    Missing,
    /// The file is valid, but compiled from another config or by another
    /// build.
    OtherSource,
    /// The file cannot be opened, mapped or trusted.
    Invalid(String),
}

/// Returns the policy for `config` and its source. When the source digest
/// of `compiled_path` is the config's [`policy_digest`] and the file passes
/// every check, the policy comes from that file. Otherwise the config is
/// compiled, and the result is written to `compiled_path` for the next
/// start or reload.
///
/// Only a config that fails to compile is an error. A missing, stale or
/// damaged file is replaced, and a file that cannot be written is logged
/// and left for the next attempt.
///
/// A matching file is used without compiling, so the checks that
/// `Policy::compile` makes of the rest of the config do not run. Callers
/// pass a config from `caduceus_policy::load_config`, which makes them.
pub fn load_policy(
    config: &Config,
    compiled_path: &Path,
) -> Result<(Policy, PolicyOrigin), String> {
    let started = Instant::now();
    remove_stale_temporary_files(compiled_path);
    let digest = policy_digest(config);
    let reason = match open_matching(compiled_path, &digest) {
        Ok(policy) => {
            tracing::info!(
                rules = policy.rule_count(),
                path = %compiled_path.display(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "policy: mapped compiled file"
            );
            return Ok((policy, PolicyOrigin::Mapped));
        }
        Err(Unusable::Missing) => "there was no compiled file",
        Err(Unusable::OtherSource) => {
            "the compiled file was compiled from another config or by another build"
        }
        Err(Unusable::Invalid(error)) => {
            tracing::warn!(
                path = %compiled_path.display(),
                %error,
                "policy: the compiled file cannot be used; compiling the config and replacing the file"
            );
            "the compiled file cannot be used"
        }
    };

    let policy = Policy::compile(config).map_err(|error| error.to_string())?;
    match policy.write_compiled(compiled_path, digest) {
        Ok(()) => tracing::info!(
            rules = policy.rule_count(),
            path = %compiled_path.display(),
            reason,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "policy: compiled and wrote the compiled file"
        ),
        Err(error) => tracing::warn!(
            rules = policy.rule_count(),
            %error,
            reason,
            "policy: compiled the config, but writing the compiled file failed; the next start or reload compiles again"
        ),
    }
    Ok((policy, PolicyOrigin::Compiled))
}

/// Removes the temporary files that a write of `compiled_path` left
/// behind when its process died, so that crashes during a write do not
/// pile up copies of the file. A write names its temporary file
/// `.<name>.tmp-<pid>`. A file whose process still runs, such as a
/// `caduceus policy compile` writing at this moment, is kept. So is one
/// whose process id was reused since, until that process ends.
fn remove_stale_temporary_files(compiled_path: &Path) {
    let Some(name) = compiled_path.file_name().and_then(|name| name.to_str()) else {
        return;
    };
    let directory = compiled_path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Without /proc no writer would look alive, so leave every file.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|file_name| file_name.strip_prefix(&prefix))
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|byte| byte.is_ascii_digit()))
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                "policy: removed a temporary compiled file whose writer is gone"
            ),
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "policy: removing a temporary compiled file whose writer is gone failed"
            ),
        }
    }
}

/// Maps `path` and loads the policy in it if its source digest is `digest`.
fn open_matching(path: &Path, digest: &[u8; 32]) -> Result<Policy, Unusable> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
        Err(error) => return Err(Unusable::Invalid(format!("opening it failed: {error}"))),
    };
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mapping = crate::io::mapping::map_read_only(&file, directory)
        .map_err(|error| Unusable::Invalid(format!("mapping it failed: {error}")))?;
    // The digest is read from the mapping, not from the path, so a file
    // renamed into place since the open cannot pass for this one.
    let found = compiled_image_digest(&mapping, path)
        .map_err(|error| Unusable::Invalid(error.to_string()))?;
    if found != *digest {
        return Err(Unusable::OtherSource);
    }
    Policy::from_compiled_image(Arc::new(mapping), path)
        .map_err(|error| Unusable::Invalid(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_policy::parse_config;

    const CONFIG: &str = "[[rule]]\ndomain = \"a.example\"\ntls = \"none\"\n";

    fn config(text: &str) -> Config {
        parse_config(text, "test.toml").unwrap()
    }

    #[test]
    fn first_load_compiles_and_second_maps() {
        let directory = tempfile::tempdir().unwrap();
        let path = compiled_policy_path(directory.path());

        let (_, origin) = load_policy(&config(CONFIG), &path).unwrap();
        assert_eq!(origin, PolicyOrigin::Compiled);
        assert!(path.is_file());

        let (policy, origin) = load_policy(&config(CONFIG), &path).unwrap();
        assert_eq!(origin, PolicyOrigin::Mapped);
        assert_eq!(policy.rule_count(), 1);
    }

    #[test]
    fn changed_config_recompiles() {
        let directory = tempfile::tempdir().unwrap();
        let path = compiled_policy_path(directory.path());
        load_policy(&config(CONFIG), &path).unwrap();

        let changed = format!("{CONFIG}\n[[rule]]\ndomain = \"b.example\"\nhold = true\n");
        let (policy, origin) = load_policy(&config(&changed), &path).unwrap();
        assert_eq!(origin, PolicyOrigin::Compiled);
        assert_eq!(policy.rule_count(), 2);
        let (_, origin) = load_policy(&config(&changed), &path).unwrap();
        assert_eq!(origin, PolicyOrigin::Mapped);
    }

    #[test]
    fn damaged_file_replaced() {
        let directory = tempfile::tempdir().unwrap();
        let path = compiled_policy_path(directory.path());
        load_policy(&config(CONFIG), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let damaged_files = [
            bytes[..bytes.len() / 2].to_vec(),
            Vec::new(),
            b"not a policy".to_vec(),
        ];

        for damaged in damaged_files {
            std::fs::write(&path, &damaged).unwrap();
            let (policy, origin) = load_policy(&config(CONFIG), &path).unwrap();
            assert_eq!(origin, PolicyOrigin::Compiled);
            assert_eq!(policy.rule_count(), 1);
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
        }
    }

    #[test]
    fn stale_temporary_file_removed() {
        // A write that died leaves `.policy.compiled.tmp-<pid>`. Process id
        // 4294967295 is above any pid_max, so no process has it, while
        // process 1 always runs.
        let directory = tempfile::tempdir().unwrap();
        let path = compiled_policy_path(directory.path());
        let stale = directory.path().join(".policy.compiled.tmp-4294967295");
        let live = directory.path().join(".policy.compiled.tmp-1");
        let other = directory.path().join(".other.tmp-4294967295");
        for file in [&stale, &live, &other] {
            std::fs::write(file, b"partial").unwrap();
        }

        load_policy(&config(CONFIG), &path).unwrap();
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(other.exists());
        assert!(path.is_file());
    }

    #[test]
    fn invalid_config_rejected_and_not_written() {
        // A config built in code skips load_config's checks, so with no
        // matching file, compile is what rejects it.
        let directory = tempfile::tempdir().unwrap();
        let path = compiled_policy_path(directory.path());
        let mut invalid = config(CONFIG);
        invalid.rules[0].rate = Some(-1.0);
        assert!(load_policy(&invalid, &path).is_err());
        assert!(!path.exists());
    }
}
