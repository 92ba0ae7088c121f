//! SMTP transactions: MAIL, RCPT, DATA (RFC 5321 §3.3), with PIPELINING
//! (RFC 2920), CHUNKING (RFC 3030), DSN parameters (RFC 3461), 8BITMIME
//! (RFC 6152), SMTPUTF8 (RFC 6531) and SIZE (RFC 1870).

use std::time::Duration;

use super::body::{self, PreparedBody};
use super::connection::Connection;
use super::error::{SessionError, Stage};
use super::{OutboundMessage, OutboundRecipient, RecipientResult, Ret, notify};
use crate::smtp::{EnhancedStatus, Reply};

/// RCPT commands written before their replies are read. RFC 5321
/// §4.5.3.1.8 makes servers accept at least 100 recipients per transaction,
/// and a bounded group keeps the unread replies within socket buffers so
/// neither side blocks on a full buffer (RFC 2920 §3.5).
const RCPT_GROUP_SIZE: usize = 100;

/// Options for a transaction's first pipelined group.
#[derive(Clone, Copy, Default)]
struct FirstGroup {
    /// Lead with RSET, to check a pooled connection (see
    /// [`Connection::check_stale_on_send`]).
    rset: bool,
}

/// The replies to a transaction's MAIL, RCPTs and, when it was pipelined
/// with them, DATA.
struct Replies {
    mail: Reply,
    rcpts: Vec<Reply>,
    data: Option<Reply>,
}

/// Bytes of message content gathered before a write. Larger body slices
/// bypass the buffer and are written in place.
const DATA_WRITE_BYTES: usize = 64 * 1024;

/// How long to look for a reply after a write failed during DATA. The
/// server usually sent a 421 just before it closed.
const LATE_REPLY_WAIT: Duration = Duration::from_secs(2);

impl Connection {
    /// Sends `message` to its recipients over this connection, in one or
    /// more transactions, and returns one result per recipient, in order.
    ///
    /// A server at its recipient limit replies `452`, or `552` with X.5.3 or
    /// "too many recipients" (RFC 5321 §4.5.3.1.10). When that happens after
    /// some RCPTs were accepted, DATA completes for the accepted ones. Then a
    /// new transaction after RSET carries the rest, so each recipient gets
    /// one copy.
    ///
    /// When the session fails midway (421, timeout, lost connection), every
    /// recipient without a final reply becomes `Transient` with the 421 or a
    /// synthesized 4.4.x reply, the results are still returned, and the
    /// connection is marked unusable. `Err` is returned only when the
    /// connection was already unusable before the call.
    pub async fn send(
        &mut self,
        message: &OutboundMessage<'_>,
    ) -> Result<Vec<RecipientResult>, SessionError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let mut results: Vec<Option<RecipientResult>> = vec![None; message.recipients.len()];
        let use_smtputf8 = self.check_addresses(message, &mut results);

        let prepared = match body::prepare(message.body, self.capabilities.eight_bit_mime) {
            Ok(prepared) => prepared,
            Err(reply) => return Ok(fill_undecided(results, &reply, RecipientResult::Permanent)),
        };
        if let Some(limit) = self.capabilities.size_limit_bytes
            && limit > 0
            && prepared.bytes.len() as u64 > limit
        {
            let reply = Reply::new(
                552,
                EnhancedStatus::new(5, 3, 4),
                format!(
                    "message size {} octets exceeds the server's limit of {limit}",
                    prepared.bytes.len()
                ),
            );
            return Ok(fill_undecided(results, &reply, RecipientResult::Permanent));
        }

        let mut pending: Vec<usize> = (0..results.len())
            .filter(|&index| results[index].is_none())
            .collect();
        // A pooled connection is checked by an RSET of its own unless the
        // RSET can lead the first pipelined group.
        let mut rset_first = std::mem::take(&mut self.check_stale);
        if rset_first && (!self.capabilities.pipelining || self.needs_rset) {
            if self.reset().await.is_err() {
                self.failed = Some(SessionError::Stale);
                return Err(SessionError::Stale);
            }
            self.needs_rset = false;
            rset_first = false;
        }
        let mut completed_transaction = false;
        let mut first = true;
        while !pending.is_empty() {
            if (!first || self.needs_rset)
                && let Err(error) = self.rset_between_transactions().await
            {
                return Ok(self.fail_session(error, results));
            }
            first = false;
            self.needs_rset = true;
            let group = FirstGroup {
                rset: std::mem::take(&mut rset_first),
            };
            match self
                .transaction(
                    message,
                    &prepared,
                    &pending,
                    use_smtputf8,
                    group,
                    &mut results,
                )
                .await
            {
                Ok(outcome) => {
                    completed_transaction |= outcome.data_completed;
                    self.needs_rset = !outcome.data_completed;
                    if outcome.over_limit.len() == pending.len() {
                        // No recipient was accepted, so another transaction
                        // cannot make progress on this connection.
                        let reply = outcome.limit_reply.unwrap_or_else(undecided_reply);
                        for &index in &outcome.over_limit {
                            results[index] = Some(RecipientResult::Transient(reply.clone()));
                        }
                        break;
                    }
                    pending = outcome.over_limit;
                }
                Err(SessionError::Stale) => {
                    self.failed = Some(SessionError::Stale);
                    return Err(SessionError::Stale);
                }
                Err(error) => return Ok(self.fail_session(error, results)),
            }
        }
        if completed_transaction {
            self.messages_sent = self.messages_sent.saturating_add(1);
        }
        Ok(results
            .into_iter()
            .map(|result| {
                // Every path above decides each pending recipient or breaks
                // after deciding the rest, so none is left undecided.
                result.unwrap_or_else(|| RecipientResult::Transient(undecided_reply()))
            })
            .collect())
    }

    /// Applies the SMTPUTF8 rules of RFC 6531 §3.4 and the command-line
    /// rules of RFC 5321 §2.3.8, deciding recipients that cannot be sent.
    /// Returns whether MAIL carries the SMTPUTF8 parameter.
    fn check_addresses(
        &self,
        message: &OutboundMessage<'_>,
        results: &mut [Option<RecipientResult>],
    ) -> bool {
        let invalid = |address: &str| address.bytes().any(|byte| byte.is_ascii_control());
        if invalid(message.sender) {
            let reply = Reply::new(
                501,
                EnhancedStatus::new(5, 1, 7),
                "sender address contains control characters",
            );
            results.fill(Some(RecipientResult::Permanent(reply)));
            return false;
        }
        let needs_smtputf8 = message.smtputf8
            || !message.sender.is_ascii()
            || message.recipients.iter().any(|r| !r.address.is_ascii());
        let offered = self.capabilities.smtputf8;
        let no_utf8_reply = |what: &str| {
            Reply::new(
                553,
                EnhancedStatus::new(5, 6, 7),
                format!(
                    "non-ASCII {what} address not permitted: the server does not offer SMTPUTF8"
                ),
            )
        };
        if !offered && !message.sender.is_ascii() {
            results.fill(Some(RecipientResult::Permanent(no_utf8_reply("sender"))));
            return false;
        }
        for (recipient, result) in message.recipients.iter().zip(results.iter_mut()) {
            if invalid(recipient.address) {
                *result = Some(RecipientResult::Permanent(Reply::new(
                    501,
                    EnhancedStatus::new(5, 1, 3),
                    "recipient address contains control characters",
                )));
            } else if !offered && !recipient.address.is_ascii() {
                // RFC 6531 §3.4: never rewrite the local part (no punycode);
                // the recipient fails with X.6.7 instead.
                *result = Some(RecipientResult::Permanent(no_utf8_reply("recipient")));
            }
        }
        needs_smtputf8 && offered
    }

    /// Marks the connection failed and turns every undecided recipient
    /// into `Transient` with the error's reply.
    fn fail_session(
        &mut self,
        error: SessionError,
        results: Vec<Option<RecipientResult>>,
    ) -> Vec<RecipientResult> {
        tracing::info!(
            mx_host = %self.remote_host,
            addr = %self.remote_addr,
            %error,
            "session failed during a transaction; undecided recipients deferred"
        );
        let reply = error.reply();
        self.failed = Some(error);
        fill_undecided(results, &reply, RecipientResult::Transient)
    }

    async fn rset_between_transactions(&mut self) -> Result<(), SessionError> {
        let reply = self.command(b"RSET\r\n", Stage::Rset).await?;
        if reply.code == 250 {
            Ok(())
        } else {
            Err(SessionError::RemoteRejected {
                stage: Stage::Rset,
                reply,
            })
        }
    }

    /// Runs one transaction for the recipients in `pending`.
    async fn transaction(
        &mut self,
        message: &OutboundMessage<'_>,
        prepared: &PreparedBody<'_>,
        pending: &[usize],
        use_smtputf8: bool,
        group: FirstGroup,
        results: &mut [Option<RecipientResult>],
    ) -> Result<TransactionOutcome, SessionError> {
        let mail = self.mail_command(message, prepared, use_smtputf8);
        let rcpts: Vec<Vec<u8>> = pending
            .iter()
            .map(|&index| self.rcpt_command(&message.recipients[index]))
            .collect();
        if self.capabilities.chunking
            && self.capabilities.pipelining
            && rcpts.len() <= RCPT_GROUP_SIZE
        {
            let outcome = self
                .chunked_transaction(&mail, &rcpts, &prepared.bytes, group, pending, results)
                .await;
            return self.keep_rejections_before_close(outcome, pending, results);
        }
        let replies = self.mail_and_rcpt(&mail, &rcpts, group).await;
        let replies = self.keep_rejections_before_close(replies, pending, results)?;
        let Replies {
            mail: mail_reply,
            rcpts: rcpt_replies,
            data: data_reply,
        } = replies;

        let mut outcome = TransactionOutcome::default();
        if mail_reply.code / 100 != 2 {
            self.abandon_data(data_reply).await?;
            reject_all(mail_reply, pending, results);
            return Ok(outcome);
        }

        let accepted = sort_rcpt_replies(pending, rcpt_replies, &mut outcome, results);
        if accepted.is_empty() {
            self.abandon_data(data_reply).await?;
            return Ok(outcome);
        }

        let reply = match data_reply {
            Some(reply) => reply,
            None => self.command(b"DATA\r\n", Stage::Data).await?,
        };
        if reply.code == 421 {
            return Err(SessionError::RemoteRejected {
                stage: Stage::Data,
                reply,
            });
        }
        if reply.code != 354 {
            let result = RecipientResult::rejected(reply);
            for &index in &accepted {
                results[index] = Some(result.clone());
            }
            return Ok(outcome);
        }

        self.write_content(&prepared.bytes).await?;
        // RFC 5321 §4.5.3.2.6: wait at least 10 minutes for the reply to the
        // final dot, because giving up early risks a duplicate delivery.
        let reply = self
            .stream
            .read_reply(Stage::DataDone, self.timeouts.data_done)
            .await?;
        apply_final_reply(reply, &accepted, outcome, results)
    }

    /// Runs one transaction in a single write: MAIL, the RCPTs and the
    /// whole body as one `BDAT <size> LAST` chunk (RFC 3030), led by RSET
    /// on a pooled connection. RFC 3030 lets a client pipeline BDAT when
    /// the server offers PIPELINING. The server reads the chunk even
    /// when it rejected MAIL or every RCPT, and then replies with an error,
    /// so no lone dot or RSET is needed to stay in step. The body goes out
    /// as it is, without dot-stuffing.
    async fn chunked_transaction(
        &mut self,
        mail: &[u8],
        rcpts: &[Vec<u8>],
        body: &[u8],
        group: FirstGroup,
        pending: &[usize],
        results: &mut [Option<RecipientResult>],
    ) -> Result<TransactionOutcome, SessionError> {
        // The last line must end with CRLF, as after DATA.
        let missing_crlf = !body.is_empty() && !body.ends_with(b"\r\n");
        let chunk_bytes = body.len() + if missing_crlf { 2 } else { 0 };
        let commands_bytes: usize = mail.len() + rcpts.iter().map(Vec::len).sum::<usize>();
        let mut bytes = Vec::with_capacity(commands_bytes + chunk_bytes + 40);
        if group.rset {
            bytes.extend_from_slice(b"RSET\r\n");
        }
        bytes.extend_from_slice(mail);
        for rcpt in rcpts {
            bytes.extend_from_slice(rcpt);
        }
        bytes.extend_from_slice(format!("BDAT {chunk_bytes} LAST\r\n").as_bytes());
        bytes.extend_from_slice(body);
        if missing_crlf {
            bytes.extend_from_slice(b"\r\n");
        }
        self.write_first_group(&bytes, group).await?;

        let mail_reply = self
            .stream
            .read_reply(Stage::Mail, self.timeouts.command)
            .await?;
        check_closing(&mail_reply, Stage::Mail)?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            let reply = self
                .stream
                .read_reply(Stage::Rcpt, self.timeouts.command)
                .await?;
            if reply.code == 421 {
                let refusals = if mail_reply.code / 100 == 2 {
                    rcpt_replies
                } else {
                    Vec::new()
                };
                return Err(self.closed_during_rcpt(reply, refusals));
            }
            rcpt_replies.push(reply);
        }
        // The last chunk ends the message as the final dot does, so it gets
        // the same wait (10 minutes in RFC 5321 §4.5.3.2.6).
        let chunk_reply = self
            .stream
            .read_reply(Stage::DataDone, self.timeouts.data_done)
            .await?;

        let mut outcome = TransactionOutcome::default();
        if mail_reply.code / 100 != 2 {
            check_closing(&chunk_reply, Stage::DataDone)?;
            reject_all(mail_reply, pending, results);
            return Ok(outcome);
        }
        let accepted = sort_rcpt_replies(pending, rcpt_replies, &mut outcome, results);
        if accepted.is_empty() {
            check_closing(&chunk_reply, Stage::DataDone)?;
            return Ok(outcome);
        }
        apply_final_reply(chunk_reply, &accepted, outcome, results)
    }

    /// Sends MAIL and the RCPTs and reads their replies, pipelined in groups
    /// when the server offers PIPELINING. With PIPELINING, a pooled
    /// connection's RSET leads the first group, and when every RCPT fits in
    /// it, DATA ends it, because RFC 2920 §3.1 allows DATA as the last
    /// command of a group.
    async fn mail_and_rcpt(
        &mut self,
        mail: &[u8],
        rcpts: &[Vec<u8>],
        group: FirstGroup,
    ) -> Result<Replies, SessionError> {
        let pipelining = self.capabilities.pipelining;
        let data_in_group = pipelining && rcpts.len() <= RCPT_GROUP_SIZE;
        let mail_reply = if pipelining {
            let mut first_group = Vec::with_capacity(256);
            if group.rset {
                first_group.extend_from_slice(b"RSET\r\n");
            }
            first_group.extend_from_slice(mail);
            let group_len = rcpts.len().min(RCPT_GROUP_SIZE);
            for rcpt in &rcpts[..group_len] {
                first_group.extend_from_slice(rcpt);
            }
            if data_in_group {
                first_group.extend_from_slice(b"DATA\r\n");
            }
            self.write_first_group(&first_group, group).await?;
            self.stream
                .read_reply(Stage::Mail, self.timeouts.command)
                .await?
        } else {
            self.command(mail, Stage::Mail).await?
        };
        check_closing(&mail_reply, Stage::Mail)?;
        let mail_accepted = mail_reply.code / 100 == 2;
        if !pipelining && !mail_accepted {
            return Ok(Replies {
                mail: mail_reply,
                rcpts: Vec::new(),
                data: None,
            });
        }

        let mut replies = Vec::with_capacity(rcpts.len());
        if pipelining {
            for (group_index, group) in rcpts.chunks(RCPT_GROUP_SIZE).enumerate() {
                if group_index > 0 {
                    if !mail_accepted {
                        break;
                    }
                    let bytes: Vec<u8> = group.concat();
                    self.stream
                        .write_all(&bytes, Stage::Rcpt, self.timeouts.command)
                        .await?;
                }
                // Every pipelined RCPT gets a reply even after a failed MAIL
                // (RFC 2920 §3.1), and all must be read to keep replies and
                // commands in step.
                for _ in group {
                    let reply = self
                        .stream
                        .read_reply(Stage::Rcpt, self.timeouts.command)
                        .await?;
                    if reply.code == 421 {
                        let refusals = if mail_accepted { replies } else { Vec::new() };
                        return Err(self.closed_during_rcpt(reply, refusals));
                    }
                    replies.push(reply);
                }
            }
        } else {
            for rcpt in rcpts {
                let reply = self.command(rcpt, Stage::Rcpt).await?;
                if reply.code == 421 {
                    // Without PIPELINING, RCPTs follow an accepted MAIL only.
                    return Err(self.closed_during_rcpt(reply, replies));
                }
                replies.push(reply);
            }
        }
        let data = if data_in_group {
            Some(
                self.stream
                    .read_reply(Stage::Data, self.timeouts.command)
                    .await?,
            )
        } else {
            None
        };
        Ok(Replies {
            mail: mail_reply,
            rcpts: replies,
            data,
        })
    }

    /// Records, when `result` failed, the rejections among the RCPT replies
    /// that came before a closing 421 (see `closed_during_rcpt`): a
    /// recipient refused with 550 bounces rather than waiting for a retry.
    fn keep_rejections_before_close<T>(
        &mut self,
        result: Result<T, SessionError>,
        pending: &[usize],
        results: &mut [Option<RecipientResult>],
    ) -> Result<T, SessionError> {
        let replies = std::mem::take(&mut self.replies_before_close);
        if result.is_err() {
            for (&index, reply) in pending.iter().zip(replies) {
                if reply.code / 100 != 2 && !is_recipient_limit(&reply) {
                    results[index] = Some(RecipientResult::rejected(reply));
                }
            }
        }
        result
    }

    /// Keeps the RCPT replies read before a 421 that closed the session
    /// (after an accepted MAIL), so that [`Connection::transaction`]
    /// records their rejections instead of deferring those recipients with
    /// the 421, and returns the 421 as the session's error.
    fn closed_during_rcpt(&mut self, reply: Reply, replies: Vec<Reply>) -> SessionError {
        self.replies_before_close = replies;
        SessionError::RemoteRejected {
            stage: Stage::Rcpt,
            reply,
        }
    }

    /// Writes a transaction's first group and, when RSET leads it, reads
    /// the RSET's reply.
    async fn write_first_group(
        &mut self,
        bytes: &[u8],
        group: FirstGroup,
    ) -> Result<(), SessionError> {
        let written = self
            .stream
            .write_all(bytes, Stage::Mail, self.timeouts.command)
            .await;
        if group.rset {
            self.read_stale_check(written).await
        } else {
            written
        }
    }

    /// Reads the reply to the RSET that leads a pooled connection's first
    /// group. A failed write, no reply or any reply but 250 means the server
    /// dropped the session while the connection was idle, before it read
    /// the message's commands: [`SessionError::Stale`].
    async fn read_stale_check(
        &mut self,
        written: Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        let reply = match written {
            Ok(()) => self
                .stream
                .read_reply(Stage::Rset, self.timeouts.command)
                .await
                .ok(),
            Err(_) => None,
        };
        if reply.as_ref().is_some_and(|reply| reply.code == 250) {
            return Ok(());
        }
        tracing::debug!(
            mx_host = %self.remote_host,
            addr = %self.remote_addr,
            reply = ?reply.map(|reply| reply.to_string()),
            "pooled connection is no longer usable"
        );
        Err(SessionError::Stale)
    }

    /// Ends the data phase that a pipelined DATA opened when no content
    /// may follow, because MAIL or every RCPT was rejected. A server that
    /// replied `354` waits for content, so a lone dot ends an empty
    /// message, and its reply is read and dropped.
    async fn abandon_data(&mut self, data_reply: Option<Reply>) -> Result<(), SessionError> {
        match data_reply {
            Some(reply) if reply.code == 354 => {
                let reply = self.command(b".\r\n", Stage::DataDone).await?;
                check_closing(&reply, Stage::DataDone)
            }
            Some(reply) => check_closing(&reply, Stage::Data),
            None => Ok(()),
        }
    }

    fn mail_command(
        &self,
        message: &OutboundMessage<'_>,
        prepared: &PreparedBody<'_>,
        use_smtputf8: bool,
    ) -> Vec<u8> {
        let capabilities = &self.capabilities;
        let mut line = format!("MAIL FROM:<{}>", message.sender);
        if capabilities.size_limit_bytes.is_some() {
            line.push_str(&format!(" SIZE={}", prepared.bytes.len()));
        }
        if prepared.eight_bit && capabilities.eight_bit_mime {
            line.push_str(" BODY=8BITMIME");
        }
        if use_smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        if capabilities.dsn {
            if let Some(ret) = message.ret {
                line.push_str(match ret {
                    Ret::Full => " RET=FULL",
                    Ret::Headers => " RET=HDRS",
                });
            }
            if let Some(envid) = message.envid {
                line.push_str(" ENVID=");
                line.push_str(&body::xtext(envid));
            }
        }
        line.push_str("\r\n");
        line.into_bytes()
    }

    fn rcpt_command(&self, recipient: &OutboundRecipient<'_>) -> Vec<u8> {
        let mut line = format!("RCPT TO:<{}>", recipient.address);
        if self.capabilities.dsn {
            if recipient.notify != 0 {
                line.push_str(" NOTIFY=");
                line.push_str(&notify_value(recipient.notify));
            }
            if let Some(orcpt) = recipient.orcpt {
                // RFC 3461 §4.2: ORCPT=addr-type;xtext-address.
                let (address_type, address) = match orcpt.split_once(';') {
                    Some((address_type, address)) if !address_type.contains('@') => {
                        (address_type.trim(), address.trim())
                    }
                    _ => ("rfc822", orcpt),
                };
                line.push_str(" ORCPT=");
                line.push_str(&body::xtext(address_type));
                line.push(';');
                line.push_str(&body::xtext(address));
            }
        }
        line.push_str("\r\n");
        line.into_bytes()
    }

    /// Streams the dot-stuffed content. A failed write stops at once: the
    /// server may have sent a 421 and closed (RFC 5321 §3.8), so the client
    /// looks for that reply instead of writing on.
    async fn write_content(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let timeout = self.timeouts.command;
        let mut buffer: Vec<u8> = Vec::with_capacity(DATA_WRITE_BYTES);
        let mut result = Ok(());
        for piece in body::dot_stuffed(bytes) {
            if buffer.len() + piece.len() > DATA_WRITE_BYTES && !buffer.is_empty() {
                result = self
                    .stream
                    .write_all(&buffer, Stage::DataBody, timeout)
                    .await;
                buffer.clear();
                if result.is_err() {
                    break;
                }
            }
            if piece.len() >= DATA_WRITE_BYTES {
                result = self.stream.write_all(piece, Stage::DataBody, timeout).await;
                if result.is_err() {
                    break;
                }
            } else {
                buffer.extend_from_slice(piece);
            }
        }
        if result.is_ok() && !buffer.is_empty() {
            result = self
                .stream
                .write_all(&buffer, Stage::DataBody, timeout)
                .await;
        }
        let Err(error) = result else {
            return Ok(());
        };
        if let SessionError::ConnectionLost { .. } = error
            && let Ok(reply) = self
                .stream
                .read_reply(Stage::DataBody, LATE_REPLY_WAIT)
                .await
        {
            return Err(SessionError::RemoteRejected {
                stage: Stage::DataBody,
                reply,
            });
        }
        Err(error)
    }
}

#[derive(Default)]
struct TransactionOutcome {
    /// Recipients refused only because of the server's recipient limit.
    over_limit: Vec<usize>,
    /// The last recipient-limit reply, for recipients that cannot be sent
    /// on this connection at all.
    limit_reply: Option<Reply>,
    /// True when DATA, or the last BDAT chunk, ran to its final reply.
    data_completed: bool,
}

/// Gives a rejected MAIL's reply to every recipient of `pending`. RFC 5321
/// §4.5.5 and §6.1: a rejected null sender is not retried with another
/// sender, so the reply decides everyone.
fn reject_all(mail_reply: Reply, pending: &[usize], results: &mut [Option<RecipientResult>]) {
    let result = RecipientResult::rejected(mail_reply);
    for &index in pending {
        results[index] = Some(result.clone());
    }
}

/// Gives the reply after the content (final dot or last chunk) to every
/// accepted recipient and completes the transaction. A 421 there also ends
/// the session.
fn apply_final_reply(
    reply: Reply,
    accepted: &[usize],
    mut outcome: TransactionOutcome,
    results: &mut [Option<RecipientResult>],
) -> Result<TransactionOutcome, SessionError> {
    let closing = reply.code == 421;
    let result = RecipientResult::from_final_reply(reply.clone());
    for &index in accepted {
        results[index] = Some(result.clone());
    }
    outcome.data_completed = true;
    if closing {
        return Err(SessionError::RemoteRejected {
            stage: Stage::DataDone,
            reply,
        });
    }
    Ok(outcome)
}

/// Sorts the RCPT replies of `pending`: rejected recipients get their
/// result, recipients refused at the server's recipient limit go to
/// `outcome.over_limit`, and the accepted ones are returned.
fn sort_rcpt_replies(
    pending: &[usize],
    rcpt_replies: Vec<Reply>,
    outcome: &mut TransactionOutcome,
    results: &mut [Option<RecipientResult>],
) -> Vec<usize> {
    let mut accepted = Vec::new();
    for (&index, reply) in pending.iter().zip(rcpt_replies) {
        if reply.code / 100 == 2 {
            accepted.push(index);
        } else if is_recipient_limit(&reply) {
            outcome.limit_reply = Some(reply);
            outcome.over_limit.push(index);
        } else {
            results[index] = Some(RecipientResult::rejected(reply));
        }
    }
    accepted
}

/// Returns an error for a 421, which closes the session whatever command it
/// replies to (RFC 5321 §3.8).
fn check_closing(reply: &Reply, stage: Stage) -> Result<(), SessionError> {
    if reply.code == 421 {
        Err(SessionError::RemoteRejected {
            stage,
            reply: reply.clone(),
        })
    } else {
        Ok(())
    }
}

/// True for the replies a server gives at its recipient limit: `452`
/// (RFC 5321 §4.5.3.1.10) unless its enhanced status names another cause,
/// such as `4.2.2` mailbox full, and the legacy `552` with `5.5.3` or the
/// text "too many recipients".
fn is_recipient_limit(reply: &Reply) -> bool {
    let limit_status = reply
        .status
        .is_some_and(|status| status.subject == 5 && status.detail == 3);
    match reply.code {
        452 => reply.status.is_none() || limit_status,
        552 => {
            limit_status
                || reply
                    .lines
                    .iter()
                    .any(|line| line.to_ascii_lowercase().contains("too many recipients"))
        }
        _ => false,
    }
}

fn notify_value(bits: u8) -> String {
    if bits & notify::NEVER != 0 {
        return "NEVER".to_string();
    }
    let names = [
        (notify::SUCCESS, "SUCCESS"),
        (notify::FAILURE, "FAILURE"),
        (notify::DELAY, "DELAY"),
    ];
    names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

fn fill_undecided(
    results: Vec<Option<RecipientResult>>,
    reply: &Reply,
    make: fn(Reply) -> RecipientResult,
) -> Vec<RecipientResult> {
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| make(reply.clone())))
        .collect()
}

fn undecided_reply() -> Reply {
    Reply::new(451, EnhancedStatus::new(4, 3, 0), "delivery not attempted")
}
