//! Keyring file parsing and message id text forms.

use std::path::Path;

use caduceus_spool::{KeyError, Keyring, MessageId};

const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

fn parse(text: &str) -> Result<Keyring, KeyError> {
    Keyring::parse(Path::new("test.keys"), text)
}

#[test]
fn keyring_parses_keys_and_comments() {
    let keyring = parse(&format!(
        "# spool keys\nkey 1 {KEY_A}\n\nkey 7 {KEY_B}  # rotated\nactive 7\n"
    ))
    .unwrap();
    assert_eq!(keyring.key_ids(), vec![1, 7]);
    assert_eq!(keyring.active_id(), 7);
}

#[test]
fn keyring_rejects_malformed_lines() {
    let cases = [
        (format!("key 1 {KEY_A}\n"), "missing `active"),
        (format!("key 1 {KEY_A}\nactive 2\n"), "no key with id 2"),
        (
            format!("key 1 {KEY_A}\nkey 1 {KEY_B}\nactive 1\n"),
            "appears twice",
        ),
        (format!("key 0 {KEY_A}\nactive 0\n"), "invalid key id"),
        (
            "key 1 abcd\nactive 1\n".to_string(),
            "expected 64 hex digits",
        ),
        (format!("key 1 {}zz\nactive 1\n", &KEY_A[..62]), "key 1"),
        (
            format!("key 1 {KEY_A}\nactive 1\nactive 1\n"),
            "more than one active",
        ),
        (
            format!("key 1 {KEY_A}\nwrapped 2 kms arn\nactive 1\n"),
            "not supported",
        ),
        (
            format!("key 1 {KEY_A}\nsecret 2\nactive 1\n"),
            "expected `key",
        ),
    ];
    for (text, expected) in cases {
        let error = parse(&text)
            .err()
            .unwrap_or_else(|| panic!("accepted {text:?}"))
            .to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn keyring_debug_hides_keys() {
    let keyring = Keyring::from_hex(3, KEY_A).unwrap();
    let debug_output = format!("{keyring:?}");
    assert!(!debug_output.contains(&KEY_A[..16]), "{debug_output}");
    assert!(debug_output.contains("active: 3"), "{debug_output}");
}

#[test]
fn keyring_from_hex_rejects_bad_input() {
    assert!(Keyring::from_hex(0, KEY_A).is_err());
    assert!(Keyring::from_hex(1, &KEY_A[..60]).is_err());
    assert!(Keyring::from_hex(1, &KEY_A.replace('0', "g")).is_err());
    assert!(Keyring::from_hex(1, &format!(" {KEY_A}\n")).is_ok());
}

#[test]
fn keyring_rotation_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.keys");
    let mut keyring = Keyring::load_or_create(&path).unwrap();
    assert_eq!(keyring.rotate().unwrap(), 2);
    assert_eq!(keyring.rotate().unwrap(), 3);
    keyring.save(&path).unwrap();
    let reloaded = Keyring::load_or_create(&path).unwrap();
    assert_eq!(reloaded.key_ids(), vec![1, 2, 3]);
    assert_eq!(reloaded.active_id(), 3);
}

#[test]
fn message_id_text_round_trip() {
    let id = MessageId([0xab; 16]);
    assert_eq!(id.to_string(), "ab".repeat(16));
    assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
    for bad in [
        "",
        "ab",
        &"ab".repeat(17),
        &"zz".repeat(16),
        &"é".repeat(16),
    ] {
        assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
    }
    assert_ne!(MessageId::random(), MessageId::random());
}
