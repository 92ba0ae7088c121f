//! Config errors point at `file:line:column` and name the value and the fix.

use caduceus_policy::{ConfigError, Location, parse_config};

fn error_for(text: &str) -> ConfigError {
    match parse_config(text, "caduceus.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(error) => error,
    }
}

/// Asserts that the error points at `line:column` and mentions each fragment.
fn assert_error(text: &str, line: usize, column: usize, fragments: &[&str]) {
    let error = error_for(text);
    let message = error.to_string();
    assert_eq!(
        error.location(),
        Some(Location { line, column }),
        "wrong location in: {message}"
    );
    let prefix = format!("caduceus.toml:{line}:{column}: ");
    assert!(message.starts_with(&prefix), "{message}");
    for fragment in fragments {
        assert!(
            message.contains(fragment),
            "{fragment:?} missing from: {message}"
        );
    }
}

#[test]
fn empty_file_is_valid() {
    parse_config("", "empty.toml").unwrap();
}

#[test]
fn unknown_key() {
    assert_error(
        "hostname = \"mta.example.com\"\n\n[delivery]\nconect_timeout = \"10s\"\n",
        4,
        1,
        &["conect_timeout", "connect_timeout"],
    );
}

#[test]
fn bad_duration() {
    assert_error(
        "[dns]\ntimeout = \"5 seconds\"\n",
        2,
        11,
        &["\"5 seconds\"", "\"30s\""],
    );
}

#[test]
fn duration_without_unit() {
    assert_error("[dns]\ntimeout = 5\n", 2, 11, &["5", "unit"]);
}

#[test]
fn zero_duration() {
    assert_error(
        "[delivery]\nconnect_timeout = \"0s\"\n",
        2,
        19,
        &["delivery.connect_timeout", "longer than zero"],
    );
}

#[test]
fn overlapping_cores() {
    assert_error(
        "[lanes.transactional]\ncores = [0]\n\n[lanes.bulk]\ncores = [1, 0]\n",
        5,
        13,
        &[
            "lanes.bulk.cores[1]",
            "lanes.transactional.cores",
            "lanes.bulk.cores",
            "CPU 0",
        ],
    );
}

#[test]
fn core_beyond_machine() {
    assert_error(
        "[lanes.bulk]\ncores = [100000]\n",
        2,
        10,
        &["CPU 100000 does not exist", "online CPUs"],
    );
}

#[test]
fn rule_with_domain_and_mx() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\n\n[[rule]]\ndomain = \"example.org\"\nmx = \"*.mx.example.net\"\n",
        6,
        6,
        &["rule[1].mx", "not both", "split"],
    );
}

#[test]
fn rule_with_neither_domain_nor_mx() {
    let error = error_for("[[rule]]\ntls = \"verified\"\n");
    let message = error.to_string();
    assert!(message.contains("rule[0]"), "{message}");
    assert!(message.contains("neither `domain` nor `mx`"), "{message}");
    let location = error.location().expect("points into the rule");
    assert!(location.line <= 2, "{message}");
}

#[test]
fn duplicate_rule_by_u_label_and_a_label() {
    assert_error(
        "[[rule]]\ndomain = \"bücher.example\"\n\n[[rule]]\ndomain = \"xn--bcher-kva.example\"\n",
        5,
        10,
        &[
            "rule[0] already matches domain xn--bcher-kva.example",
            "merge",
        ],
    );
}

#[test]
fn wildcard_and_exact_are_not_duplicates() {
    parse_config(
        "[[rule]]\ndomain = \"example.com\"\n[[rule]]\ndomain = \"*.example.com\"\n",
        "caduceus.toml",
    )
    .unwrap();
}

#[test]
fn bad_routes() {
    for route in [
        "relay.example.net",
        "relay.example.net:0",
        "relay.example.net:smtp",
        "2001:db8::1:25",
        "[2001:db8::1]",
        "under_score.example:25",
        ":25",
    ] {
        let text = format!("[[rule]]\ndomain = \"example.com\"\nroute = \"{route}\"\n");
        let error = error_for(&text);
        assert_eq!(
            error.location(),
            Some(Location { line: 3, column: 9 }),
            "{error}"
        );
        assert!(error.to_string().contains("HOST:PORT"), "{error}");
    }
}

#[test]
fn good_routes() {
    for route in [
        "relay.example.net:25",
        "192.0.2.25:2525",
        "[2001:db8::25]:25",
        "Relay.Bücher.example:587",
    ] {
        let text = format!("[[rule]]\ndomain = \"example.com\"\nroute = \"{route}\"\n");
        parse_config(&text, "caduceus.toml").unwrap();
    }
}

#[test]
fn non_positive_rate() {
    for rate in ["0", "-1.5", "nan", "inf"] {
        let text = format!("[[rule]]\ndomain = \"example.com\"\nrate = {rate}\n");
        let error = error_for(&text);
        assert_eq!(
            error.location(),
            Some(Location { line: 3, column: 8 }),
            "{error}"
        );
        assert!(error.to_string().contains("messages per second"), "{error}");
    }
}

#[test]
fn burst_without_rate() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\nburst = 5\n",
        3,
        9,
        &["rule[0].burst", "without `rate`"],
    );
}

#[test]
fn source_rate_without_addresses() {
    assert_error(
        "[lanes.bulk]\nsource_rate = 50.0\n",
        1,
        1,
        &["lanes.bulk.source_addresses", "source_rate"],
    );
}

#[test]
fn source_max_connections_zero() {
    assert_error(
        "[lanes.bulk]\nsource_addresses = [\"192.0.2.1\"]\nsource_max_connections = 0\n",
        3,
        26,
        &["lanes.bulk.source_max_connections", "at least 1"],
    );
}

#[test]
fn socket_mode_not_octal() {
    for mode in ["0668", "rw-rw----", "66", "04755", "0o660"] {
        let text = format!("[lanes.bulk]\nsocket_mode = \"{mode}\"\n");
        let error = error_for(&text);
        assert_eq!(
            error.location(),
            Some(Location {
                line: 2,
                column: 15
            }),
            "{error}"
        );
        assert!(
            error.to_string().contains("lanes.bulk.socket_mode"),
            "{error}"
        );
    }
}

#[test]
fn empty_retry_schedule() {
    assert_error(
        "[lanes.transactional]\nretry_schedule = []\n",
        2,
        18,
        &["lanes.transactional.retry_schedule", "at least one delay"],
    );
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\nretry_schedule = []\n",
        3,
        18,
        &["rule[0].retry_schedule"],
    );
}

#[test]
fn zero_retry_delay() {
    assert_error(
        "[lanes.bulk]\nretry_schedule = [\"5m\", \"0s\"]\n",
        2,
        25,
        &["lanes.bulk.retry_schedule[1]"],
    );
}

#[test]
fn invalid_hostname() {
    for hostname in [
        "mta_1.example.com",
        "mta..example.com",
        "-mta.example.com",
        "mtä.example.com",
        "",
    ] {
        let text = format!("hostname = \"{hostname}\"\n");
        let error = error_for(&text);
        assert_eq!(
            error.location(),
            Some(Location {
                line: 1,
                column: 12
            }),
            "{error}"
        );
        assert!(
            error.to_string().contains("not a valid host name"),
            "{error}"
        );
    }
}

#[test]
fn invalid_rule_domain() {
    assert_error(
        "[[rule]]\ndomain = \"exa mple.com\"\n",
        2,
        10,
        &["rule[0].domain", "\"exa mple.com\""],
    );
    assert_error("[[rule]]\nmx = \"mx.*.example\"\n", 2, 6, &["wildcard"]);
}

#[test]
fn sender_category_on_mx_rule() {
    assert_error(
        "[[rule]]\nmx = \"*.mx.example.net\"\nsender_category = \"care\"\n",
        3,
        19,
        &["rule[0].sender_category", "domain"],
    );
}

#[test]
fn zero_connections_suggests_hold() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\nmax_connections = 0\n",
        3,
        19,
        &["hold = true"],
    );
}

#[test]
fn bad_nameserver() {
    assert_error(
        "[dns]\nnameservers = [\"192.0.2.53\", \"ns1.example\"]\n",
        2,
        30,
        &["dns.nameservers[1]", "\"ns1.example\""],
    );
}

#[test]
fn short_line_limit() {
    assert_error(
        "[ingress]\nmax_line_length_bytes = 512\n",
        2,
        25,
        &["RFC 5321", "1000"],
    );
}

#[test]
fn syntax_error_has_location() {
    let error = error_for("[delivery\nsmtp_port = 25\n");
    assert_eq!(
        error.location().map(|location| location.line),
        Some(1),
        "{error}"
    );
}

#[test]
fn unknown_tls_mode() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\ntls = \"strict\"\n",
        3,
        7,
        &["strict", "verified"],
    );
}

#[test]
fn first_error_in_file_order() {
    let text = "[dns]\nattempts = 0\n\n[delivery]\nmax_concurrent_deliveries = 0\n";
    let error = error_for(text);
    assert_eq!(
        error.location(),
        Some(Location {
            line: 2,
            column: 12
        }),
        "{error}"
    );
}

#[test]
fn load_config_reads_file_and_names_missing_file() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("caduceus.toml");
    std::fs::write(&path, "state_dir = \"state\"\n").unwrap();
    let config = caduceus_policy::load_config(&path).unwrap();
    assert_eq!(config.state_dir, directory.path().join("state"));

    std::fs::write(&path, "[dns]\nattempts = 0\n").unwrap();
    let error = caduceus_policy::load_config(&path).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}:2:12: ", path.display())),
        "{error}"
    );

    let missing = directory.path().join("missing.toml");
    let error = caduceus_policy::load_config(&missing).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }));
    assert!(error.to_string().contains("missing.toml"), "{error}");
}

#[test]
fn wrong_type_names_its_key() {
    assert_error(
        "[lanes.bulk]\ncores = [-1]\n",
        2,
        10,
        &["lanes.bulk.cores[0]", "a whole number", "docs/policy.md"],
    );
    assert_error("state_dir = 5\n", 1, 13, &["state_dir", "integer `5`"]);
    assert_error(
        "[[rule]]\ndomain = \"a.example\"\n\n[[rule]]\ndomain = \"b.example\"\nrate = \"fast\"\n",
        6,
        8,
        &["rule[1].rate", "expected a number"],
    );
}

#[test]
fn small_segment_lowers_message_size() {
    let config = parse_config(
        "[ingress]\nmax_message_size_bytes = 52428800\n\n[spool]\nsegment_size_bytes = 1048576\n",
        "caduceus.toml",
    )
    .unwrap();
    assert_eq!(config.effective_max_message_size_bytes(), 1048576 - 65536);
    let warning = config.message_size_warning().expect("a warning");
    assert!(warning.contains("SIZE 983040"), "{warning}");
    assert!(warning.contains("at least 52494336"), "{warning}");
}

#[test]
fn default_segment_keeps_message_size() {
    let config = parse_config("", "caduceus.toml").unwrap();
    assert_eq!(
        config.effective_max_message_size_bytes(),
        config.ingress.max_message_size_bytes
    );
    assert_eq!(config.message_size_warning(), None);
}

/// No message fits in a segment no larger than the 64 KiB envelope
/// headroom, and EHLO would advertise SIZE 0, which means no fixed limit.
#[test]
fn segment_without_message_room_rejected() {
    for size in ["1", "4096", "65536"] {
        assert_error(
            &format!("[spool]\nsegment_size_bytes = {size}\n"),
            2,
            22,
            &["spool.segment_size_bytes", "leaves no room for a message"],
        );
    }
    let config = parse_config("[spool]\nsegment_size_bytes = 65537\n", "caduceus.toml").unwrap();
    assert_eq!(config.effective_max_message_size_bytes(), 1);
}

const LANE_POOLS: &str = "[lanes.transactional]\nsource_addresses = [\"192.0.2.10\"]\n\n[lanes.bulk]\nsource_addresses = [\"192.0.2.20\"]\n\n";

#[test]
fn rule_lanes_on_mx_rule() {
    assert_error(
        "[[rule]]\nmx = \"*.mx.example.net\"\nlanes = [\"bulk\"]\n",
        3,
        9,
        &["lanes", "needs `domain`, not `mx`"],
    );
}

#[test]
fn rule_lanes_empty() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\nlanes = []\n",
        3,
        9,
        &["is empty", "hold = true"],
    );
}

#[test]
fn rule_lanes_unknown_lane() {
    assert_error(
        "[[rule]]\ndomain = \"example.com\"\nlanes = [\"marketing\"]\n",
        3,
        10,
        &["marketing", "transactional", "bulk"],
    );
}

#[test]
fn rule_source_address_in_no_lane() {
    let text = format!(
        "{LANE_POOLS}[[rule]]\ndomain = \"example.com\"\nsource_addresses = [\"192.0.2.10\", \"192.0.2.99\", \"192.0.2.20\"]\n"
    );
    assert_error(
        &text,
        9,
        35,
        &["192.0.2.99", "in the source_addresses of no lane"],
    );
}

#[test]
fn rule_source_addresses_miss_lane_pool() {
    let text = format!(
        "{LANE_POOLS}[[rule]]\ndomain = \"example.com\"\nsource_addresses = [\"192.0.2.10\"]\n"
    );
    assert_error(
        &text,
        9,
        20,
        &["lanes.bulk.source_addresses", "set lanes to leave out bulk"],
    );
}

#[test]
fn rule_source_addresses_for_allowed_lane() {
    // A rule limited to the transactional lane needs no bulk address.
    let text = format!(
        "{LANE_POOLS}[[rule]]\ndomain = \"example.com\"\nlanes = [\"transactional\"]\nsource_addresses = [\"192.0.2.10\"]\n"
    );
    parse_config(&text, "caduceus.toml").unwrap();
}

#[test]
fn syntax_error_is_one_line() {
    // The TOML parser's message spans several lines, and in the engine's
    // log the second line became a record of its own.
    let error = error_for("[[rule]\ndomain = \"x.example\"\n");
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message:?}");
    assert!(message.starts_with("caduceus.toml:1:7: "), "{message}");
    assert!(message.contains("invalid table header"), "{message}");
    assert!(message.contains("expected `.`, `]]`"), "{message}");
    assert!(message.contains("correct the TOML syntax"), "{message}");
}

#[test]
fn invalid_source_address_names_value() {
    assert_error(
        "[lanes.bulk]\nsource_addresses = [\"127.0.0.2\", \"127.0.0.300\"]\n",
        2,
        34,
        &["\"127.0.0.300\"", "IP address", "192.0.2.10"],
    );
    assert_error(
        "[lanes.bulk]\nsource_addresses = [\"127.0.0.2\"]\n\n[[rule]]\ndomain = \"a.example\"\nlanes = [\"bulk\"]\nsource_addresses = [\"localhost\"]\n",
        7,
        21,
        &["\"localhost\"", "IP address"],
    );
}

#[test]
fn out_of_range_integer_names_range() {
    assert_error(
        "[[rule]]\ndomain = \"a.example\"\nmax_connections = 99999999999\n",
        3,
        19,
        &["99999999999", "0 to 4294967295"],
    );
}

#[test]
fn rule_domain_is_ip_address() {
    assert_error(
        "[[rule]]\ndomain = \"127.0.0.1\"\n",
        2,
        10,
        &["127.0.0.1", "all-numeric label", "route = \"IP:PORT\""],
    );
}

#[test]
fn lane_source_address_twice() {
    assert_error(
        "[lanes.bulk]\nsource_addresses = [\"192.0.2.20\", \"192.0.2.20\"]\n",
        2,
        35,
        &["192.0.2.20", "twice"],
    );
}
