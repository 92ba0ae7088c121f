//! The outbound SMTP client: one connection to one MX host, STARTTLS per the
//! destination's TLS mode, and SMTP transactions with per-recipient results.
//!
//! Each glommio executor owns its connections and its [`TlsContext`]; nothing
//! here is shared between cores. The rules this client follows on the wire
//! are listed in docs/outbound.md.

mod body;
mod connection;
mod error;
mod io;
mod reply;
mod tls;
mod transaction;

#[cfg(test)]
mod tests;

pub use body::{MAX_LINE_OCTETS, xtext};
pub use connection::{ConnectParams, Connection, TlsInfo};
pub use error::{SessionError, Stage};
pub use reply::Capabilities;
pub use tls::{AEAD_CIPHER_SUITES, TlsContext, TlsSetupError};

use crate::smtp::Reply;

/// The DSN `RET` parameter and the `NOTIFY` bits are the spool's own types,
/// so a spooled envelope maps onto [`OutboundMessage`] without conversion.
pub use caduceus_spool::{Ret, notify};

/// One message to send over a connection.
#[derive(Clone, Copy, Debug)]
pub struct OutboundMessage<'a> {
    /// The reverse-path without angle brackets; empty for the null sender.
    pub sender: &'a str,
    pub recipients: &'a [OutboundRecipient<'a>],
    /// The message as spooled: header and body, CRLF line ends, not
    /// dot-stuffed.
    pub body: &'a [u8],
    /// True when the body has octets above 0x7F. The client also scans the
    /// body itself, so a wrong `false` cannot put 8-bit data on the wire.
    pub body_8bit: bool,
    /// True when the message needs SMTPUTF8 (RFC 6531), for example for
    /// UTF-8 header fields. Non-ASCII addresses are detected by the client.
    pub smtputf8: bool,
    /// The `ENVID` given at submission, decoded (not xtext).
    pub envid: Option<&'a str>,
    pub ret: Option<Ret>,
}

/// One recipient of an [`OutboundMessage`].
#[derive(Clone, Copy, Debug)]
pub struct OutboundRecipient<'a> {
    /// The path text without angle brackets, exactly as it is to appear on
    /// the wire, such as `"odd user"@example.net`.
    pub address: &'a str,
    /// A combination of the [`notify`] bits.
    pub notify: u8,
    /// The `ORCPT` given at submission, decoded: `type;address`, or just the
    /// address, which is then sent as type `rfc822`.
    pub orcpt: Option<&'a str>,
}

/// The outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientResult {
    /// The server accepted the message for this recipient; the reply is the
    /// one to the final dot.
    Delivered(Reply),
    /// Retry later. The reply is the server's, or a synthesized one when the
    /// connection failed.
    Transient(Reply),
    /// Do not retry; the reply goes into the DSN.
    Permanent(Reply),
}

impl RecipientResult {
    pub fn reply(&self) -> &Reply {
        match self {
            RecipientResult::Delivered(reply)
            | RecipientResult::Transient(reply)
            | RecipientResult::Permanent(reply) => reply,
        }
    }

    /// Classifies the reply to the final dot: 2xx delivered, 5xx permanent,
    /// anything else (4xx, or a 3xx that has no meaning here) transient.
    fn from_final_reply(reply: Reply) -> RecipientResult {
        if reply.code / 100 == 2 {
            RecipientResult::Delivered(reply)
        } else {
            RecipientResult::rejected(reply)
        }
    }

    /// Classifies a reply that refused MAIL, RCPT or DATA: 5xx permanent,
    /// anything else transient.
    fn rejected(reply: Reply) -> RecipientResult {
        if reply.is_permanent() {
            RecipientResult::Permanent(reply)
        } else {
            RecipientResult::Transient(reply)
        }
    }
}
