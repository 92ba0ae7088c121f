//! The compiled policy against a table of recipient domains and MX hosts.

use std::time::Duration;

use caduceus_policy::{
    Category, CompiledPolicyError, DEFAULT_RULE_ID, Lane, Policy, Route, TlsMode, normalise_domain,
    parse_config, policy_digest,
};

const CONFIG: &str = r#"
hostname = "mta.example-health.org"

[tls]
default_mode = "opportunistic"

[delivery]
max_connections_per_destination = 8

[lanes.transactional]
retry_schedule = ["10s", "1m"]
max_queue_lifetime = "1d"
source_addresses = ["192.0.2.10"]

[lanes.bulk]
retry_schedule = ["5m", "1h"]
max_queue_lifetime = "5d"
source_addresses = ["192.0.2.20", "192.0.2.21"]

# 0: exact
[[rule]]
domain = "partner.example"
tls = "verified"

# 1: wildcard for every name below example.net
[[rule]]
domain = "*.example.net"
rate = 2.5

# 2: a longer wildcard inside rule 1
[[rule]]
domain = "*.eu.example.net"
rate = 10.0
burst = 40

# 3: exact name inside rule 2
[[rule]]
domain = "mail.eu.example.net"
hold = true

# 4: IDN written as a U-label
[[rule]]
domain = "bücher.example"
max_connections = 2

# 5: IDN written as an A-label
[[rule]]
domain = "*.xn--mnchen-3ya.example"
retry_schedule = ["30s"]
max_queue_lifetime = "2h"

# 6: every domain hosted by Microsoft 365 shares this rule
[[rule]]
mx = "*.mail.protection.outlook.com"
max_connections = 4
rate = 50.0

# 7: one MX host exactly
[[rule]]
mx = "mx1.example.org"
route = "relay.example-health.org:2525"

# 8: a route to an address
[[rule]]
domain = "lab.example"
route = "[2001:db8::25]:25"
max_messages_per_connection = 5

# 9: sender category only
[[rule]]
domain = "outreach.example-health.org"
sender_category = "care"

# 10: wildcard that rule 9 must not hide
[[rule]]
domain = "*.example-health.org"
tls = "required"

# 11: transactional mail only, from its own source address
[[rule]]
domain = "clinic.example"
lanes = ["transactional"]
source_addresses = ["192.0.2.10"]

# 12: both lanes, each with the rule's address from its own pool
[[rule]]
domain = "portal.example"
source_addresses = ["192.0.2.21", "192.0.2.10"]
"#;

fn policy() -> Policy {
    let config = parse_config(CONFIG, "cases.toml").unwrap();
    Policy::compile(&config).unwrap()
}

/// Returns the policy compiled from TOML and the same policy after a round
/// trip through the compiled file, so that every case runs against both.
fn policies() -> [Policy; 2] {
    let compiled = policy();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("policy.compiled");
    let digest = policy_digest(&parse_config(CONFIG, "cases.toml").unwrap());
    compiled.write_compiled(&path, digest).unwrap();
    let loaded = Policy::open_compiled(&path).unwrap();
    [compiled, loaded]
}

/// Normalises like the engine does before a lookup.
fn lookup_domain(policy: &Policy, domain: &str, lane: Lane) -> u32 {
    let domain = normalise_domain(domain).unwrap();
    policy.for_domain(&domain, lane).rule_id
}

#[test]
fn domain_cases() {
    for policy in policies() {
        let cases: &[(&str, u32, &str)] = &[
            ("partner.example", 0, "exact"),
            (
                "sub.partner.example",
                DEFAULT_RULE_ID,
                "exact does not cover subdomains",
            ),
            ("a.example.net", 1, "wildcard"),
            ("deep.a.example.net", 1, "wildcard at any depth"),
            (
                "example.net",
                DEFAULT_RULE_ID,
                "wildcard excludes its parent",
            ),
            (
                "eu.example.net",
                1,
                "shorter wildcard covers the longer one's parent",
            ),
            ("x.eu.example.net", 2, "longer wildcard wins"),
            ("mail.eu.example.net", 3, "exact inside wildcards wins"),
            (
                "a.mail.eu.example.net",
                2,
                "exact does not extend to children",
            ),
            ("bücher.example", 4, "IDN rule as U-label, query as U-label"),
            (
                "xn--bcher-kva.example",
                4,
                "IDN rule as U-label, query as A-label",
            ),
            ("BÜCHER.Example", 4, "query case folded"),
            (
                "praxis.münchen.example",
                5,
                "IDN rule as A-label, query as U-label",
            ),
            (
                "praxis.xn--mnchen-3ya.example",
                5,
                "IDN rule as A-label, query as A-label",
            ),
            ("unrelated.example", DEFAULT_RULE_ID, "no rule"),
            (
                "fooexample.net",
                DEFAULT_RULE_ID,
                "suffix must start at a label",
            ),
            (
                "outreach.example-health.org",
                10,
                "sender-only rule does not hide the wildcard",
            ),
            ("lab.example", 8, "route rule"),
        ];
        for (domain, expected, why) in cases {
            for lane in Lane::ALL {
                assert_eq!(
                    lookup_domain(&policy, domain, lane),
                    *expected,
                    "{domain} in {lane:?}: {why}"
                );
            }
        }
    }
}

#[test]
fn domain_lookup_tolerates_root_dot() {
    for policy in policies() {
        assert_eq!(policy.for_domain("partner.example.", Lane::Bulk).rule_id, 0);
    }
}

#[test]
fn mx_cases() {
    for policy in policies() {
        let cases: &[(&str, Option<u32>)] = &[
            ("contoso-com.mail.protection.outlook.com", Some(6)),
            ("contoso-com.mail.protection.outlook.com.", Some(6)),
            ("fabrikam-org.mail.protection.outlook.com", Some(6)),
            ("mail.protection.outlook.com", None),
            ("mx1.example.org", Some(7)),
            ("mx2.example.org", None),
            ("partner.example", None),
        ];
        for (host, expected) in cases {
            let found = policy
                .for_mx_host(host, Lane::Bulk)
                .map(|rule| rule.rule_id);
            assert_eq!(found, *expected, "{host}");
        }
        let shared_a = policy
            .for_mx_host(
                "contoso-com.mail.protection.outlook.com",
                Lane::Transactional,
            )
            .unwrap();
        let shared_b = policy
            .for_mx_host(
                "fabrikam-org.mail.protection.outlook.com",
                Lane::Transactional,
            )
            .unwrap();
        assert!(
            std::ptr::eq(shared_a.settings(), shared_b.settings()),
            "domains on one MX share one rule"
        );
        assert_eq!(shared_a.max_connections, 4);
        assert_eq!(shared_a.rate_per_sec, Some(50.0));
        assert_eq!(shared_a.burst, 50);
    }
}

#[test]
fn effective_settings_merge_defaults() {
    for policy in policies() {
        let defaults = policy.for_domain("unrelated.example", Lane::Transactional);
        assert_eq!(defaults.rule_id, DEFAULT_RULE_ID);
        assert_eq!(defaults.tls, TlsMode::Opportunistic);
        assert_eq!(defaults.route(), None);
        assert_eq!(defaults.rate_per_sec, None);
        assert_eq!(defaults.burst, 0);
        assert_eq!(defaults.max_connections, 8);
        assert_eq!(defaults.max_messages_per_connection, 100);
        assert_eq!(
            &*defaults.settings().retry_schedule,
            &[Duration::from_secs(10), Duration::from_secs(60)]
        );
        assert_eq!(defaults.max_queue_lifetime(), Duration::from_secs(86_400));
        assert!(!defaults.hold);

        let bulk_defaults = policy.for_domain("unrelated.example", Lane::Bulk);
        assert_eq!(
            &*bulk_defaults.settings().retry_schedule,
            &[Duration::from_secs(300), Duration::from_secs(3600)]
        );
        assert_eq!(
            bulk_defaults.max_queue_lifetime(),
            Duration::from_secs(5 * 86_400)
        );

        let partner = policy.for_domain("partner.example", Lane::Bulk);
        assert_eq!(partner.tls, TlsMode::Verified);
        assert_eq!(
            partner.max_queue_lifetime(),
            Duration::from_secs(5 * 86_400)
        );

        let wildcard = policy.for_domain("a.example.net", Lane::Bulk);
        assert_eq!(wildcard.rate_per_sec, Some(2.5));
        assert_eq!(
            wildcard.burst, 3,
            "burst defaults to one second of rate, rounded up"
        );

        let eu = policy.for_domain("x.eu.example.net", Lane::Bulk);
        assert_eq!(eu.burst, 40);

        let held = policy.for_domain("mail.eu.example.net", Lane::Transactional);
        assert!(held.hold);
        assert_eq!(
            held.rate_per_sec, None,
            "rules do not inherit from shorter patterns"
        );

        let munich = policy.for_domain("praxis.xn--mnchen-3ya.example", Lane::Transactional);
        assert_eq!(
            &*munich.settings().retry_schedule,
            &[Duration::from_secs(30)]
        );
        assert_eq!(munich.max_queue_lifetime(), Duration::from_secs(7200));

        let lab = policy.for_domain("lab.example", Lane::Transactional);
        assert_eq!(
            lab.route(),
            Some(&Route::Addr("[2001:db8::25]:25".parse().unwrap()))
        );
        assert_eq!(lab.max_messages_per_connection, 5);

        let relay = policy.for_mx_host("mx1.example.org", Lane::Bulk).unwrap();
        assert_eq!(
            relay.route(),
            Some(&Route::Host {
                host: "relay.example-health.org".to_string(),
                port: 2525
            })
        );
    }
}

#[test]
fn sender_categories() {
    for policy in policies() {
        assert_eq!(
            policy.sender_category("outreach.example-health.org"),
            Some(Category::Care)
        );
        assert_eq!(policy.sender_category("billing.example-health.org"), None);
        assert_eq!(policy.sender_category("partner.example"), None);
    }
}

#[test]
fn explain_names_rule_and_sources() {
    for policy in policies() {
        let text = policy
            .explain("Patient@Praxis.München.example", Lane::Transactional)
            .expect("explained");
        assert!(
            text.contains("domain: praxis.xn--mnchen-3ya.example"),
            "{text}"
        );
        assert!(text.contains("rule[5]"), "{text}");
        assert!(text.contains("*.xn--mnchen-3ya.example"), "{text}");
        assert!(text.contains("retry_schedule = [30s] (rule[5])"), "{text}");
        assert!(
            text.contains("tls = opportunistic (tls.default_mode)"),
            "{text}"
        );
        assert!(
            text.contains("max_connections = 8 (delivery.max_connections_per_destination)"),
            "{text}"
        );

        let text = policy
            .explain("someone@unrelated.example", Lane::Bulk)
            .expect("explained");
        assert!(text.contains("no domain rule"), "{text}");
        assert!(text.contains("*.mail.protection.outlook.com"), "{text}");
        assert!(text.contains("(lanes.bulk.max_queue_lifetime)"), "{text}");

        let text = policy
            .explain("outreach.example-health.org", Lane::Bulk)
            .expect("explained");
        assert!(text.contains("rule[10]"), "{text}");
        assert!(text.contains("category care from rule[9]"), "{text}");

        let error = policy
            .explain("bad address@", Lane::Bulk)
            .expect_err("an invalid address is an error");
        assert!(error.contains("invalid"), "{error}");
    }
}

#[test]
fn empty_config_compiles_to_defaults() {
    let config = parse_config("", "empty.toml").unwrap();
    let policy = Policy::compile(&config).unwrap();
    assert_eq!(policy.rule_count(), 0);
    assert_eq!(
        policy.for_domain("example.com", Lane::Bulk).rule_id,
        DEFAULT_RULE_ID
    );
    assert!(policy.for_mx_host("mx.example.com", Lane::Bulk).is_none());
    assert_eq!(policy.sender_category("example.com"), None);
}

#[test]
fn compile_rejects_invalid_config_built_in_code() {
    let mut config = parse_config("", "empty.toml").unwrap();
    config.rules.push(caduceus_policy::config::RuleConfig {
        domain: Some("example.com".to_string()),
        mx: Some("mx.example.com".to_string()),
        ..Default::default()
    });
    let error = Policy::compile(&config).unwrap_err().to_string();
    assert!(error.contains("rule[0].mx"), "{error}");
    assert!(error.contains("not both"), "{error}");
}

#[test]
fn policy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
}

#[test]
fn compiled_file_rejects_damage() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("policy.compiled");
    policy().write_compiled(&path, [7; 32]).unwrap();
    let good = std::fs::read(&path).unwrap();

    let open_bytes = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        match Policy::open_compiled(&path) {
            Err(error @ CompiledPolicyError::Invalid { .. }) => error.to_string(),
            other => panic!("expected an invalid file, got {other:?}"),
        }
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 40;
    flipped[last] ^= 0x20;
    assert!(open_bytes(&flipped).contains("archive checksum"));
    // Byte 30 is inside the source digest, which only the header checksum
    // protects.
    let mut header = good.clone();
    header[30] ^= 0x01;
    assert!(open_bytes(&header).contains("header checksum"));
    assert!(open_bytes(&good[..good.len() - 8]).contains("truncated"));
    assert!(open_bytes(&good[..12]).contains("shorter than"));
    assert!(
        open_bytes(b"[[rule]]\ndomain = \"x.example\"\nrate = 10.0\nhold = true\n")
            .contains("magic")
    );

    let missing = Policy::open_compiled(&directory.path().join("missing")).unwrap_err();
    assert!(
        matches!(
            missing,
            CompiledPolicyError::Io {
                operation: "open",
                ..
            }
        ),
        "{missing}"
    );
}

#[test]
fn lanes_and_source_addresses() {
    let transactional: std::net::IpAddr = "192.0.2.10".parse().unwrap();
    let bulk: std::net::IpAddr = "192.0.2.21".parse().unwrap();
    for policy in policies() {
        let clinic_transactional = policy.for_domain("clinic.example", Lane::Transactional);
        assert_eq!(clinic_transactional.rule_id, 11);
        assert!(clinic_transactional.lane_allowed);
        assert_eq!(
            &*clinic_transactional.settings().source_addresses,
            &[transactional]
        );

        let clinic_bulk = policy.for_domain("clinic.example", Lane::Bulk);
        assert!(!clinic_bulk.lane_allowed);
        assert!(!clinic_bulk.settings().lane_allowed);

        let portal_transactional = policy.for_domain("portal.example", Lane::Transactional);
        assert!(portal_transactional.lane_allowed);
        assert_eq!(
            &*portal_transactional.settings().source_addresses,
            &[transactional]
        );
        let portal_bulk = policy.for_domain("portal.example", Lane::Bulk);
        assert!(portal_bulk.lane_allowed);
        assert_eq!(&*portal_bulk.settings().source_addresses, &[bulk]);

        let defaults = policy.for_domain("unrelated.example", Lane::Bulk);
        assert!(defaults.lane_allowed);
        assert!(defaults.settings().source_addresses.is_empty());
    }
}

#[test]
fn explain_lane_barred_rule() {
    let policy = policy();
    let text = policy
        .explain("frontdesk@clinic.example", Lane::Bulk)
        .expect("explained");
    assert!(
        text.contains(
            "the bulk lane may not send here, so recipients get 550 5.7.1 at RCPT (rule[11])"
        ),
        "{text}"
    );

    let text = policy
        .explain("frontdesk@clinic.example", Lane::Transactional)
        .expect("explained");
    assert!(
        text.contains("source_addresses = [192.0.2.10] (rule[11]"),
        "{text}"
    );
}

#[test]
fn sender_category_for_u_label_sender() {
    // A sender such as x@news.bücher.example, accepted with SMTPUTF8,
    // reached the lookup as a lowercase U-label and matched no rule, so
    // mail that a rule forces to care was checked as marketing at RCPT.
    let policy = Policy::compile(
        &parse_config(
            "[[rule]]\ndomain = \"*.bücher.example\"\nsender_category = \"care\"\n",
            "caduceus.toml",
        )
        .expect("config"),
    )
    .expect("compile");
    for sender_domain in [
        "news.bücher.example",
        "news.xn--bcher-kva.example",
        "NEWS.BÜCHER.example",
    ] {
        assert_eq!(
            policy.sender_category(sender_domain),
            Some(Category::Care),
            "{sender_domain}"
        );
    }
    assert_eq!(policy.sender_category("bücher.example"), None);
    assert_eq!(policy.sender_category("news.b\u{fc}cher..example"), None);
}

#[test]
fn explain_address_literal() {
    let policy = policy();
    let text = policy
        .explain("postmaster@[127.0.0.1]", Lane::Bulk)
        .expect("explained");
    assert!(
        text.contains("[127.0.0.1] (an address literal, which no domain rule matches)"),
        "{text}"
    );
    assert!(
        text.contains("no domain rule, so the defaults apply"),
        "{text}"
    );
}
