//! Domain name syntax and IDN normalisation.
//!
//! Policy tables, suppression lists and log hashes compare domains in one
//! form: the lowercase A-label (RFC 5890 §2.3.2.1) produced by UTS #46
//! ToASCII with the STD3 (letter, digit, hyphen) rules and DNS length checks.

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// The maximum length of a domain name in text form without a trailing dot.
/// RFC 1035 §2.3.4 allows 255 octets on the wire, which is 253 characters of
/// text.
pub(crate) const MAX_DOMAIN_LENGTH: usize = 253;
/// RFC 1035 §2.3.4.
pub(crate) const MAX_LABEL_LENGTH: usize = 63;

/// A domain name that failed validation or IDN conversion.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain {domain:?}: {reason}")]
pub struct DomainError {
    pub domain: String,
    pub reason: String,
}

/// Converts a domain given as U-labels, A-labels or a mix of both to its
/// lowercase A-label form, such as `bücher.example` to
/// `xn--bcher-kva.example`.
///
/// Rejects empty labels, labels over 63 octets, names over 253 octets, a
/// trailing dot, and characters outside letters, digits and hyphens after
/// conversion (the STD3 rules of UTS #46).
pub fn normalise_domain(domain: &str) -> Result<String, DomainError> {
    let invalid = |reason: String| DomainError {
        domain: domain.to_string(),
        reason,
    };
    if domain.is_empty() {
        return Err(invalid("the name is empty".to_string()));
    }
    if domain.ends_with('.') {
        return Err(invalid("remove the trailing dot".to_string()));
    }
    let converted = Uts46::new()
        .to_ascii(
            domain.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::CheckFirstLast,
            DnsLength::Verify,
        )
        .map_err(|_| {
            // UTS #46 reports no detail, so explain ASCII input with the
            // syntax checker and name the conversion for the rest.
            let reason = if domain.is_ascii() {
                check_host_name(domain)
                    .err()
                    .unwrap_or_else(|| "an xn-- label is not valid Punycode".to_string())
            } else {
                "not a valid internationalised domain name (UTS #46 ToASCII failed)".to_string()
            };
            invalid(reason)
        })?;
    // ToASCII with the STD3 deny list already enforces this. Checking again
    // keeps the contract of this function independent of the idna version.
    check_host_name(&converted).map_err(invalid)?;
    Ok(converted.into_owned())
}

/// Checks that `name` is an ASCII host name: letters, digits and hyphens in
/// labels of 1 to 63 octets that neither start nor end with a hyphen, 253
/// octets at most in all (RFC 1123 §2.1, RFC 1035 §2.3.4). Returns the reason
/// when it is not.
pub(crate) fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.len() > MAX_DOMAIN_LENGTH {
        return Err(format!(
            "the name is {} octets long; the maximum is {MAX_DOMAIN_LENGTH}",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(
                "the name has an empty label (two dots in a row, or a dot at either end)"
                    .to_string(),
            );
        }
        if label.len() > MAX_LABEL_LENGTH {
            return Err(format!(
                "the label {label:?} is {} octets long; the maximum is {MAX_LABEL_LENGTH}",
                label.len()
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "the label {label:?} contains {bad:?}; only letters, digits and hyphens are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("the label {label:?} starts or ends with a hyphen"));
        }
    }
    Ok(())
}

/// A rule's `domain` or `mx` value after normalisation.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct DomainPattern {
    /// The lowercase A-label name, without the `*.` of a wildcard.
    pub name: String,
    /// `*.name`: matches every name below `name` at any depth, but not `name`
    /// itself.
    pub wildcard: bool,
}

impl DomainPattern {
    /// Parses `example.com` or `*.example.com`. One trailing dot is accepted
    /// because zone files write names that way.
    pub fn parse(text: &str) -> Result<DomainPattern, DomainError> {
        let without_root = text.strip_suffix('.').unwrap_or(text);
        let (wildcard, name) = match without_root.strip_prefix("*.") {
            Some(parent) => (true, parent),
            None => (false, without_root),
        };
        if name.contains('*') {
            return Err(DomainError {
                domain: text.to_string(),
                reason:
                    "a wildcard is allowed only as the whole first label, as in \"*.example.com\""
                        .to_string(),
            });
        }
        let name = normalise_domain(name).map_err(|error| DomainError {
            domain: text.to_string(),
            reason: error.reason,
        })?;
        let last_label = name.rsplit('.').next().unwrap_or(&name);
        if last_label.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(DomainError {
                domain: text.to_string(),
                reason: "ends in an all-numeric label, as an IP address does, but no domain or MX host name does, so the rule would match nothing; to send to a fixed address, set route = \"IP:PORT\" on a rule for the domain".to_string(),
            });
        }
        Ok(DomainPattern { name, wildcard })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_u_label_and_a_label_agree() {
        assert_eq!(
            normalise_domain("Bücher.Example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        assert_eq!(
            normalise_domain("XN--BCHER-KVA.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
    }

    #[test]
    fn normalise_rejects_bad_names() {
        for bad in [
            "",
            "example.com.",
            "a..b",
            ".example",
            "-a.example",
            "a-.example",
            "under_score.example",
            "sp ace.example",
            "xn--zz.example",
        ] {
            assert!(normalise_domain(bad).is_err(), "{bad:?} was accepted");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(normalise_domain(&long_label).is_err());
        let long_name = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long_name.len(), 255);
        assert!(normalise_domain(&long_name).is_err());
    }

    #[test]
    fn pattern_parses_wildcard_and_root_dot() {
        let pattern = DomainPattern::parse("*.Mail.Protection.Outlook.com.").unwrap();
        assert!(pattern.wildcard);
        assert_eq!(pattern.name, "mail.protection.outlook.com");
        assert_eq!(pattern.to_string(), "*.mail.protection.outlook.com");
    }

    #[test]
    fn pattern_rejects_inner_wildcard() {
        for bad in ["*", "*.", "a.*.example", "*example.com", "**.example"] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
