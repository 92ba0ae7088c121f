//! dnsmasq serving the test zones on a loopback UDP and TCP port.
//!
//! dnsmasq 2.90 runs with `--no-resolv` and no upstream server, so it replies
//! only from its configuration:
//!
//! - a name under a zone given with `local=/zone/` that has no record returns
//!   NXDOMAIN, and a known name asked for another type returns NOERROR with
//!   no answer (NODATA);
//! - a name outside every such zone returns REFUSED, not NXDOMAIN.
//!
//! [`Dnsmasq::start`] therefore declares a local zone for every owner name in
//! its records, and [`DnsRecord::Zone`] adds more. A null MX (RFC 7505) is
//! `mx-host=domain,.,0`, which dnsmasq answers as `MX 0 .`.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

use crate::net::{free_port, other_error, poll_until, tail_of_file};

/// Path of the dnsmasq binary from the `dnsmasq-base` package.
const DNSMASQ_COMMAND: &str = "/usr/sbin/dnsmasq";

/// How long `start` waits for the first response.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// TTL of every record served, in seconds (`local-ttl`).
const RECORD_TTL_SECS: u32 = 300;

/// One record or zone served by [`Dnsmasq`].
#[derive(Clone, Debug)]
pub enum DnsRecord {
    /// `domain MX preference host`. A host of `"."` makes a null MX.
    Mx {
        domain: String,
        host: String,
        preference: u16,
    },
    /// An A or AAAA record, by the address family of `addr`.
    A { name: String, addr: IpAddr },
    /// `name CNAME target`.
    Cname { name: String, target: String },
    /// A TXT record with one character string, such as an MTA-STS record.
    Txt { name: String, text: String },
    /// Any record type as raw RDATA, for types dnsmasq has no option for
    /// (TLSA is type 52).
    Raw {
        name: String,
        record_type: u16,
        rdata: Vec<u8>,
    },
    /// A zone answered locally: its unknown names get NXDOMAIN instead of
    /// REFUSED.
    Zone(String),
}

impl DnsRecord {
    fn owner(&self) -> &str {
        match self {
            DnsRecord::Mx { domain, .. } => domain,
            DnsRecord::A { name, .. }
            | DnsRecord::Cname { name, .. }
            | DnsRecord::Txt { name, .. }
            | DnsRecord::Raw { name, .. } => name,
            DnsRecord::Zone(zone) => zone,
        }
    }

    fn config_line(&self) -> String {
        match self {
            DnsRecord::Mx {
                domain,
                host,
                preference,
            } => format!("mx-host={domain},{host},{preference}"),
            DnsRecord::A { name, addr } => format!("host-record={name},{addr}"),
            DnsRecord::Cname { name, target } => format!("cname={name},{target}"),
            DnsRecord::Txt { name, text } => {
                format!("txt-record={name},\"{}\"", text.replace('"', "\\\""))
            }
            DnsRecord::Raw {
                name,
                record_type,
                rdata,
            } => {
                let hex: Vec<String> = rdata.iter().map(|byte| format!("{byte:02x}")).collect();
                format!("dns-rr={name},{record_type},{}", hex.join(":"))
            }
            DnsRecord::Zone(zone) => format!("local=/{zone}/"),
        }
    }
}

/// A running dnsmasq. Dropping it kills the process.
pub struct Dnsmasq {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 and a free port, serving `records`.
    pub fn start(records: &[DnsRecord]) -> io::Result<Dnsmasq> {
        let dir = tempfile::Builder::new()
            .prefix("caduceus-dnsmasq-")
            .tempdir()?;
        let config_path = dir.path().join("dnsmasq.conf");
        std::fs::write(&config_path, config_text(records))?;

        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let port = free_port(ip)?;
        let addr = SocketAddr::new(ip, port);
        let log_path = dir.path().join("dnsmasq.log");
        let log_file = std::fs::File::create(&log_path)?;
        let child = Command::new(DNSMASQ_COMMAND)
            .arg("--no-daemon")
            .arg(format!("--port={port}"))
            .arg(format!("--listen-address={ip}"))
            .arg("--bind-interfaces")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--log-queries")
            .arg("--log-facility=-")
            .arg(format!("--conf-file={}", config_path.display()))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|error| {
                other_error(format!(
                    "running {DNSMASQ_COMMAND} failed: {error}; install the dnsmasq-base package"
                ))
            })?;
        let mut dnsmasq = Dnsmasq { addr, child, dir };

        // Any answer, REFUSED included, shows the server is up.
        let probe = Name::from_ascii("probe.invalid.").map_err(proto_error)?;
        let ready = poll_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = dnsmasq.child.try_wait() {
                return Some(Err(status));
            }
            dnsmasq
                .query_name(&probe, RecordType::A)
                .ok()
                .map(|_| Ok(()))
        });
        match ready {
            Some(Ok(())) => Ok(dnsmasq),
            Some(Err(status)) => Err(other_error(format!(
                "dnsmasq on {addr} exited at start ({status}):\n{}",
                dnsmasq.log_tail()
            ))),
            None => Err(other_error(format!(
                "dnsmasq on {addr} did not answer within {START_TIMEOUT:?}:\n{}",
                dnsmasq.log_tail()
            ))),
        }
    }

    /// Returns the UDP and TCP address of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the query log (`--log-queries`).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Sends one query over UDP and returns the decoded response.
    pub fn query(&self, name: &str, record_type: RecordType) -> io::Result<Message> {
        let name = Name::from_str(name).map_err(proto_error)?;
        self.query_name(&name, record_type)
    }

    fn query_name(&self, name: &Name, record_type: RecordType) -> io::Result<Message> {
        let socket = UdpSocket::bind(SocketAddr::new(self.addr.ip(), 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(name.clone(), record_type));
        let id = request.metadata.id;
        socket.send_to(&request.to_vec().map_err(proto_error)?, self.addr)?;
        let mut buffer = [0u8; 4096];
        loop {
            let (len, from) = socket.recv_from(&mut buffer)?;
            if from != self.addr {
                continue;
            }
            let response = Message::from_vec(&buffer[..len]).map_err(proto_error)?;
            if response.metadata.id == id {
                return Ok(response);
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    fn log_tail(&self) -> String {
        tail_of_file(&self.log_path(), 30)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(records: &[DnsRecord]) -> String {
    let mut text = format!("local-ttl={RECORD_TTL_SECS}\n");
    let mut zones: Vec<&str> = records.iter().map(DnsRecord::owner).collect();
    zones.sort_unstable();
    zones.dedup();
    for zone in zones {
        let _ = writeln!(text, "local=/{zone}/");
    }
    for record in records {
        if !matches!(record, DnsRecord::Zone(_)) {
            let _ = writeln!(text, "{}", record.config_line());
        }
    }
    text
}

fn proto_error(error: impl std::fmt::Display) -> io::Error {
    other_error(format!("DNS message: {error}"))
}
