//! Nameserver addresses from `dns.nameservers` and from /etc/resolv.conf.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use super::error::ResolverError;

/// The DNS port (RFC 1035 §4.2).
pub const DNS_PORT: u16 = 53;

/// glibc uses at most three nameservers (`MAXNS` in resolv.h), and so does
/// Caduceus, so that a lookup stays within the bound an operator expects
/// from the same file.
pub const MAX_NAMESERVERS: usize = 3;

/// glibc's caps on `options timeout:` and `options attempts:` (resolv(5)).
const MAX_TIMEOUT_SECS: u64 = 30;
const MAX_ATTEMPTS: u32 = 5;

/// The settings Caduceus takes from resolv.conf(5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    /// `options timeout:N`, capped at 30 s like glibc.
    pub timeout: Option<Duration>,
    /// `options attempts:N`, capped at 5 like glibc.
    pub attempts: Option<u32>,
    /// `nameserver` lines that were skipped, with the reason, for the log.
    pub skipped: Vec<String>,
}

/// Parses one `dns.nameservers` entry: `ip` (port 53) or `ip:port`, where an
/// IPv6 address with a port is written in brackets (`[::1]:5353`).
pub fn parse_nameserver(value: &str) -> Result<SocketAddr, ResolverError> {
    let invalid = |reason: &str| ResolverError::InvalidNameserver {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid("the value is empty"));
    }
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DNS_PORT));
    }
    match trimmed.parse::<SocketAddr>() {
        Ok(address) if address.port() == 0 => Err(invalid("port 0 is not a valid port")),
        Ok(address) => Ok(address),
        Err(_) => Err(invalid(
            "not an IP address or IP address and port (host names are not accepted)",
        )),
    }
}

/// Parses the text of a resolv.conf(5) file.
///
/// Only `nameserver` and the `timeout:` and `attempts:` options matter here.
/// `search`, `domain` and `ndots` are ignored because Caduceus looks up
/// fully qualified names only. As in glibc, the last `options` line wins for
/// each option, and nameservers past the third are ignored.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        // resolv.conf(5): a line starting with ';' or '#' is a comment.
        let line = line.trim();
        if line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(value) = words.next() else {
                    conf.skipped
                        .push("a nameserver line has no address".to_string());
                    continue;
                };
                if conf.nameservers.len() >= MAX_NAMESERVERS {
                    conf.skipped.push(format!(
                        "nameserver {value}: only the first {MAX_NAMESERVERS} are used"
                    ));
                    continue;
                }
                match parse_resolv_conf_address(value) {
                    Ok(address) => conf.nameservers.push(address),
                    Err(reason) => conf.skipped.push(format!("nameserver {value}: {reason}")),
                }
            }
            Some("options") => {
                for option in words {
                    if let Some(seconds) = option.strip_prefix("timeout:") {
                        if let Ok(seconds) = seconds.parse::<u64>() {
                            let seconds = seconds.clamp(1, MAX_TIMEOUT_SECS);
                            conf.timeout = Some(Duration::from_secs(seconds));
                        }
                    } else if let Some(count) = option.strip_prefix("attempts:")
                        && let Ok(count) = count.parse::<u32>()
                    {
                        conf.attempts = Some(count.clamp(1, MAX_ATTEMPTS));
                    }
                }
            }
            _ => {}
        }
    }
    conf
}

/// Parses a resolv.conf address: an IP address without a port. An IPv6
/// link-local address may carry a numeric zone (`fe80::1%2`). A named zone
/// (`%eth0`) would need `if_nametoindex`, so it is skipped.
fn parse_resolv_conf_address(value: &str) -> Result<SocketAddr, String> {
    if let Some((address, zone)) = value.split_once('%') {
        let address: Ipv6Addr = address
            .parse()
            .map_err(|_| "not an IPv6 address before the zone".to_string())?;
        let scope_id: u32 = zone
            .parse()
            .map_err(|_| format!("zone {zone:?} is not numeric; write the interface index"))?;
        return Ok(SocketAddr::V6(SocketAddrV6::new(
            address, DNS_PORT, 0, scope_id,
        )));
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .map_err(|_| "not an IP address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_address(text: &str) -> SocketAddr {
        text.parse().expect("valid socket address")
    }

    #[test]
    fn nameserver_without_port_uses_53() {
        let address = parse_nameserver("192.0.2.53").unwrap();
        assert_eq!(address, socket_address("192.0.2.53:53"));
        let address = parse_nameserver("2001:db8::53").unwrap();
        assert_eq!(address, socket_address("[2001:db8::53]:53"));
    }

    #[test]
    fn nameserver_with_port() {
        let address = parse_nameserver("127.0.0.1:5353").unwrap();
        assert_eq!(address, socket_address("127.0.0.1:5353"));
        let address = parse_nameserver("[::1]:5353").unwrap();
        assert_eq!(address, socket_address("[::1]:5353"));
    }

    #[test]
    fn nameserver_invalid_values() {
        for value in [
            "",
            "dns.example.net",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "::1:53x",
        ] {
            let error = parse_nameserver(value).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(&format!("{value:?}")),
                "{message} names the value"
            );
            assert!(
                message.contains("192.0.2.53:5353"),
                "{message} shows the fix"
            );
        }
    }

    #[test]
    fn resolv_conf_full_file() {
        let text = "\
# generated by resolvconf
; old comment style
search example.com corp.example.com
domain example.com
nameserver 192.0.2.1
nameserver   2001:db8::1
options ndots:2 timeout:3 attempts:4 rotate
";
        let conf = parse_resolv_conf(text);
        assert_eq!(
            conf.nameservers,
            vec![
                socket_address("192.0.2.1:53"),
                socket_address("[2001:db8::1]:53")
            ]
        );
        assert_eq!(conf.timeout, Some(Duration::from_secs(3)));
        assert_eq!(conf.attempts, Some(4));
        assert!(conf.skipped.is_empty());
    }

    #[test]
    fn resolv_conf_caps_like_glibc() {
        let text = "\
nameserver 192.0.2.1
nameserver 192.0.2.2
nameserver 192.0.2.3
nameserver 192.0.2.4
options timeout:0 attempts:0
options timeout:90 attempts:9
";
        let conf = parse_resolv_conf(text);
        assert_eq!(conf.nameservers.len(), MAX_NAMESERVERS);
        assert_eq!(conf.timeout, Some(Duration::from_secs(30)));
        assert_eq!(conf.attempts, Some(5));
        assert_eq!(conf.skipped.len(), 1);
        assert!(conf.skipped[0].contains("192.0.2.4"));
    }

    #[test]
    fn resolv_conf_bad_lines_are_skipped() {
        let text = "\
nameserver
nameserver ns1.example.net
nameserver fe80::1%eth0
nameserver fe80::1%2
nameserver 127.0.0.53 # trailing comment
options timeout:abc attempts:-1
";
        let conf = parse_resolv_conf(text);
        assert_eq!(
            conf.nameservers,
            vec![
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                    53,
                    0,
                    2
                )),
                socket_address("127.0.0.53:53"),
            ]
        );
        assert_eq!(conf.skipped.len(), 3);
        assert_eq!(conf.timeout, None);
        assert_eq!(conf.attempts, None);
    }

    #[test]
    fn resolv_conf_empty() {
        let conf = parse_resolv_conf("");
        assert!(conf.nameservers.is_empty());
        assert_eq!(conf.timeout, None);
    }
}
