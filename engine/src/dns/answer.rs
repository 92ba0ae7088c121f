//! Reading one DNS response: the CNAME chain, the records of the requested
//! type, and how long the result may be cached.

use std::rc::Rc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// The longest CNAME chain followed inside one response. Real chains are
/// one or two links long, so a longer one is treated as a loop.
pub const MAX_CNAME_CHAIN: usize = 8;

/// The usable result of one (name, type) lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Records of the requested type, owned by the last name of any CNAME
    /// chain. Never empty.
    Records(Rc<[RData]>),
    /// The name exists but has no records of the requested type
    /// (RFC 2308 §2.2).
    NoData,
    /// The name does not exist (RFC 2308 §2.1).
    NxDomain,
}

/// An [`Answer`] with the time it may be cached. `None` means "do not
/// cache": a negative answer without an SOA record (RFC 2308 §5), or a TTL
/// of zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedAnswer {
    pub answer: Answer,
    pub ttl: Option<Duration>,
}

/// Reads a NOERROR or NXDOMAIN response to the question `(qname, qtype)`.
///
/// Follows CNAME records from `qname` inside the answer section (RFC 1034
/// §3.6.2). Records for other names are ignored, so an answer section
/// cannot place records under a name that the chain does not reach. When
/// the chain ends without records of `qtype`, the response code decides:
/// RFC 6604 applies NXDOMAIN to the last name of the chain, and NOERROR
/// means NODATA. Returns an error text for a chain longer than
/// [`MAX_CNAME_CHAIN`].
pub fn read_answer(
    response: &Message,
    qname: &Name,
    qtype: RecordType,
    max_cache_ttl: Duration,
    negative_cache_ttl: Duration,
) -> Result<TimedAnswer, String> {
    let mut owner = qname.clone();
    // The chain is only as fresh as its shortest-lived link.
    let mut ttl_secs = u32::MAX;

    for _ in 0..=MAX_CNAME_CHAIN {
        let records: Vec<RData> = response
            .answers
            .iter()
            .filter(|record| {
                record.dns_class == DNSClass::IN
                    && record.record_type() == qtype
                    && record.name == owner
            })
            .map(|record| {
                ttl_secs = ttl_secs.min(record.ttl);
                record.data.clone()
            })
            .collect();
        if !records.is_empty() {
            return Ok(TimedAnswer {
                answer: Answer::Records(records.into()),
                ttl: cache_ttl(ttl_secs, max_cache_ttl),
            });
        }

        let alias = response
            .answers
            .iter()
            .find_map(|record| match &record.data {
                RData::CNAME(target)
                    if record.dns_class == DNSClass::IN && record.name == owner =>
                {
                    Some((target.0.clone(), record.ttl))
                }
                _ => None,
            });
        match alias {
            Some((target, ttl)) => {
                ttl_secs = ttl_secs.min(ttl);
                owner = target;
            }
            None => {
                let answer = if response.metadata.response_code == ResponseCode::NXDomain {
                    Answer::NxDomain
                } else {
                    Answer::NoData
                };
                return Ok(TimedAnswer {
                    answer,
                    ttl: negative_ttl(response, negative_cache_ttl),
                });
            }
        }
    }
    Err(format!(
        "the CNAME chain of {qname} is longer than {MAX_CNAME_CHAIN} links"
    ))
}

fn cache_ttl(ttl_secs: u32, max_cache_ttl: Duration) -> Option<Duration> {
    let ttl = Duration::from_secs(u64::from(ttl_secs)).min(max_cache_ttl);
    (!ttl.is_zero()).then_some(ttl)
}

/// RFC 2308 §5: a negative answer is cached for the smaller of the SOA
/// record's own TTL and its MINIMUM field. Without an SOA in the authority
/// section it SHOULD NOT be cached at all.
fn negative_ttl(response: &Message, negative_cache_ttl: Duration) -> Option<Duration> {
    let soa_ttl_secs = response
        .authorities
        .iter()
        .filter_map(|record| match &record.data {
            RData::SOA(soa) => Some(record.ttl.min(soa.minimum)),
            _ => None,
        })
        .min()?;
    cache_ttl(soa_ttl_secs, negative_cache_ttl)
}
