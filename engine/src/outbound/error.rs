//! Session errors, classified by who is at fault.

use std::fmt;

use crate::smtp::{EnhancedStatus, Reply};

/// The step of the session at which an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    TlsHandshake,
    Mail,
    Rcpt,
    Data,
    /// Writing the message content after the 354.
    DataBody,
    /// Waiting for the reply to the final dot.
    DataDone,
    Rset,
    Quit,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::StartTls => "STARTTLS",
            Stage::TlsHandshake => "TLS handshake",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::DataBody => "message content",
            Stage::DataDone => "end of data",
            Stage::Rset => "RSET",
            Stage::Quit => "QUIT",
        }
    }

    /// True for the steps before the first MAIL, where another MX host may
    /// do better.
    fn before_transaction(self) -> bool {
        matches!(
            self,
            Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::StartTls | Stage::TlsHandshake
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure of a session with an MX host.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SessionError {
    /// The server replied with an error where the session cannot continue:
    /// a 421 or 5xx greeting, EHLO and HELO both refused, or a 421 in the
    /// middle of a transaction (RFC 5321 §3.8).
    #[error("remote rejected the session at {stage}: {reply}")]
    RemoteRejected { stage: Stage, reply: Reply },
    /// The server broke the protocol: an unparseable reply, or plaintext
    /// sent after its 220 to STARTTLS (the STARTTLS injection pattern).
    #[error("remote misbehaved at {stage}: {detail}")]
    RemoteMisbehaved { stage: Stage, detail: String },
    /// The server cannot meet the TLS policy: STARTTLS is required but not
    /// offered, refused, or its handshake failed.
    #[error("remote incompatible with TLS policy: {detail}")]
    RemoteIncompatible {
        /// False when the server did not offer STARTTLS at all.
        starttls_offered: bool,
        detail: String,
    },
    /// The STARTTLS handshake failed under an opportunistic mode, so the
    /// delivery is deferred rather than sent in cleartext.
    #[error("TLS handshake failed: {detail}")]
    TlsHandshake { detail: String },
    /// A local failure, such as binding the source address.
    #[error("local error at {stage}: {detail}")]
    Local { stage: Stage, detail: String },
    #[error("timed out at {stage}")]
    Timeout { stage: Stage },
    /// The TCP connection failed or closed.
    #[error("connection lost at {stage}: {detail}")]
    ConnectionLost { stage: Stage, detail: String },
    /// A pooled connection turned out to be closed by the server while idle
    /// (a 421 or EOF in reply to RSET). The caller reconnects without
    /// counting a delivery attempt.
    #[error("pooled connection was closed by the server while idle")]
    Stale,
}

impl SessionError {
    /// Returns a reply to record in logs and DSNs, synthesized where the
    /// server sent none. Codes follow RFC 3463: X.4.1 no reply from host,
    /// X.4.2 bad connection,
    /// X.7.4 security feature missing, X.7.5 cryptographic failure.
    pub fn reply(&self) -> Reply {
        match self {
            SessionError::RemoteRejected { reply, .. } => reply.clone(),
            SessionError::RemoteMisbehaved { stage, .. } => Reply::new(
                451,
                EnhancedStatus::new(4, 5, 0),
                format!("protocol error from remote server at {stage}"),
            ),
            SessionError::RemoteIncompatible {
                starttls_offered,
                detail,
            } => {
                let status = if *starttls_offered {
                    EnhancedStatus::new(4, 7, 5)
                } else {
                    EnhancedStatus::new(4, 7, 4)
                };
                Reply::new(451, status, format!("TLS required: {detail}"))
            }
            SessionError::TlsHandshake { detail } => Reply::new(
                451,
                EnhancedStatus::new(4, 7, 5),
                format!("TLS handshake failed: {detail}"),
            ),
            SessionError::Local { stage, .. } => Reply::new(
                451,
                EnhancedStatus::new(4, 3, 0),
                format!("local error at {stage}"),
            ),
            SessionError::Timeout {
                stage: Stage::Connect,
            } => Reply::new(451, EnhancedStatus::new(4, 4, 1), "no answer from host"),
            SessionError::Timeout { stage } => Reply::new(
                451,
                EnhancedStatus::new(4, 4, 2),
                format!("timeout waiting for reply to {stage}"),
            ),
            SessionError::ConnectionLost {
                stage: Stage::Connect,
                ..
            } => Reply::new(
                451,
                EnhancedStatus::new(4, 4, 1),
                "connection to host failed",
            ),
            SessionError::ConnectionLost { stage, .. } => Reply::new(
                451,
                EnhancedStatus::new(4, 4, 2),
                format!("connection lost after {stage}"),
            ),
            SessionError::Stale => Reply::new(
                451,
                EnhancedStatus::new(4, 4, 2),
                "pooled connection closed by remote server",
            ),
        }
    }

    /// True when another MX host of the destination should be tried now
    /// (RFC 5321 §5.1): the failure happened before any transaction began,
    /// and it concerns this host, not the message or the local system.
    pub fn try_next_mx(&self) -> bool {
        match self {
            SessionError::RemoteRejected { stage, .. }
            | SessionError::RemoteMisbehaved { stage, .. }
            | SessionError::Timeout { stage }
            | SessionError::ConnectionLost { stage, .. } => stage.before_transaction(),
            SessionError::RemoteIncompatible { .. } | SessionError::TlsHandshake { .. } => true,
            SessionError::Local { .. } | SessionError::Stale => false,
        }
    }

    /// True when the server refused the session with a 5xx to the greeting
    /// or to EHLO and HELO (RFC 5321 §4.2.1: 5xx is a permanent negative
    /// reply). The caller still tries the remaining MX hosts first, because
    /// `try_next_mx()` is also true. When none is left, a permanent error
    /// fails the recipients instead of deferring them.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SessionError::RemoteRejected {
                stage: Stage::Greeting | Stage::Ehlo,
                reply,
            } if reply.is_permanent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(stage: Stage, code: u16) -> SessionError {
        SessionError::RemoteRejected {
            stage,
            reply: Reply::new(code, EnhancedStatus::new((code / 100) as u8, 0, 0), "no"),
        }
    }

    #[test]
    fn error_classification() {
        let greeting_421 = rejected(Stage::Greeting, 421);
        assert!(greeting_421.try_next_mx());
        assert!(!greeting_421.is_permanent());

        let ehlo_550 = rejected(Stage::Ehlo, 550);
        assert!(ehlo_550.try_next_mx());
        assert!(ehlo_550.is_permanent());

        let rcpt_421 = rejected(Stage::Rcpt, 421);
        assert!(!rcpt_421.try_next_mx());
        assert!(!rcpt_421.is_permanent());
        assert_eq!(rcpt_421.reply().code, 421);

        assert!(!SessionError::Stale.try_next_mx());
        let local = SessionError::Local {
            stage: Stage::Connect,
            detail: "bind failed".into(),
        };
        assert!(!local.try_next_mx());
        assert_eq!(local.reply().status, Some(EnhancedStatus::new(4, 3, 0)));
    }

    #[test]
    fn synthesized_replies_are_transient() {
        let lost = SessionError::ConnectionLost {
            stage: Stage::DataDone,
            detail: "reset".into(),
        };
        let reply = lost.reply();
        assert_eq!(reply.code, 451);
        assert_eq!(reply.status, Some(EnhancedStatus::new(4, 4, 2)));
        assert_eq!(
            reply.to_diagnostic(),
            "451 4.4.2 connection lost after end of data"
        );

        let timeout = SessionError::Timeout {
            stage: Stage::Connect,
        };
        assert_eq!(timeout.reply().status, Some(EnhancedStatus::new(4, 4, 1)));
        assert!(timeout.try_next_mx());

        let incompatible = SessionError::RemoteIncompatible {
            starttls_offered: false,
            detail: "STARTTLS not offered".into(),
        };
        assert_eq!(
            incompatible.reply().status,
            Some(EnhancedStatus::new(4, 7, 4))
        );
        assert!(incompatible.try_next_mx());
        assert!(!incompatible.is_permanent());
    }
}
