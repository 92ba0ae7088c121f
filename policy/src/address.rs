//! Address normalisation for hashing and list lookups.

use crate::domain::normalise_domain;

/// RFC 5321 §4.5.3.1.3: the longest forward-path is 256 octets including the
/// angle brackets, so an address has at most 254.
const MAX_ADDRESS_LENGTH: usize = 254;

/// An address that cannot be normalised.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("invalid address: no @ separates the local part from the domain")]
    MissingAt,
    #[error("invalid address: the local part is empty")]
    EmptyLocalPart,
    #[error(
        "invalid address: it is {length_bytes} octets long; the maximum is {MAX_ADDRESS_LENGTH}"
    )]
    TooLong { length_bytes: usize },
    #[error("invalid address: it contains the control character {0:?}")]
    ControlCharacter(char),
    #[error("invalid address: {0}")]
    Domain(#[from] crate::domain::DomainError),
}

/// Normalises an address for comparison and hashing: the domain becomes its
/// lowercase A-label and the local part stays exactly as given.
///
/// The local part is case-sensitive (RFC 5321 §2.4), and Punycode applies to
/// domain labels only, so `Grå@Bücher.example` becomes
/// `Grå@xn--bcher-kva.example`. The domain is split off at the last `@`,
/// because a quoted local part such as `"info@"` may contain one. An address
/// literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]` is kept with its
/// letters lowercased.
pub fn normalise_address(address: &str) -> Result<String, AddressError> {
    if address.len() > MAX_ADDRESS_LENGTH {
        return Err(AddressError::TooLong {
            length_bytes: address.len(),
        });
    }
    // CR, LF and NUL in an address are an injection attempt into a log line
    // or an SMTP command, never part of a mailbox (RFC 5321 §4.1.2).
    if let Some(control) = address.chars().find(|c| c.is_control()) {
        return Err(AddressError::ControlCharacter(control));
    }
    let (local_part, domain) = address.rsplit_once('@').ok_or(AddressError::MissingAt)?;
    if local_part.is_empty() {
        return Err(AddressError::EmptyLocalPart);
    }
    let domain = if domain.starts_with('[') && domain.ends_with(']') {
        domain.to_ascii_lowercase()
    } else {
        normalise_domain(domain)?
    };
    Ok(format!("{local_part}@{domain}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_keeps_local_part_exact() {
        assert_eq!(
            normalise_address("Grå@Bücher.Example").as_deref(),
            Ok("Grå@xn--bcher-kva.example")
        );
        assert_eq!(
            normalise_address("xn--gr-zia@example.net").as_deref(),
            Ok("xn--gr-zia@example.net")
        );
    }

    #[test]
    fn normalise_quoted_local_part_with_at() {
        assert_eq!(
            normalise_address("\"info@\"@Example.COM").as_deref(),
            Ok("\"info@\"@example.com")
        );
    }

    #[test]
    fn normalise_address_literal() {
        assert_eq!(
            normalise_address("user@[IPv6:2001:DB8::1]").as_deref(),
            Ok("user@[ipv6:2001:db8::1]")
        );
    }

    #[test]
    fn normalise_rejects_hostile_input() {
        assert_eq!(
            normalise_address("user.example"),
            Err(AddressError::MissingAt)
        );
        assert_eq!(
            normalise_address("@example.com"),
            Err(AddressError::EmptyLocalPart)
        );
        assert_eq!(
            normalise_address("user@example.com\r\nRCPT TO:<x@y>"),
            Err(AddressError::ControlCharacter('\r'))
        );
        assert_eq!(
            normalise_address("us\0er@example.com"),
            Err(AddressError::ControlCharacter('\0'))
        );
        assert!(matches!(
            normalise_address("user@"),
            Err(AddressError::Domain(_))
        ));
        assert!(matches!(
            normalise_address("user@example.com."),
            Err(AddressError::Domain(_))
        ));
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(matches!(
            normalise_address(&long),
            Err(AddressError::TooLong { .. })
        ));
    }
}
