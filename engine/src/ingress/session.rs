//! The SMTP session state machine, free of I/O.
//!
//! Bytes go in with [`Session::push_input`]; [`Session::advance`] runs every
//! complete command and returns when it needs more input, when a message is
//! complete, or when the session ends. Replies collect in an output buffer
//! that the caller writes out when `advance` returns, so the replies to a
//! pipelined group leave in one write once the input is drained
//! (RFC 2920 §3.2).

use std::rc::Rc;
use std::time::SystemTime;

use caduceus_policy::config::IngressConfig;
use caduceus_policy::{Category, Lane};

use super::command::{self, BodyType, Command, MailCommand, RcptCommand, ReturnContent};
use super::data::DataScanner;
use super::headers::{self, ReceivedInfo};
use super::{Admission, PeerCredentials, Ret, Submission, SubmittedRecipient};
use crate::smtp::{EnhancedStatus, Reply};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
pub const MAX_COMMAND_LINE_BYTES: usize = 512;

/// MAIL and RCPT may be longer, because the DSN parameters (ENVID, ORCPT)
/// carry xtext-encoded addresses and RFC 5321 §4.5.3.1.4 lets extensions
/// raise the limit. 500 octets more covers an ORCPT with a full-length
/// address.
pub const MAX_PARAMETER_LINE_BYTES: usize = MAX_COMMAND_LINE_BYTES + 500;

/// Protocol errors (syntax, sequence, unknown commands) a session may make
/// before it is closed with `421 4.7.0`. Rejections by policy and the
/// recipient cap do not count.
pub const MAX_PROTOCOL_ERRORS: u32 = 20;

/// The limits a session enforces.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub max_message_size_bytes: u64,
    pub max_recipients: u32,
    /// The maximum text line length in DATA, CRLF included.
    pub max_line_length_bytes: u32,
    pub max_received_headers: u32,
}

impl From<&IngressConfig> for SessionLimits {
    fn from(config: &IngressConfig) -> Self {
        SessionLimits {
            max_message_size_bytes: config.max_message_size_bytes,
            max_recipients: config.max_recipients,
            max_line_length_bytes: config.max_line_length_bytes,
            max_received_headers: config.max_received_headers,
        }
    }
}

/// The caller's next step after [`Session::advance`].
#[derive(Debug)]
pub enum Progress {
    /// Write out the output, then read more input.
    NeedInput,
    /// Write out the output, make the message durable, then call
    /// [`Session::finish_submission`]. Input is not processed meanwhile.
    Submit(Box<Submission>),
    /// Write out the output and close the connection.
    Close,
}

#[derive(Debug)]
enum Phase {
    Command,
    Data(Box<DataScanner>),
    AwaitingSubmission,
    Closed,
}

/// The client's greeting.
#[derive(Debug)]
struct Client {
    name: String,
    extended: bool,
}

/// The mail transaction started by MAIL.
#[derive(Debug)]
struct Transaction {
    sender: String,
    smtputf8: bool,
    body_8bit: bool,
    envid: Option<String>,
    ret: Option<Ret>,
    recipients: Vec<SubmittedRecipient>,
    /// The message size that MAIL declared with SIZE=, if any.
    declared_size_bytes: Option<u64>,
    /// An estimate of the spool envelope's size so far: the sender and
    /// each accepted recipient with its ORCPT and a fixed overhead.
    envelope_bytes: u64,
    /// Set when DATA starts.
    message_id: [u8; 16],
}

/// Envelope bytes that a spool record spends apart from the addresses:
/// ids, times, flags and framing. An estimate, rounded up.
const ENVELOPE_FIXED_BYTES: u64 = 256;

/// Envelope bytes per recipient beside its address, domain and ORCPT.
/// An estimate, rounded up.
const RECIPIENT_FIXED_BYTES: u64 = 32;

/// The part of the spool's 64 KiB headroom beside the message that the
/// envelope may use. The other 16 KiB are for the headers ingress adds and
/// the record framing.
const ENVELOPE_BUDGET_BYTES: u64 =
    caduceus_policy::config::SPOOL_ENVELOPE_HEADROOM_BYTES - 16 * 1024;

fn recipient_envelope_bytes(recipient: &SubmittedRecipient) -> u64 {
    (recipient.address.len()
        + recipient.domain.len()
        + recipient.orcpt.as_ref().map_or(0, String::len)) as u64
        + RECIPIENT_FIXED_BYTES
}

/// One SMTP session on a submission socket.
#[derive(Debug)]
pub struct Session {
    lane: Lane,
    default_category: Category,
    hostname: Rc<str>,
    peer: PeerCredentials,
    limits: SessionLimits,
    phase: Phase,
    input: Vec<u8>,
    /// Bytes of `input` before this index are processed.
    input_start: usize,
    output: Vec<u8>,
    client: Option<Client>,
    transaction: Option<Transaction>,
    protocol_errors: u32,
    /// An over-long command line is being skipped up to its CRLF.
    skipping_long_line: bool,
}

fn reply(code: u16, class: u8, subject: u16, detail: u16, text: &str) -> Reply {
    Reply::new(code, EnhancedStatus::new(class, subject, detail), text)
}

fn bad_sequence(text: &str) -> Reply {
    reply(503, 5, 5, 1, text)
}

impl Session {
    /// Starts a session and queues the 220 greeting. RFC 2034 §3 exempts
    /// the greeting and the EHLO and HELO replies from enhanced status
    /// codes, and RFC 3463 defines none for 3xx replies such as 354, so only
    /// those replies carry none.
    pub fn new(
        lane: Lane,
        default_category: Category,
        hostname: Rc<str>,
        peer: PeerCredentials,
        limits: SessionLimits,
    ) -> Session {
        let mut session = Session {
            lane,
            default_category,
            hostname,
            peer,
            limits,
            phase: Phase::Command,
            input: Vec::new(),
            input_start: 0,
            output: Vec::new(),
            client: None,
            transaction: None,
            protocol_errors: 0,
            skipping_long_line: false,
        };
        let greeting = Reply {
            code: 220,
            status: None,
            lines: vec![format!("{} ESMTP Caduceus", session.hostname)],
        };
        session.send(&greeting);
        session
    }

    /// Appends received bytes.
    pub fn push_input(&mut self, bytes: &[u8]) {
        if self.input_start > 0 {
            self.input.drain(..self.input_start);
            self.input_start = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Replies queued since the last call, in wire form.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Returns whether the session is inside DATA, where shutdown waits for the
    /// message to end.
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::AwaitingSubmission)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Queues a final reply, such as `421` on a timeout or shutdown, and
    /// ends the session.
    pub fn close_with(&mut self, final_reply: &Reply) {
        if !self.is_closed() {
            self.send(final_reply);
            self.phase = Phase::Closed;
        }
    }

    fn send(&mut self, reply: &Reply) {
        reply.write_to(&mut self.output);
    }

    fn protocol_error(&mut self, error: &Reply) {
        self.send(error);
        self.protocol_errors += 1;
        if self.protocol_errors >= MAX_PROTOCOL_ERRORS {
            tracing::info!(
                lane = self.lane.as_str(),
                uid = self.peer.uid,
                pid = self.peer.pid,
                errors = self.protocol_errors,
                "ingress: session closed after too many protocol errors"
            );
            self.close_with(&reply(421, 4, 7, 0, "Too many errors, closing connection"));
        }
    }

    /// Processes buffered input until more is needed, a message is
    /// complete or the session ends.
    pub fn advance<A: Admission>(&mut self, admission: &A, now: SystemTime) -> Progress {
        loop {
            match &mut self.phase {
                Phase::Closed => return Progress::Close,
                // The caller owes `finish_submission`; nothing runs before it.
                Phase::AwaitingSubmission => return Progress::NeedInput,
                Phase::Data(scanner) => {
                    let consumed = scanner.scan(&self.input[self.input_start..]);
                    self.input_start += consumed;
                    if !scanner.is_finished() {
                        return Progress::NeedInput;
                    }
                    if let Some(submission) = self.finish_data(now) {
                        return Progress::Submit(submission);
                    }
                }
                Phase::Command => {
                    let Some(line) = self.next_command_line() else {
                        return Progress::NeedInput;
                    };
                    if let Some(line) = line {
                        self.run_command_line(&line, admission);
                    }
                }
            }
        }
    }

    /// Takes the next complete command line. Returns `None` when more input
    /// is needed and `Some(None)` when a line was consumed and already
    /// rejected (an over-long line).
    fn next_command_line(&mut self) -> Option<Option<Vec<u8>>> {
        let pending = &self.input[self.input_start..];
        let crlf = pending.windows(2).position(|pair| pair == b"\r\n");
        if self.skipping_long_line {
            match crlf {
                Some(position) => {
                    self.input_start += position + 2;
                    self.skipping_long_line = false;
                    self.protocol_error(&reply(500, 5, 5, 2, "Syntax error: line too long"));
                    return Some(None);
                }
                None => {
                    // Keep a trailing CR, which may be the first half of CRLF.
                    let keep = usize::from(pending.last() == Some(&b'\r'));
                    self.input_start += pending.len() - keep;
                    return None;
                }
            }
        }
        match crlf {
            Some(position) if position + 2 <= MAX_PARAMETER_LINE_BYTES => {
                let line = pending[..position].to_vec();
                self.input_start += position + 2;
                Some(Some(line))
            }
            Some(position) => {
                self.input_start += position + 2;
                self.protocol_error(&reply(500, 5, 5, 2, "Syntax error: line too long"));
                Some(None)
            }
            None if pending.len() >= MAX_PARAMETER_LINE_BYTES => {
                self.skipping_long_line = true;
                Some(None)
            }
            None => None,
        }
    }

    fn run_command_line<A: Admission>(&mut self, line: &[u8], admission: &A) {
        // RFC 5321 §2.3.8: CR and LF only occur together, as the line end.
        if line.iter().any(|byte| matches!(byte, b'\r' | b'\n')) {
            self.protocol_error(&reply(
                500,
                5,
                5,
                2,
                "Syntax error: bare CR or LF in command line",
            ));
            return;
        }
        let verb_end = line
            .iter()
            .position(|byte| *byte == b' ')
            .unwrap_or(line.len());
        let verb = &line[..verb_end];
        let may_be_long = verb.eq_ignore_ascii_case(b"MAIL") || verb.eq_ignore_ascii_case(b"RCPT");
        if !may_be_long && line.len() + 2 > MAX_COMMAND_LINE_BYTES {
            self.protocol_error(&reply(500, 5, 5, 2, "Syntax error: line too long"));
            return;
        }
        let smtputf8 = self.transaction.as_ref().is_some_and(|t| t.smtputf8);
        match command::parse_command(line, smtputf8) {
            Ok(command) => self.run_command(command, admission),
            Err(error) => self.protocol_error(&error),
        }
    }

    fn run_command<A: Admission>(&mut self, command: Command, admission: &A) {
        match command {
            Command::Ehlo(name) => self.greet(name, true),
            Command::Helo(name) => self.greet(name, false),
            Command::Mail(mail) => self.start_transaction(mail, admission),
            Command::Rcpt(rcpt) => self.add_recipient(rcpt, admission),
            Command::Data => self.start_data(),
            Command::Rset => {
                self.transaction = None;
                self.send(&reply(250, 2, 0, 0, "Ok"));
            }
            Command::Noop => self.send(&reply(250, 2, 0, 0, "Ok")),
            // RFC 5321 §3.5.3: 252 when the server does not verify.
            Command::Vrfy => self.send(&reply(
                252,
                2,
                1,
                5,
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Help => self.send(&reply(
                214,
                2,
                0,
                0,
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            )),
            Command::Quit => {
                self.send(&reply(221, 2, 0, 0, "Bye"));
                self.phase = Phase::Closed;
            }
            Command::NotImplemented(_) => {
                self.protocol_error(&reply(502, 5, 5, 1, "Command not implemented"));
            }
        }
    }

    /// RFC 5321 §4.1.4: EHLO and HELO also reset any transaction.
    fn greet(&mut self, name: String, extended: bool) {
        self.transaction = None;
        let greeting = if extended {
            Reply {
                code: 250,
                status: None,
                lines: vec![
                    self.hostname.to_string(),
                    "PIPELINING".into(),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    format!("SIZE {}", self.limits.max_message_size_bytes),
                    "ENHANCEDSTATUSCODES".into(),
                    "DSN".into(),
                ],
            }
        } else {
            Reply {
                code: 250,
                status: None,
                lines: vec![self.hostname.to_string()],
            }
        };
        self.send(&greeting);
        self.client = Some(Client { name, extended });
    }

    fn start_transaction<A: Admission>(&mut self, mail: MailCommand, admission: &A) {
        let Some(client) = &self.client else {
            self.protocol_error(&bad_sequence("Send EHLO or HELO first"));
            return;
        };
        if self.transaction.is_some() {
            self.protocol_error(&bad_sequence("Nested MAIL command"));
            return;
        }
        let has_parameters = mail.declared_size_bytes.is_some()
            || mail.body.is_some()
            || mail.smtputf8
            || mail.ret.is_some()
            || mail.envid.is_some();
        if has_parameters && !client.extended {
            // RFC 5321 §4.1.1.11: parameters need the EHLO extensions.
            self.protocol_error(&reply(555, 5, 5, 4, "Parameters need EHLO"));
            return;
        }
        if mail
            .declared_size_bytes
            .is_some_and(|size| size > self.limits.max_message_size_bytes)
        {
            // RFC 1870 §6.1.
            self.send(&reply(
                552,
                5,
                3,
                4,
                "Message size exceeds fixed maximum message size",
            ));
            return;
        }
        if let Err(refusal) = admission.admit_mail(self.lane) {
            self.send(&refusal);
            return;
        }
        let sender = mail
            .sender
            .map(|mailbox| mailbox.address)
            .unwrap_or_default();
        let envelope_bytes = ENVELOPE_FIXED_BYTES + sender.len() as u64;
        self.transaction = Some(Transaction {
            sender,
            smtputf8: mail.smtputf8,
            body_8bit: mail.body == Some(BodyType::EightBitMime),
            envid: mail.envid,
            ret: mail.ret.map(|ret| match ret {
                ReturnContent::Full => Ret::Full,
                ReturnContent::Headers => Ret::Headers,
            }),
            recipients: Vec::new(),
            declared_size_bytes: mail.declared_size_bytes,
            envelope_bytes,
            message_id: [0; 16],
        });
        self.send(&reply(250, 2, 1, 0, "Ok"));
    }

    fn add_recipient<A: Admission>(&mut self, rcpt: RcptCommand, admission: &A) {
        let Some(transaction) = &mut self.transaction else {
            self.protocol_error(&bad_sequence("Need MAIL before RCPT"));
            return;
        };
        let has_parameters = rcpt.notify != 0 || rcpt.orcpt.is_some();
        if has_parameters && !self.client.as_ref().is_some_and(|client| client.extended) {
            self.protocol_error(&reply(555, 5, 5, 4, "Parameters need EHLO"));
            return;
        }
        // RFC 5321 §4.5.3.1.10: a server at its recipient limit replies
        // 452, and the client sends the rest in another transaction. The
        // recipients past the cap are never stored, so memory stays bounded.
        if transaction.recipients.len() >= self.limits.max_recipients as usize {
            let cap = reply(452, 4, 5, 3, "Too many recipients");
            self.send(&cap);
            return;
        }
        let recipient = SubmittedRecipient {
            address: rcpt.recipient.address,
            domain: rcpt.recipient.domain,
            notify: rcpt.notify,
            orcpt: rcpt.orcpt,
        };
        // A message of the declared size must still fit in one spool
        // segment with its envelope, or it would get 552 after its content.
        let envelope_bytes = transaction.envelope_bytes + recipient_envelope_bytes(&recipient);
        if let Some(declared) = transaction.declared_size_bytes
            && declared.saturating_add(envelope_bytes)
                > self
                    .limits
                    .max_message_size_bytes
                    .saturating_add(ENVELOPE_BUDGET_BYTES)
        {
            self.send(&reply(
                452,
                4,
                5,
                3,
                "Too many recipients for a message of the declared size",
            ));
            return;
        }
        let sender = transaction.sender.as_str();
        match admission.admit_rcpt(self.lane, self.default_category, sender, &recipient) {
            Ok(()) => {
                transaction.envelope_bytes = envelope_bytes;
                transaction.recipients.push(recipient);
                self.send(&reply(250, 2, 1, 5, "Ok"));
            }
            Err(refusal) => self.send(&refusal),
        }
    }

    fn start_data(&mut self) {
        let Some(transaction) = &mut self.transaction else {
            self.protocol_error(&bad_sequence("Need MAIL before DATA"));
            return;
        };
        if transaction.recipients.is_empty() {
            // RFC 5321 §3.3: DATA without any accepted recipient.
            self.send(&reply(554, 5, 5, 1, "No valid recipients"));
            return;
        }
        transaction.message_id = rand::random();
        let go_ahead = Reply {
            code: 354,
            status: None,
            lines: vec!["End data with <CR><LF>.<CR><LF>".into()],
        };
        self.send(&go_ahead);
        self.phase = Phase::Data(Box::new(DataScanner::new(
            self.limits.max_message_size_bytes,
            self.limits.max_line_length_bytes,
        )));
    }

    /// Ends DATA: returns the submission, or queues the rejection and
    /// returns `None`.
    fn finish_data(&mut self, now: SystemTime) -> Option<Box<Submission>> {
        let phase = std::mem::replace(&mut self.phase, Phase::Command);
        let Phase::Data(scanner) = phase else {
            unreachable!("finish_data runs only in the DATA phase");
        };
        // The MAIL that started DATA created the transaction, and only the
        // end of this message or a new greeting clears it.
        let transaction = self
            .transaction
            .take()
            .expect("DATA runs inside a transaction");
        let queue_id_hex = hex::encode(transaction.message_id);

        let message = match scanner.into_result() {
            Ok(message) => message,
            Err(problem) => {
                tracing::info!(
                    lane = self.lane.as_str(),
                    message_id = %queue_id_hex,
                    uid = self.peer.uid,
                    pid = self.peer.pid,
                    problem = ?problem,
                    "ingress: message rejected after DATA"
                );
                self.send(&problem.reply());
                return None;
            }
        };

        // MAIL is rejected before a greeting, so a transaction implies one.
        let client = self.client.as_ref().expect("DATA requires a greeting");
        let protocol = match (client.extended, transaction.smtputf8) {
            (true, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, _) => "SMTP",
        };
        let received = ReceivedInfo {
            helo: &client.name,
            protocol,
            uid: self.peer.uid,
            pid: self.peer.pid,
            hostname: &self.hostname,
            queue_id_hex: &queue_id_hex,
        };
        let prepared = match headers::prepare_message(
            &message,
            &received,
            self.limits.max_received_headers,
            now,
        ) {
            Ok(prepared) => prepared,
            Err(rejection) => {
                tracing::info!(
                    lane = self.lane.as_str(),
                    message_id = %queue_id_hex,
                    uid = self.peer.uid,
                    pid = self.peer.pid,
                    code = rejection.code,
                    "ingress: message rejected by header checks"
                );
                self.send(&rejection);
                return None;
            }
        };

        let category = prepared.category_override.unwrap_or(self.default_category);
        if prepared
            .category_override
            .is_some_and(|c| c != self.default_category)
        {
            tracing::debug!(
                lane = self.lane.as_str(),
                message_id = %queue_id_hex,
                category = category.as_str(),
                "ingress: category set by header"
            );
        }

        let helo = client.name.clone();
        self.phase = Phase::AwaitingSubmission;
        Some(Box::new(Submission {
            message_id: transaction.message_id,
            lane: self.lane,
            category,
            sender: transaction.sender,
            recipients: transaction.recipients,
            envid: transaction.envid,
            ret: transaction.ret,
            body_8bit: transaction.body_8bit,
            smtputf8: transaction.smtputf8,
            body: prepared.body,
            peer: self.peer,
            helo,
        }))
    }

    /// Queues the reply to the final dot once the engine's submit finished.
    pub fn finish_submission(&mut self, message_id: [u8; 16], result: Result<(), Reply>) {
        debug_assert!(matches!(self.phase, Phase::AwaitingSubmission));
        match result {
            Ok(()) => {
                let text = format!("Ok: queued as {}", hex::encode(message_id));
                self.send(&reply(250, 2, 0, 0, &text));
            }
            Err(refusal) => self.send(&refusal),
        }
        if matches!(self.phase, Phase::AwaitingSubmission) {
            self.phase = Phase::Command;
        }
    }
}

#[cfg(test)]
mod tests;
