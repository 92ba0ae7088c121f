//! Errors of the stub resolver: [`ResolverError`] for bad settings at
//! startup, [`DnsError`] for the outcome of one lookup.

use std::path::PathBuf;

use crate::smtp::{EnhancedStatus, Reply};

/// A setting that keeps the resolver from starting. Each message names the
/// bad value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(
        "invalid nameserver {value:?} in dns.nameservers: {reason}; \
         write an IP address with an optional port, such as \"192.0.2.53\", \
         \"192.0.2.53:5353\" or \"[2001:db8::53]:53\""
    )]
    InvalidNameserver { value: String, reason: String },
    #[error(
        "cannot read {path}: {source}; list nameservers in dns.nameservers \
         or create the file"
    )]
    ResolvConfUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no usable nameserver in {path}; add a \"nameserver <ip>\" line there \
         or list nameservers in dns.nameservers"
    )]
    NoNameservers { path: PathBuf },
    #[error("dns.timeout is 0; set it to at least 1ms, for example \"5s\"")]
    ZeroTimeout,
    #[error("dns.attempts is 0; set it to at least 1")]
    ZeroAttempts,
}

/// The reason a lookup found no delivery target. Only
/// [`DnsError::Temporary`] is worth retrying, and every other variant is
/// permanent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN, RFC 2308 §2.1).
    #[error("the domain does not exist (NXDOMAIN)")]
    NxDomain,
    /// The domain publishes a null MX and accepts no mail (RFC 7505).
    #[error("the domain publishes a null MX (RFC 7505) and accepts no mail")]
    NullMx,
    /// The name exists but has no MX, A or AAAA records.
    #[error("the domain has no MX, A or AAAA records")]
    NoAddresses,
    /// MX records exist but no target resolves to an address, and no target
    /// failed temporarily. RFC 5321 §5.1 requires reporting this as an error.
    #[error("no MX target of the domain has an address: {}", hosts.join(", "))]
    NoUsableMx { hosts: Vec<String> },
    /// The name is not a valid domain name, so it was never queried.
    #[error("invalid domain name: {0}")]
    InvalidName(String),
    /// SERVFAIL, REFUSED, a timeout, or a failed TCP retry after truncation.
    /// The text is for the log because it can name a nameserver.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

impl DnsError {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsError::Temporary(_))
    }

    /// Returns the enhanced status for DSNs (RFC 3463, RFC 7505).
    ///
    /// A domain with neither MX nor address records gets 5.1.2 ("bad
    /// destination system address") rather than 5.4.4 ("unable to route"),
    /// because to the sender it looks the same as a domain that does not
    /// exist. 5.4.4 is kept for MX records whose targets are all unusable,
    /// which is a routing fault of a domain that does exist.
    pub fn status(&self) -> EnhancedStatus {
        match self {
            DnsError::NxDomain | DnsError::NoAddresses => EnhancedStatus::new(5, 1, 2),
            DnsError::NullMx => EnhancedStatus::new(5, 1, 10),
            DnsError::NoUsableMx { .. } => EnhancedStatus::new(5, 4, 4),
            DnsError::InvalidName(_) => EnhancedStatus::new(5, 1, 3),
            DnsError::Temporary(_) => EnhancedStatus::new(4, 4, 3),
        }
    }

    /// Builds a synthesized reply naming the domain, for the delivery log and the
    /// DSN `Diagnostic-Code`. It leaves out the nameserver and the low-level
    /// cause that [`DnsError::Temporary`] carries, because the DSN goes to
    /// the sender.
    pub fn reply(&self, domain: &str) -> Reply {
        let status = self.status();
        match self {
            DnsError::NxDomain => {
                Reply::new(550, status, format!("Domain {domain} does not exist"))
            }
            // RFC 7504 §3 reserves 556 for a domain that does not accept mail.
            DnsError::NullMx => Reply::new(
                556,
                status,
                format!("Domain {domain} does not accept mail (null MX)"),
            ),
            DnsError::NoAddresses => Reply::new(
                550,
                status,
                format!("Domain {domain} has no MX, A or AAAA records"),
            ),
            DnsError::NoUsableMx { hosts } => Reply::new(
                550,
                status,
                format!(
                    "No MX host of {domain} has an address: {}",
                    hosts.join(", ")
                ),
            ),
            DnsError::InvalidName(_) => {
                Reply::new(553, status, format!("Invalid domain name {domain}"))
            }
            DnsError::Temporary(_) => Reply::new(
                451,
                status,
                format!("DNS lookup for {domain} failed temporarily"),
            ),
        }
    }
}
