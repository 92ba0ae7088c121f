//! Address normalisation for hashing and list lookups.

use std::borrow::Cow;

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
/// lowercase A-label and the local part keeps its case and characters.
///
/// The local part is case-sensitive (RFC 5321 §2.4), and Punycode applies to
/// domain labels only, so `Grå@Bücher.example` becomes
/// `Grå@xn--bcher-kva.example`. A quoted local part is written in its
/// shortest form, because `"pat"` and `pat` name the same mailbox (see
/// [`canonical_local_part`]). The domain is split off at the last `@`,
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
    let local_part = canonical_local_part(local_part);
    Ok(format!("{local_part}@{domain}"))
}

/// Rewrites a quoted local part in its shortest equivalent form.
///
/// The quotes of a Quoted-string (RFC 5321 §4.1.2) are no part of the
/// name, and each quoted-pair `\x` is read as `x`. Content that is a valid
/// Dot-string loses its quotes (`"pat"` and `"p\at"` become `pat`). Other
/// content stays quoted, with a backslash only before `"` and `\`. A local
/// part that is not quoted, or whose quotes are malformed, is returned
/// unchanged.
fn canonical_local_part(local_part: &str) -> Cow<'_, str> {
    let Some(content) = unquote(local_part) else {
        return Cow::Borrowed(local_part);
    };
    if is_dot_string(&content) {
        return Cow::Owned(content);
    }
    let mut quoted = String::with_capacity(content.len() + 2);
    quoted.push('"');
    for character in content.chars() {
        if matches!(character, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(character);
    }
    quoted.push('"');
    Cow::Owned(quoted)
}

/// Returns the content of a Quoted-string with its quoted-pairs resolved,
/// or `None` when `text` is not one whole, well-formed Quoted-string.
fn unquote(text: &str) -> Option<String> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    let mut content = String::with_capacity(inner.len());
    let mut characters = inner.chars();
    while let Some(character) = characters.next() {
        match character {
            '\\' => content.push(characters.next()?),
            '"' => return None,
            _ => content.push(character),
        }
    }
    Some(content)
}

/// Checks the RFC 5321 Dot-string form: atoms of atext (with the UTF-8
/// characters that RFC 6531 adds) joined by single dots.
fn is_dot_string(text: &str) -> bool {
    text.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn is_atext(character: char) -> bool {
    character.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(character)
        || !character.is_ascii()
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
    fn normalise_unquotes_needless_quotes() {
        // "user1" and user1 name the same mailbox, so a hard bounce listed
        // for user1@... must also stop "user1"@... at RCPT.
        let cases = [
            ("\"user1\"@B.example", "user1@b.example"),
            ("\"us\\er1\"@b.example", "user1@b.example"),
            ("\"first.last\"@b.example", "first.last@b.example"),
            ("\"Grå\"@b.example", "Grå@b.example"),
            ("\"o'neil+tag\"@b.example", "o'neil+tag@b.example"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalise_address(input).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn normalise_keeps_needed_quotes_minimal() {
        let cases = [
            ("\"a b\"@b.example", "\"a b\"@b.example"),
            ("\"a\\ b\"@b.example", "\"a b\"@b.example"),
            ("\"a..b\"@b.example", "\"a..b\"@b.example"),
            ("\".a\"@b.example", "\".a\"@b.example"),
            ("\"a.\"@b.example", "\"a.\"@b.example"),
            ("\"\"@b.example", "\"\"@b.example"),
            ("\"q,l\"@b.example", "\"q,l\"@b.example"),
            (
                "\"say \\\"hi\\\"\"@b.example",
                "\"say \\\"hi\\\"\"@b.example",
            ),
            ("\"back\\\\slash\"@b.example", "\"back\\\\slash\"@b.example"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalise_address(input).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn normalise_keeps_malformed_quotes_as_given() {
        for input in [
            "\"a\"b\"@b.example",
            "\"a\\\"@b.example",
            "\"@b.example",
            "a\"b@b.example",
        ] {
            assert_eq!(normalise_address(input).as_deref(), Ok(input), "{input}");
        }
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
