//! SMTP vocabulary shared by the server on the submission sockets, the
//! outbound client and the DSN builder.

use std::fmt;

/// An enhanced mail system status code (RFC 3463), such as `5.1.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedStatus {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedStatus {
            class,
            subject,
            detail,
        }
    }

    /// Parses the leading `X.Y.Z` of a reply text, as RFC 2034 §4 places it.
    /// Returns the status and the text after it.
    pub fn parse_prefix(text: &str) -> Option<(EnhancedStatus, &str)> {
        let token_end = text.find(' ').unwrap_or(text.len());
        let token = &text[..token_end];
        let mut parts = token.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        let rest = text[token_end..].trim_start_matches(' ');
        Some((EnhancedStatus::new(class, subject, detail), rest))
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// An SMTP reply: a three-digit code, an optional enhanced status and one or
/// more lines of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<EnhancedStatus>,
    /// The text of each line, without the code, the separator or the
    /// enhanced status.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status.
    pub fn new(code: u16, status: EnhancedStatus, text: impl Into<String>) -> Self {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Writes the reply in wire form: every line but the last uses `code-`,
    /// and every line carries the enhanced status when there is one.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{}", self.code).as_bytes());
            if let Some(status) = self.status {
                out.extend_from_slice(format!(" {status}").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            return;
        }
        for (index, line) in self.lines.iter().enumerate() {
            let separator = if index == last { ' ' } else { '-' };
            let text = match self.status {
                Some(status) if line.is_empty() => format!("{}{separator}{status}", self.code),
                Some(status) => format!("{}{separator}{status} {line}", self.code),
                None => format!("{}{separator}{line}", self.code),
            };
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// The reply as one line of text for logs and DSN `Diagnostic-Code`
    /// fields: every line with its code and status, joined by spaces.
    pub fn to_diagnostic(&self) -> String {
        let mut text = String::new();
        for (index, line) in self.lines.iter().enumerate() {
            if index > 0 {
                text.push(' ');
            }
            text.push_str(&self.code.to_string());
            if let Some(status) = self.status {
                text.push(' ');
                text.push_str(&status.to_string());
            }
            if !line.is_empty() {
                text.push(' ');
                text.push_str(line);
            }
        }
        if self.lines.is_empty() {
            text.push_str(&self.code.to_string());
        }
        text
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_diagnostic())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_multiline_wire_form() {
        let reply = Reply {
            code: 250,
            status: None,
            lines: vec!["mta.example.com".into(), "PIPELINING".into()],
        };
        assert_eq!(
            reply.to_wire(),
            b"250-mta.example.com\r\n250 PIPELINING\r\n"
        );
    }

    #[test]
    fn reply_with_status_on_every_line() {
        let reply = Reply {
            code: 550,
            status: Some(EnhancedStatus::new(5, 1, 1)),
            lines: vec!["no such user".into(), "check the address".into()],
        };
        assert_eq!(
            reply.to_wire(),
            b"550-5.1.1 no such user\r\n550 5.1.1 check the address\r\n"
        );
    }

    #[test]
    fn enhanced_status_prefix() {
        let (status, rest) = EnhancedStatus::parse_prefix("4.7.0 TLS not available").unwrap();
        assert_eq!(status, EnhancedStatus::new(4, 7, 0));
        assert_eq!(rest, "TLS not available");
        assert!(EnhancedStatus::parse_prefix("mx.example.net ESMTP").is_none());
        assert!(EnhancedStatus::parse_prefix("3.1.1 bad class").is_none());
    }
}
