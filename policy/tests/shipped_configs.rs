//! The example and embedded default configs parse, validate and compile.

use caduceus_policy::{Category, DEFAULT_RULE_ID, Lane, Policy, TlsMode, parse_config};

const EXAMPLE: &str = include_str!("../../docs/caduceus.example.toml");
const DEMO_DEFAULT: &str = include_str!("../../engine/src/default-config.toml");

#[test]
fn example_config_parses_and_compiles() {
    let config = parse_config(EXAMPLE, "docs/caduceus.example.toml").unwrap();
    assert_eq!(config.hostname, "mta.example-health.org");
    let policy = Policy::compile(&config).unwrap();
    assert_eq!(
        policy
            .for_domain("north.example-health.org", Lane::Transactional)
            .tls,
        TlsMode::Verified
    );
    assert!(
        policy
            .for_domain("example-health.org", Lane::Bulk)
            .route()
            .is_some()
    );
    assert_eq!(
        policy.sender_category("reminders.example-health.org"),
        Some(Category::Care)
    );
    assert_eq!(policy.for_domain("gmail.com", Lane::Bulk).burst, 40);
    assert!(
        policy
            .for_mx_host("contoso.mail.protection.outlook.com", Lane::Bulk)
            .is_some()
    );
    assert_eq!(
        policy.for_domain("example.com", Lane::Bulk).rule_id,
        DEFAULT_RULE_ID
    );
}

#[test]
fn demo_default_config_parses_and_compiles() {
    let config = parse_config(DEMO_DEFAULT, "engine/src/default-config.toml").unwrap();
    assert_eq!(config.hostname, "localhost");
    assert!(config.rules.is_empty());
    assert!(config.lanes.transactional.cores.is_empty());
    assert!(config.lanes.bulk.cores.is_empty());
    Policy::compile(&config).unwrap();
}
