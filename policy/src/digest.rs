//! The source digest that ties a compiled policy file to the config and the
//! build that produced it.

use std::net::IpAddr;

use ring::digest::{Context, SHA256};
use rkyv::rancor::ResultExt;

use crate::Lane;
use crate::TlsMode;
use crate::compiled_file::FORMAT_VERSION;
use crate::config::{Config, RuleConfig};
use crate::duration::ConfigDuration;

/// Every part of a [`Config`] that [`crate::Policy::compile`] turns into
/// the compiled tables, borrowed so that hashing copies no rule.
///
/// `compile` reads the rules whole, `tls.default_mode`, two `[delivery]`
/// limits, and each lane's retry schedule, queue lifetime and source
/// addresses (see `merge` in compiled.rs and `check_rule_lanes` in
/// validate.rs). A change to `compile` that reads another config value
/// must add it here, or a file compiled before that value changed would
/// still be used.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct CompileInputs<'a> {
    #[rkyv(with = rkyv::with::InlineAsBox)]
    rules: &'a [RuleConfig],
    default_tls: TlsMode,
    max_connections_per_destination: u32,
    max_messages_per_connection: u32,
    lanes: [LaneInputs<'a>; Lane::ALL.len()],
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct LaneInputs<'a> {
    #[rkyv(with = rkyv::with::InlineAsBox)]
    retry_schedule: &'a [ConfigDuration],
    max_queue_lifetime: ConfigDuration,
    /// A rule's `source_addresses` are narrowed to those in this list.
    #[rkyv(with = rkyv::with::InlineAsBox)]
    source_addresses: &'a [IpAddr],
}

/// An identifier of the policy crate's source files and the workspace's
/// Cargo.lock, computed by build.rs.
const BUILD_SOURCE_ID: &str = env!("CADUCEUS_POLICY_SOURCE_ID");

/// Computes the SHA-256 source digest of the compiled policy that `config`
/// gives: over the crate version, [`FORMAT_VERSION`], an identifier of this
/// build's policy sources, and the rkyv encoding of every config value that
/// [`crate::Policy::compile`] reads.
///
/// The digest covers parsed values, not the TOML text, so reformatting the
/// file or editing its comments keeps it. A changed rule, default, lane
/// schedule or lifetime changes it, and so does a build whose policy
/// sources or locked dependencies differ.
pub fn policy_digest(config: &Config) -> [u8; 32] {
    let inputs = CompileInputs {
        rules: &config.rules,
        default_tls: config.tls.default_mode,
        max_connections_per_destination: config.delivery.max_connections_per_destination,
        max_messages_per_connection: config.delivery.max_messages_per_connection,
        lanes: Lane::ALL.map(|lane| {
            let lane_config = config.lanes.get(lane);
            LaneInputs {
                retry_schedule: &lane_config.retry_schedule,
                max_queue_lifetime: lane_config.max_queue_lifetime,
                source_addresses: &lane_config.source_addresses,
            }
        }),
    };
    // With `Panic` as the error type, a failure would panic, but
    // serialising plain values into memory has no failure to report: rkyv's
    // errors come from the writer and from shared pointers, and neither
    // applies.
    let encoded = rkyv::to_bytes::<rkyv::rancor::Panic>(&inputs).always_ok();

    let mut context = Context::new(&SHA256);
    for part in [
        b"caduceus compiled policy source".as_slice(),
        env!("CARGO_PKG_VERSION").as_bytes(),
        &FORMAT_VERSION.to_le_bytes(),
        BUILD_SOURCE_ID.as_bytes(),
        &encoded,
    ] {
        // A length before each part keeps the boundaries unambiguous.
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part);
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(context.finish().as_ref());
    digest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_config;

    const CONFIG: &str = "\
[tls]
default_mode = \"required\"

[[rule]]
domain = \"a.example\"
tls = \"none\"

[[rule]]
mx = \"*.b.example\"
hold = true
";

    fn digest_of(text: &str) -> [u8; 32] {
        policy_digest(&parse_config(text, "test.toml").unwrap())
    }

    #[test]
    fn digest_ignores_layout_and_comments() {
        let reformatted = "# Policy for the tests.\n[tls]\ndefault_mode   =   \"required\"   # stricter\n\n\n[[rule]]\n  domain = \"a.example\"\n  tls = \"none\"\n[[rule]]\nmx = \"*.b.example\"\nhold = true # held\n";
        assert_eq!(digest_of(CONFIG), digest_of(reformatted));
    }

    #[test]
    fn digest_ignores_settings_compile_does_not_read() {
        let other =
            format!("hostname = \"other.example\"\n[ingress]\nmax_recipients = 7\n{CONFIG}");
        assert_eq!(digest_of(CONFIG), digest_of(&other));
    }

    #[test]
    fn digest_changes_with_each_compiled_input() {
        let base = digest_of(CONFIG);
        let changes = [
            (
                "rule setting",
                CONFIG.replace("tls = \"none\"", "tls = \"verified\""),
            ),
            ("rule domain", CONFIG.replace("a.example", "c.example")),
            ("rule order", {
                "[tls]\ndefault_mode = \"required\"\n\n[[rule]]\nmx = \"*.b.example\"\nhold = true\n\n[[rule]]\ndomain = \"a.example\"\ntls = \"none\"\n".to_string()
            }),
            (
                "added rule",
                format!("{CONFIG}\n[[rule]]\ndomain = \"d.example\"\nrate = 2.0\n"),
            ),
            (
                "default TLS mode",
                CONFIG.replace("\"required\"", "\"verified\""),
            ),
            (
                "connections per destination",
                format!("[delivery]\nmax_connections_per_destination = 3\n{CONFIG}"),
            ),
            (
                "messages per connection",
                format!("[delivery]\nmax_messages_per_connection = 3\n{CONFIG}"),
            ),
            (
                "bulk retry schedule",
                format!("[lanes.bulk]\nretry_schedule = [\"1m\"]\n{CONFIG}"),
            ),
            (
                "transactional lifetime",
                format!("[lanes.transactional]\nmax_queue_lifetime = \"2d\"\n{CONFIG}"),
            ),
            (
                "bulk source addresses",
                format!("[lanes.bulk]\nsource_addresses = [\"192.0.2.20\"]\n{CONFIG}"),
            ),
        ];
        for (change, text) in changes {
            assert_ne!(digest_of(&text), base, "{change}");
        }
    }
}
