//! Resolver tests against the mock DNS server over real loopback sockets.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use caduceus_policy::config::DnsConfig;
use caduceus_policy::duration::ConfigDuration;
use glommio::LocalExecutorBuilder;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::mock_server::{Behavior, MockDnsServer, MockReply, a, aaaa, cname, mx, soa, with_ttl};
use super::*;
use crate::smtp::EnhancedStatus;

fn run<T>(future: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .make()
        .expect("a glommio executor starts")
        .run(future)
}

fn config(servers: &[&MockDnsServer], timeout_ms: u64, attempts: u32) -> DnsConfig {
    DnsConfig {
        nameservers: servers
            .iter()
            .map(|server| server.address().to_string())
            .collect(),
        timeout: ConfigDuration(Duration::from_millis(timeout_ms)),
        attempts,
        ..DnsConfig::default()
    }
}

fn resolver(server: &MockDnsServer) -> Resolver {
    Resolver::new(&config(&[server], 1000, 1)).expect("valid resolver config")
}

fn socket_address(text: &str) -> SocketAddr {
    text.parse().expect("valid socket address")
}

fn v4(text: &str) -> Ipv4Addr {
    text.parse().expect("valid IPv4 address")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid IP address")
}

// --- Construction and configuration ---

#[test]
fn new_accepts_nameserver_with_port() {
    let config = DnsConfig {
        nameservers: vec!["127.0.0.1:5353".into(), "::1".into()],
        ..DnsConfig::default()
    };
    let resolver = Resolver::new(&config).unwrap();
    assert_eq!(
        resolver.nameservers(),
        [socket_address("127.0.0.1:5353"), socket_address("[::1]:53")]
    );
    assert_eq!(resolver.timeout(), Duration::from_secs(5));
    assert_eq!(resolver.attempts(), 2);
}

#[test]
fn new_rejects_bad_nameserver() {
    let config = DnsConfig {
        nameservers: vec!["resolver.example.net".into()],
        ..DnsConfig::default()
    };
    let error = Resolver::new(&config)
        .err()
        .expect("a host name is rejected");
    assert!(matches!(error, ResolverError::InvalidNameserver { .. }));
    assert!(error.to_string().contains("\"resolver.example.net\""));
}

#[test]
fn new_rejects_zero_timeout_and_attempts() {
    let mut config = DnsConfig {
        nameservers: vec!["127.0.0.1".into()],
        ..DnsConfig::default()
    };
    config.attempts = 0;
    assert!(matches!(
        Resolver::new(&config),
        Err(ResolverError::ZeroAttempts)
    ));
    config.attempts = 1;
    config.timeout = ConfigDuration(Duration::ZERO);
    assert!(matches!(
        Resolver::new(&config),
        Err(ResolverError::ZeroTimeout)
    ));
}

#[test]
fn new_reads_resolv_conf_when_unconfigured() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("resolv.conf");
    std::fs::write(
        &path,
        "search example.com\nnameserver 192.0.2.1\noptions timeout:2 attempts:3\n",
    )
    .unwrap();
    let resolver = Resolver::with_resolv_conf(&DnsConfig::default(), &path).unwrap();
    assert_eq!(resolver.nameservers(), [socket_address("192.0.2.1:53")]);
    assert_eq!(resolver.timeout(), Duration::from_secs(2));
    assert_eq!(resolver.attempts(), 3);
}

#[test]
fn new_configured_nameservers_skip_resolv_conf() {
    let config = DnsConfig {
        nameservers: vec!["127.0.0.1:5353".into()],
        ..DnsConfig::default()
    };
    let missing = Path::new("/nonexistent/resolv.conf");
    let resolver = Resolver::with_resolv_conf(&config, missing).unwrap();
    assert_eq!(resolver.nameservers(), [socket_address("127.0.0.1:5353")]);
}

#[test]
fn new_resolv_conf_missing_or_empty() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.conf");
    let error = Resolver::with_resolv_conf(&DnsConfig::default(), &missing)
        .err()
        .expect("a missing file is an error");
    assert!(matches!(error, ResolverError::ResolvConfUnreadable { .. }));
    assert!(error.to_string().contains("dns.nameservers"));

    let empty = directory.path().join("empty.conf");
    std::fs::write(&empty, "search example.com\n").unwrap();
    let error = Resolver::with_resolv_conf(&DnsConfig::default(), &empty)
        .err()
        .expect("a file without nameservers is an error");
    assert!(matches!(error, ResolverError::NoNameservers { .. }));
}

// --- MX ordering and addresses ---

#[test]
fn mx_sorted_with_ipv4_first() {
    let server = MockDnsServer::start();
    server.reply(
        "sorted.example.net",
        RecordType::MX,
        MockReply::records(vec![
            mx("sorted.example.net", 20, "mx2.sorted.example.net"),
            mx("sorted.example.net", 10, "mx1.sorted.example.net"),
        ]),
    );
    for host in ["mx1", "mx2"] {
        let name = format!("{host}.sorted.example.net");
        let last = if host == "mx1" { 1 } else { 2 };
        server.reply(
            &name,
            RecordType::A,
            MockReply::records(vec![a(&name, v4(&format!("192.0.2.{last}")))]),
        );
        server.reply(
            &name,
            RecordType::AAAA,
            MockReply::records(vec![aaaa(
                &name,
                format!("2001:db8::{last}").parse().unwrap(),
            )]),
        );
    }
    let resolver = resolver(&server);

    let targets = run(resolver.resolve_mx("sorted.example.net")).unwrap();

    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0].host, "mx1.sorted.example.net");
    assert_eq!(targets[0].preference, 10);
    assert_eq!(
        targets[0].addrs,
        Ok(vec![ip("192.0.2.1"), ip("2001:db8::1")])
    );
    assert_eq!(targets[1].host, "mx2.sorted.example.net");
    assert_eq!(targets[1].preference, 20);
    assert_eq!(
        targets[1].addrs,
        Ok(vec![ip("192.0.2.2"), ip("2001:db8::2")])
    );
}

#[test]
fn mx_equal_preference_order_varies() {
    let server = MockDnsServer::start();
    server.reply(
        "equal.example.net",
        RecordType::MX,
        MockReply::records(vec![
            mx("equal.example.net", 10, "a.equal.example.net"),
            mx("equal.example.net", 10, "b.equal.example.net"),
            mx("equal.example.net", 5, "first.equal.example.net"),
        ]),
    );
    for host in ["a", "b", "first"] {
        let name = format!("{host}.equal.example.net");
        server.reply(
            &name,
            RecordType::A,
            MockReply::records(vec![a(&name, v4("192.0.2.9"))]),
        );
        server.reply(
            &name,
            RecordType::AAAA,
            MockReply::nodata("equal.example.net"),
        );
    }
    let resolver = resolver(&server);

    let mut a_first = 0;
    let mut b_first = 0;
    run(async {
        for _ in 0..64 {
            let targets = resolver.resolve_mx("equal.example.net").await.unwrap();
            assert_eq!(targets[0].host, "first.equal.example.net");
            match targets[1].host.as_str() {
                "a.equal.example.net" => a_first += 1,
                "b.equal.example.net" => b_first += 1,
                other => panic!("unexpected second target {other}"),
            }
        }
    });

    // Each order has probability 1/2, so both appear in 64 runs except
    // with probability 2^-63.
    assert!(a_first > 0, "a never came first");
    assert!(b_first > 0, "b never came first");
    // The answers were cached after the first call.
    assert_eq!(server.count("equal.example.net", RecordType::MX), 1);
}

#[test]
fn mx_duplicates_and_cap() {
    let server = MockDnsServer::start();
    let mut records = vec![mx("many.example.net", 1, "mx0.many.example.net")];
    for index in 0..15u16 {
        records.push(mx(
            "many.example.net",
            index + 2,
            &format!("mx{index}.many.example.net"),
        ));
    }
    server.reply(
        "many.example.net",
        RecordType::MX,
        MockReply::records(records),
    );
    for index in 0..15 {
        let name = format!("mx{index}.many.example.net");
        server.reply(
            &name,
            RecordType::A,
            MockReply::records(vec![a(&name, v4("192.0.2.7"))]),
        );
        server.reply(
            &name,
            RecordType::AAAA,
            MockReply::nodata("many.example.net"),
        );
    }
    let resolver = resolver(&server);

    let targets = run(resolver.resolve_mx("many.example.net")).unwrap();

    assert_eq!(targets.len(), MAX_MX_TARGETS);
    assert_eq!(targets[0].host, "mx0.many.example.net");
    assert_eq!(targets[0].preference, 1);
    assert_eq!(targets[1].host, "mx1.many.example.net");
    // Hosts past the cap are never looked up.
    assert_eq!(server.count("mx14.many.example.net", RecordType::A), 0);
}

// --- Null MX (RFC 7505) ---

#[test]
fn null_mx_fails_without_address_lookup() {
    let server = MockDnsServer::start();
    server.reply(
        "nomail.example.net",
        RecordType::MX,
        MockReply::records(vec![mx("nomail.example.net", 0, ".")]),
    );
    server.reply(
        "nomail.example.net",
        RecordType::A,
        MockReply::records(vec![a("nomail.example.net", v4("192.0.2.80"))]),
    );
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("nomail.example.net")).unwrap_err();
    assert_eq!(error, DnsError::NullMx);
    assert!(error.is_permanent());
    assert_eq!(error.status(), EnhancedStatus::new(5, 1, 10));
    let reply = error.reply("nomail.example.net");
    assert_eq!(reply.code, 556);
    assert!(reply.to_diagnostic().contains("nomail.example.net"));
    let log = server.log();
    assert_eq!(log.len(), 1, "only the MX query is sent: {log:?}");
    assert_eq!(log[0].qtype, RecordType::MX);
}

#[test]
fn null_mx_mixed_with_real_mx() {
    let server = MockDnsServer::start();
    server.reply(
        "mixed.example.net",
        RecordType::MX,
        MockReply::records(vec![
            mx("mixed.example.net", 0, "."),
            mx("mixed.example.net", 10, "mx.mixed.example.net"),
        ]),
    );
    server.reply(
        "mx.mixed.example.net",
        RecordType::A,
        MockReply::records(vec![a("mx.mixed.example.net", v4("192.0.2.81"))]),
    );
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("mixed.example.net")).unwrap_err();
    assert_eq!(error, DnsError::NullMx);
    let log = server.log();
    assert_eq!(
        log.len(),
        1,
        "neither the root nor the real MX is looked up: {log:?}"
    );
    assert!(log.iter().all(|query| !query.name.is_empty()));
}

// --- MX target written like an IP address ---

#[test]
fn mx_target_like_ip_is_a_name() {
    let server = MockDnsServer::start();
    server.reply(
        "iplit.example.net",
        RecordType::MX,
        MockReply::records(vec![mx("iplit.example.net", 10, "192.0.2.10")]),
    );
    // "10" is no top-level domain, so the name does not exist.
    server.reply("192.0.2.10", RecordType::A, MockReply::nxdomain("."));
    server.reply("192.0.2.10", RecordType::AAAA, MockReply::nxdomain("."));
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("iplit.example.net")).unwrap_err();
    assert_eq!(
        error,
        DnsError::NoUsableMx {
            hosts: vec!["192.0.2.10".to_string()]
        }
    );
    assert!(error.is_permanent());
    assert_eq!(error.status(), EnhancedStatus::new(5, 4, 4));
    let diagnostic = error.reply("iplit.example.net").to_diagnostic();
    assert!(
        diagnostic.contains("192.0.2.10"),
        "{diagnostic} names the bad MX"
    );
    assert!(diagnostic.contains("iplit.example.net"));
    assert_eq!(server.count("192.0.2.10", RecordType::A), 1);
    assert_eq!(server.count("192.0.2.10", RecordType::AAAA), 1);
}

#[test]
fn resolve_host_never_parses_ip() {
    let server = MockDnsServer::start();
    server.reply("192.0.2.10", RecordType::A, MockReply::nxdomain("."));
    server.reply("192.0.2.10", RecordType::AAAA, MockReply::nxdomain("."));
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("192.0.2.10")),
        Err(DnsError::NxDomain)
    );
}

// --- NXDOMAIN, NODATA, SERVFAIL and timeouts ---

#[test]
fn nxdomain_is_permanent() {
    let server = MockDnsServer::start();
    server.reply(
        "nx.example.net",
        RecordType::MX,
        MockReply::nxdomain("example.net"),
    );
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("nx.example.net")).unwrap_err();
    assert_eq!(error, DnsError::NxDomain);
    assert!(error.is_permanent());
    assert_eq!(error.status(), EnhancedStatus::new(5, 1, 2));
    assert_eq!(error.reply("nx.example.net").code, 550);
}

#[test]
fn nodata_uses_implicit_mx() {
    let server = MockDnsServer::start();
    server.reply(
        "nodata.example.net",
        RecordType::MX,
        MockReply::nodata("example.net"),
    );
    server.reply(
        "nodata.example.net",
        RecordType::A,
        MockReply::records(vec![a("nodata.example.net", v4("192.0.2.30"))]),
    );
    server.reply(
        "nodata.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    let targets = run(resolver.resolve_mx("nodata.example.net")).unwrap();
    assert_eq!(
        targets,
        vec![MxTarget {
            host: "nodata.example.net".to_string(),
            preference: 0,
            addrs: Ok(vec![ip("192.0.2.30")]),
        }]
    );
}

#[test]
fn empty_domain_has_no_addresses() {
    let server = MockDnsServer::start();
    for qtype in [RecordType::MX, RecordType::A, RecordType::AAAA] {
        server.reply("empty.example.net", qtype, MockReply::nodata("example.net"));
    }
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("empty.example.net")).unwrap_err();
    assert_eq!(error, DnsError::NoAddresses);
    assert!(error.is_permanent());
    assert_eq!(error.status(), EnhancedStatus::new(5, 1, 2));
}

#[test]
fn servfail_is_temporary() {
    let server = MockDnsServer::start();
    server.reply(
        "servfail.example.net",
        RecordType::MX,
        MockReply::code(ResponseCode::ServFail),
    );
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("servfail.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    assert!(!error.is_permanent());
    assert_eq!(error.status(), EnhancedStatus::new(4, 4, 3));
    let reply = error.reply("servfail.example.net");
    assert_eq!(reply.code, 451);
    // The reply goes to the sender, so it names no nameserver.
    let diagnostic = reply.to_diagnostic();
    assert!(!diagnostic.contains("127.0.0.1"), "{diagnostic}");
    // A temporary failure is never cached.
    let again = run(resolver.resolve_mx("servfail.example.net")).unwrap_err();
    assert!(matches!(again, DnsError::Temporary(_)));
    assert_eq!(server.count("servfail.example.net", RecordType::MX), 2);
}

#[test]
fn refused_is_temporary() {
    let server = MockDnsServer::start();
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("unlisted.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
}

#[test]
fn timeout_is_temporary_and_bounded() {
    let first = MockDnsServer::start();
    let second = MockDnsServer::start();
    for server in [&first, &second] {
        server.set("timeout.example.net", RecordType::MX, Behavior::Silent);
    }
    let timeout_ms = 150;
    let resolver = Resolver::new(&config(&[&first, &second], timeout_ms, 2)).unwrap();
    let started = Instant::now();
    let error = run(resolver.resolve_mx("timeout.example.net")).unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    // attempts × servers × timeout = 2 × 2 × 150 ms = 600 ms, plus a
    // tolerance of 400 ms for a loaded test machine.
    let bound = Duration::from_millis(4 * timeout_ms);
    assert!(
        elapsed >= bound,
        "gave up after {elapsed:?}, before {bound:?}"
    );
    assert!(
        elapsed < bound + Duration::from_millis(400),
        "took {elapsed:?}, bound {bound:?}"
    );
    assert_eq!(first.count("timeout.example.net", RecordType::MX), 2);
    assert_eq!(second.count("timeout.example.net", RecordType::MX), 2);
}

#[test]
fn mx_target_servfail_is_temporary() {
    let server = MockDnsServer::start();
    server.reply(
        "mxok.example.net",
        RecordType::MX,
        MockReply::records(vec![mx("mxok.example.net", 10, "mx.mxok.example.net")]),
    );
    for qtype in [RecordType::A, RecordType::AAAA] {
        server.reply(
            "mx.mxok.example.net",
            qtype,
            MockReply::code(ResponseCode::ServFail),
        );
    }
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("mxok.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    assert!(!error.is_permanent());
}

#[test]
fn one_target_servfail_other_usable() {
    let server = MockDnsServer::start();
    server.reply(
        "partial.example.net",
        RecordType::MX,
        MockReply::records(vec![
            mx("partial.example.net", 10, "broken.partial.example.net"),
            mx("partial.example.net", 20, "good.partial.example.net"),
        ]),
    );
    for qtype in [RecordType::A, RecordType::AAAA] {
        server.reply(
            "broken.partial.example.net",
            qtype,
            MockReply::code(ResponseCode::ServFail),
        );
    }
    server.reply(
        "good.partial.example.net",
        RecordType::A,
        MockReply::records(vec![a("good.partial.example.net", v4("192.0.2.40"))]),
    );
    server.reply(
        "good.partial.example.net",
        RecordType::AAAA,
        MockReply::nodata("partial.example.net"),
    );
    let resolver = resolver(&server);
    let targets = run(resolver.resolve_mx("partial.example.net")).unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0].host, "broken.partial.example.net");
    assert!(matches!(targets[0].addrs, Err(DnsError::Temporary(_))));
    assert_eq!(targets[1].addrs, Ok(vec![ip("192.0.2.40")]));
}

#[test]
fn address_from_one_family_is_enough() {
    let server = MockDnsServer::start();
    server.reply(
        "v6only.example.net",
        RecordType::A,
        MockReply::code(ResponseCode::ServFail),
    );
    server.reply(
        "v6only.example.net",
        RecordType::AAAA,
        MockReply::records(vec![aaaa("v6only.example.net", Ipv6Addr::LOCALHOST)]),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("v6only.example.net")),
        Ok(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)])
    );
}

// --- Retries across nameservers ---

#[test]
fn silent_server_falls_over_to_next() {
    let silent = MockDnsServer::start();
    let working = MockDnsServer::start();
    silent.set("host.example.net", RecordType::A, Behavior::Silent);
    silent.set("host.example.net", RecordType::AAAA, Behavior::Silent);
    working.reply(
        "host.example.net",
        RecordType::A,
        MockReply::records(vec![a("host.example.net", v4("192.0.2.50"))]),
    );
    working.reply(
        "host.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = Resolver::new(&config(&[&silent, &working], 200, 1)).unwrap();
    assert_eq!(
        run(resolver.resolve_host("host.example.net")),
        Ok(vec![ip("192.0.2.50")])
    );
    assert_eq!(silent.count("host.example.net", RecordType::A), 1);
}

#[test]
fn servfail_server_falls_over_to_next() {
    let failing = MockDnsServer::start();
    let working = MockDnsServer::start();
    failing.reply(
        "host.example.net",
        RecordType::A,
        MockReply::code(ResponseCode::ServFail),
    );
    failing.reply(
        "host.example.net",
        RecordType::AAAA,
        MockReply::code(ResponseCode::Refused),
    );
    working.reply(
        "host.example.net",
        RecordType::A,
        MockReply::records(vec![a("host.example.net", v4("192.0.2.51"))]),
    );
    working.reply(
        "host.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = Resolver::new(&config(&[&failing, &working], 1000, 1)).unwrap();
    assert_eq!(
        run(resolver.resolve_host("host.example.net")),
        Ok(vec![ip("192.0.2.51")])
    );
}

#[test]
fn closed_port_fails_fast() {
    // Bind and drop a socket to get a loopback port with nothing behind it.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let config = DnsConfig {
        nameservers: vec![address.to_string()],
        timeout: ConfigDuration(Duration::from_secs(5)),
        attempts: 1,
        ..DnsConfig::default()
    };
    let resolver = Resolver::new(&config).unwrap();
    let started = Instant::now();
    let error = run(resolver.resolve_host("host.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    // ICMP port unreachable ends the wait long before the 5 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn slow_lookup_does_not_block_others() {
    let server = MockDnsServer::start();
    server.set("slow.example.net", RecordType::MX, Behavior::Silent);
    server.reply(
        "fast.example.net",
        RecordType::A,
        MockReply::records(vec![a("fast.example.net", v4("192.0.2.60"))]),
    );
    server.reply(
        "fast.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = Rc::new(Resolver::new(&config(&[&server], 1500, 1)).unwrap());
    run(async move {
        let slow_resolver = Rc::clone(&resolver);
        let slow =
            glommio::spawn_local(async move { slow_resolver.resolve_mx("slow.example.net").await });
        // Let the slow query go out first.
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let fast = resolver.resolve_host("fast.example.net").await;
        let fast_elapsed = started.elapsed();
        assert_eq!(fast, Ok(vec![ip("192.0.2.60")]));
        assert!(
            fast_elapsed < Duration::from_millis(750),
            "the fast lookup took {fast_elapsed:?} behind a 1500 ms timeout"
        );
        assert!(matches!(slow.await, Err(DnsError::Temporary(_))));
    });
}

// --- Truncation and TCP ---

#[test]
fn truncated_udp_retried_over_tcp() {
    let server = MockDnsServer::start();
    let records: Vec<_> = (1..=40)
        .map(|last| a("big.example.net", v4(&format!("192.0.2.{last}"))))
        .collect();
    server.set(
        "big.example.net",
        RecordType::A,
        Behavior::TruncatedUdp(MockReply::records(records)),
    );
    server.reply(
        "big.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    let addresses = run(resolver.resolve_host("big.example.net")).unwrap();
    assert_eq!(addresses.len(), 40);
    assert_eq!(addresses[0], ip("192.0.2.1"));
    let transports: Vec<bool> = server
        .log()
        .iter()
        .filter(|query| query.qtype == RecordType::A)
        .map(|query| query.over_tcp)
        .collect();
    assert_eq!(transports, vec![false, true], "UDP first, then TCP");
}

#[test]
fn truncated_udp_and_tcp_closed_is_temporary() {
    let server = MockDnsServer::start();
    server.set(
        "tc.example.net",
        RecordType::MX,
        Behavior::TruncatedUdpTcpClosed,
    );
    let resolver = resolver(&server);
    let error = run(resolver.resolve_mx("tc.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    assert_eq!(server.count("tc.example.net", RecordType::MX), 2);
}

#[test]
fn truncated_udp_and_tcp_silent_times_out() {
    let server = MockDnsServer::start();
    server.set(
        "tcslow.example.net",
        RecordType::MX,
        Behavior::TruncatedUdpTcpSilent,
    );
    let resolver = Resolver::new(&config(&[&server], 200, 1)).unwrap();
    let started = Instant::now();
    let error = run(resolver.resolve_mx("tcslow.example.net")).unwrap_err();
    assert!(matches!(error, DnsError::Temporary(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_millis(600));
}

// --- Forged and mismatched responses ---

#[test]
fn wrong_id_response_ignored() {
    let server = MockDnsServer::start();
    server.set(
        "id.example.net",
        RecordType::A,
        Behavior::WrongIdFirst {
            forged: vec![a("id.example.net", v4("198.51.100.66"))],
            real: MockReply::records(vec![a("id.example.net", v4("192.0.2.70"))]),
        },
    );
    server.reply(
        "id.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("id.example.net")),
        Ok(vec![ip("192.0.2.70")])
    );
}

#[test]
fn wrong_question_response_ignored() {
    let server = MockDnsServer::start();
    server.set(
        "question.example.net",
        RecordType::A,
        Behavior::WrongQuestionFirst {
            forged: vec![a("question.example.net", v4("198.51.100.66"))],
            real: MockReply::records(vec![a("question.example.net", v4("192.0.2.71"))]),
        },
    );
    server.reply(
        "question.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("question.example.net")),
        Ok(vec![ip("192.0.2.71")])
    );
}

#[test]
fn other_source_response_ignored() {
    let server = MockDnsServer::start();
    server.set(
        "source.example.net",
        RecordType::A,
        Behavior::OtherSourceFirst {
            forged: vec![a("source.example.net", v4("198.51.100.66"))],
            real: MockReply::records(vec![a("source.example.net", v4("192.0.2.72"))]),
        },
    );
    server.reply(
        "source.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("source.example.net")),
        Ok(vec![ip("192.0.2.72")])
    );
}

#[test]
fn wrong_id_only_times_out() {
    let server = MockDnsServer::start();
    server.set(
        "never.example.net",
        RecordType::MX,
        Behavior::WrongIdOnly(vec![mx("never.example.net", 10, "mx.attacker.example.org")]),
    );
    let resolver = Resolver::new(&config(&[&server], 200, 1)).unwrap();
    let started = Instant::now();
    let error = run(resolver.resolve_mx("never.example.net")).unwrap_err();
    assert!(
        matches!(error, DnsError::Temporary(ref reason) if reason.contains("200 ms")),
        "{error:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn records_for_other_names_ignored() {
    let server = MockDnsServer::start();
    server.reply(
        "victim.example.net",
        RecordType::A,
        MockReply::records(vec![
            a("attacker.example.org", v4("198.51.100.66")),
            a("victim.example.net", v4("192.0.2.73")),
        ]),
    );
    server.reply(
        "victim.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("victim.example.net")),
        Ok(vec![ip("192.0.2.73")])
    );
}

// --- CNAME chains ---

#[test]
fn cname_chain_followed() {
    let server = MockDnsServer::start();
    server.reply(
        "www.example.net",
        RecordType::A,
        MockReply::records(vec![
            cname("www.example.net", "edge.example.net"),
            cname("edge.example.net", "node.cdn.example.org"),
            a("node.cdn.example.org", v4("192.0.2.90")),
        ]),
    );
    server.reply(
        "www.example.net",
        RecordType::AAAA,
        MockReply {
            code: ResponseCode::NoError,
            answers: vec![cname("www.example.net", "edge.example.net")],
            authorities: vec![soa("example.net", 300, 300)],
        },
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("www.example.net")),
        Ok(vec![ip("192.0.2.90")])
    );
}

#[test]
fn cname_to_nxdomain() {
    let server = MockDnsServer::start();
    for qtype in [RecordType::A, RecordType::AAAA] {
        server.reply(
            "dangling.example.net",
            qtype,
            MockReply {
                code: ResponseCode::NXDomain,
                answers: vec![cname("dangling.example.net", "gone.example.org")],
                authorities: vec![soa("example.org", 300, 300)],
            },
        );
    }
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_host("dangling.example.net")),
        Err(DnsError::NxDomain)
    );
}

#[test]
fn cname_loop_is_temporary() {
    let server = MockDnsServer::start();
    for qtype in [RecordType::A, RecordType::AAAA] {
        server.reply(
            "loop.example.net",
            qtype,
            MockReply::records(vec![
                cname("loop.example.net", "pool.example.net"),
                cname("pool.example.net", "loop.example.net"),
            ]),
        );
    }
    let resolver = resolver(&server);
    let error = run(resolver.resolve_host("loop.example.net")).unwrap_err();
    assert!(
        matches!(error, DnsError::Temporary(ref reason) if reason.contains("CNAME")),
        "{error:?}"
    );
}

#[test]
fn mx_domain_behind_cname() {
    let server = MockDnsServer::start();
    server.reply(
        "alias.example.net",
        RecordType::MX,
        MockReply::records(vec![
            cname("alias.example.net", "real.example.net"),
            mx("real.example.net", 10, "mx.real.example.net"),
        ]),
    );
    server.reply(
        "mx.real.example.net",
        RecordType::A,
        MockReply::records(vec![a("mx.real.example.net", v4("192.0.2.91"))]),
    );
    server.reply(
        "mx.real.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    let targets = run(resolver.resolve_mx("alias.example.net")).unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].host, "mx.real.example.net");
    assert_eq!(targets[0].addrs, Ok(vec![ip("192.0.2.91")]));
}

// --- Caching ---

#[test]
fn positive_answer_cached() {
    let server = MockDnsServer::start();
    server.reply(
        "cached.example.net",
        RecordType::A,
        MockReply::records(vec![a("cached.example.net", v4("192.0.2.100"))]),
    );
    server.reply(
        "cached.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    run(async {
        for _ in 0..3 {
            assert_eq!(
                resolver.resolve_host("Cached.Example.NET").await,
                Ok(vec![ip("192.0.2.100")])
            );
        }
    });
    assert_eq!(server.count("cached.example.net", RecordType::A), 1);
    assert_eq!(server.count("cached.example.net", RecordType::AAAA), 1);
}

#[test]
fn zero_max_cache_ttl_disables_positive_cache() {
    let server = MockDnsServer::start();
    server.reply(
        "fresh.example.net",
        RecordType::A,
        MockReply::records(vec![a("fresh.example.net", v4("192.0.2.101"))]),
    );
    server.reply(
        "fresh.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let mut config = config(&[&server], 1000, 1);
    config.max_cache_ttl = ConfigDuration(Duration::ZERO);
    let resolver = Resolver::new(&config).unwrap();
    run(async {
        resolver.resolve_host("fresh.example.net").await.unwrap();
        resolver.resolve_host("fresh.example.net").await.unwrap();
    });
    assert_eq!(server.count("fresh.example.net", RecordType::A), 2);
    // The negative AAAA answer is still cached under its own limit.
    assert_eq!(server.count("fresh.example.net", RecordType::AAAA), 1);
}

#[test]
fn zero_ttl_record_not_cached() {
    let server = MockDnsServer::start();
    server.reply(
        "volatile.example.net",
        RecordType::A,
        MockReply::records(vec![with_ttl(
            a("volatile.example.net", v4("192.0.2.102")),
            0,
        )]),
    );
    server.reply(
        "volatile.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    run(async {
        resolver.resolve_host("volatile.example.net").await.unwrap();
        resolver.resolve_host("volatile.example.net").await.unwrap();
    });
    assert_eq!(server.count("volatile.example.net", RecordType::A), 2);
}

#[test]
fn nxdomain_cached_with_soa() {
    let server = MockDnsServer::start();
    server.reply(
        "gone.example.net",
        RecordType::MX,
        MockReply::nxdomain("example.net"),
    );
    let resolver = resolver(&server);
    run(async {
        assert_eq!(
            resolver.resolve_mx("gone.example.net").await,
            Err(DnsError::NxDomain)
        );
        assert_eq!(
            resolver.resolve_mx("gone.example.net").await,
            Err(DnsError::NxDomain)
        );
    });
    assert_eq!(server.count("gone.example.net", RecordType::MX), 1);
}

#[test]
fn negative_answer_without_soa_not_cached() {
    let server = MockDnsServer::start();
    server.reply(
        "nosoa.example.net",
        RecordType::MX,
        MockReply::code(ResponseCode::NXDomain),
    );
    let resolver = resolver(&server);
    run(async {
        assert_eq!(
            resolver.resolve_mx("nosoa.example.net").await,
            Err(DnsError::NxDomain)
        );
        assert_eq!(
            resolver.resolve_mx("nosoa.example.net").await,
            Err(DnsError::NxDomain)
        );
    });
    assert_eq!(server.count("nosoa.example.net", RecordType::MX), 2);
}

#[test]
fn zero_negative_cache_ttl_disables_negative_cache() {
    let server = MockDnsServer::start();
    server.reply(
        "gone.example.net",
        RecordType::MX,
        MockReply::nxdomain("example.net"),
    );
    let mut config = config(&[&server], 1000, 1);
    config.negative_cache_ttl = ConfigDuration(Duration::ZERO);
    let resolver = Resolver::new(&config).unwrap();
    run(async {
        assert_eq!(
            resolver.resolve_mx("gone.example.net").await,
            Err(DnsError::NxDomain)
        );
        assert_eq!(
            resolver.resolve_mx("gone.example.net").await,
            Err(DnsError::NxDomain)
        );
    });
    assert_eq!(server.count("gone.example.net", RecordType::MX), 2);
}

#[test]
fn concurrent_lookups_share_one_query() {
    let server = MockDnsServer::start();
    server.set(
        "shared.example.net",
        RecordType::A,
        Behavior::Delayed(
            Duration::from_millis(100),
            MockReply::records(vec![a("shared.example.net", v4("192.0.2.110"))]),
        ),
    );
    server.reply(
        "shared.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = resolver(&server);
    run(async {
        let (first, second) = futures_lite::future::zip(
            resolver.resolve_host("shared.example.net"),
            resolver.resolve_host("shared.example.net"),
        )
        .await;
        assert_eq!(first, Ok(vec![ip("192.0.2.110")]));
        assert_eq!(second, Ok(vec![ip("192.0.2.110")]));
    });
    assert_eq!(server.count("shared.example.net", RecordType::A), 1);
}

#[test]
fn cancelled_shared_query_releases_waiters() {
    let server = MockDnsServer::start();
    server.set(
        "cancel.example.net",
        RecordType::A,
        Behavior::Delayed(
            Duration::from_millis(200),
            MockReply::records(vec![a("cancel.example.net", v4("192.0.2.111"))]),
        ),
    );
    server.reply(
        "cancel.example.net",
        RecordType::AAAA,
        MockReply::nodata("example.net"),
    );
    let resolver = Rc::new(resolver(&server));
    run(async move {
        let leader_resolver = Rc::clone(&resolver);
        let leader = glommio::spawn_local(async move {
            leader_resolver.resolve_host("cancel.example.net").await
        });
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let waiter_resolver = Rc::clone(&resolver);
        let waiter = glommio::spawn_local(async move {
            waiter_resolver.resolve_host("cancel.example.net").await
        });
        glommio::timer::sleep(Duration::from_millis(20)).await;
        // Dropping the leader's task cancels its query mid-flight.
        let _ = leader.cancel().await;
        assert_eq!(waiter.await, Ok(vec![ip("192.0.2.111")]));
    });
}

// --- Names ---

#[test]
fn invalid_names_rejected_without_query() {
    let server = MockDnsServer::start();
    let resolver = resolver(&server);
    for domain in [
        "",
        ".",
        "[192.0.2.1]",
        "exa mple.net",
        "a..example.net",
        "bad/name.net",
    ] {
        let error = run(resolver.resolve_mx(domain)).unwrap_err();
        assert!(
            matches!(error, DnsError::InvalidName(_)),
            "{domain:?}: {error:?}"
        );
        assert!(error.is_permanent());
    }
    let long_label = format!("{}.example.net", "a".repeat(64));
    let error = run(resolver.resolve_host(&long_label)).unwrap_err();
    assert!(matches!(error, DnsError::InvalidName(_)), "{error:?}");
    assert!(server.log().is_empty(), "{:?}", server.log());
}

#[test]
fn unicode_domain_queried_as_a_label() {
    let server = MockDnsServer::start();
    server.reply(
        "xn--bcher-kva.example",
        RecordType::MX,
        MockReply::nxdomain("example"),
    );
    let resolver = resolver(&server);
    assert_eq!(
        run(resolver.resolve_mx("Bücher.example.")),
        Err(DnsError::NxDomain)
    );
    assert_eq!(server.count("xn--bcher-kva.example", RecordType::MX), 1);
}
