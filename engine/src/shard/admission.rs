//! The engine's side of the submission socket: backpressure at MAIL, checks
//! at RCPT, and the durable append behind every `250` to the final dot.

use std::rc::Rc;

use caduceus_policy::{Category, Lane, Policy, Verdict};
use caduceus_spool::{AppendError, Envelope, MessageId, Recipient, RecipientState};

use super::Shard;
use super::deliver;
use super::queue::QueuedMessage;
use crate::deliverylog::{Entry, Event, now_us};
use crate::ingress::{Admission, Submission, SubmittedRecipient};
use crate::smtp::{EnhancedStatus, Reply};

/// The most messages one core keeps queued before MAIL is answered
/// `452 4.3.1`. Each queued message costs its envelope in memory (a few
/// hundred bytes for one recipient), so this bounds the queue's memory at
/// a few hundred MiB per core.
const MAX_QUEUED_MESSAGES: usize = 1_000_000;

pub struct ShardAdmission {
    pub shard: Rc<Shard>,
}

fn insufficient_storage() -> Reply {
    Reply::new(
        452,
        EnhancedStatus::new(4, 3, 1),
        "Insufficient system storage, try again later",
    )
}

impl Admission for ShardAdmission {
    fn admit_mail(&self, _lane: Lane) -> Result<(), Reply> {
        if self.shard.draining.get() {
            return Err(Reply::new(
                421,
                EnhancedStatus::new(4, 3, 2),
                "Service shutting down, try again later",
            ));
        }
        if self.shard.below_reserve.get()
            || self.shard.queue.borrow().messages.len() >= MAX_QUEUED_MESSAGES
        {
            return Err(insufficient_storage());
        }
        Ok(())
    }

    fn admit_rcpt(
        &self,
        lane: Lane,
        category: Category,
        sender: &str,
        recipient: &SubmittedRecipient,
    ) -> Result<(), Reply> {
        // The destination's home executor is behind on hand-offs from this
        // one: refuse before anything is durable rather than buffer more.
        if self.shard.mesh.saturated(lane, &recipient.domain) {
            return Err(Reply::new(
                451,
                EnhancedStatus::new(4, 3, 1),
                "Delivery queue for this destination is full, try again later",
            ));
        }
        // One policy snapshot serves both checks of this recipient.
        let policy = self.shard.current_policy();
        if !policy.for_domain(&recipient.domain, lane).lane_allowed {
            return Err(Reply::new(
                550,
                EnhancedStatus::new(5, 7, 1),
                format!(
                    "Delivery to this destination is not permitted for {} mail",
                    lane.as_str()
                ),
            ));
        }
        let category = sender_category(&policy, sender).unwrap_or(category);
        self.check_lists(category, &recipient.address)
    }

    async fn submit(&self, mut submission: Submission) -> Result<(), Reply> {
        let shard = &self.shard;
        let received_at_us = now_us();
        let lane_config = shard.config.lanes.get(submission.lane);
        // Precedence: an X-Caduceus-Category header (the session has
        // applied it when it differs from the lane's default), then the
        // sender domain's policy, then the lane's default. RCPT was checked
        // under the latter two; a header that changes the category means
        // every recipient is checked again, and one refusal rejects the
        // message, because SMTP cannot refuse single recipients after DATA.
        let checked_category = sender_category(&shard.current_policy(), &submission.sender)
            .unwrap_or(lane_config.default_category);
        if submission.category == lane_config.default_category {
            submission.category = checked_category;
        } else if submission.category != checked_category {
            for recipient in &submission.recipients {
                self.check_lists(submission.category, &recipient.address)?;
            }
        }
        let mut lifetime_us = lane_config.max_queue_lifetime.get().as_micros() as u64;
        match take_lifetime_header(&mut submission.body) {
            Ok(Some(own)) => lifetime_us = lifetime_us.min(own.as_micros() as u64),
            Ok(None) => {}
            Err(reply) => return Err(reply),
        }
        let envelope = Envelope {
            message_id: MessageId(submission.message_id),
            received_at_us,
            expires_at_us: received_at_us.saturating_add(lifetime_us),
            lane: submission.lane,
            category: submission.category,
            sender: submission.sender,
            envid: submission.envid,
            ret: submission.ret.map(convert_ret),
            body_8bit: submission.body_8bit,
            smtputf8: submission.smtputf8,
            peer_uid: submission.peer.uid,
            peer_gid: submission.peer.gid,
            peer_pid: submission.peer.pid,
            recipients: submission
                .recipients
                .into_iter()
                .map(|recipient| Recipient {
                    address: recipient.address,
                    domain: recipient.domain,
                    notify: recipient.notify,
                    orcpt: recipient.orcpt,
                })
                .collect(),
        };
        let (record, seq) = shard
            .spool
            .append_message(&envelope, &submission.body)
            .map_err(|error| append_error_reply(shard.index, &error))?;
        // Staged now, so that audit records follow the spool's append order.
        // The spool record makes it recoverable, so the 250 waits for the
        // spool's commit only.
        if let Err(error) = crate::audit::accepted(&envelope, record, submission.body.len()) {
            // The message stays in the spool, and the next start rebuilds its
            // record and delivers it. The client gets 451 because the audit
            // stream is failing now.
            tracing::error!(core = shard.index, message_id = %envelope.message_id, %error, "ingress: audit record not written; the client gets 451 and its retry may duplicate the message");
            return Err(Reply::new(
                451,
                EnhancedStatus::new(4, 3, 0),
                "Local error in processing, try again later",
            ));
        }
        let durable = shard.spool.durable(seq).await;
        durable.map_err(|error| {
            tracing::error!(core = shard.index, message_id = %envelope.message_id, %error, "ingress: group commit failed; the client gets 451 and will retry");
            // The client's retry brings the message again, so this copy is
            // dropped. If its bytes reached the disk anyway and its segment
            // outlives a restart, recovery delivers it a second time.
            shard.spool.release(record);
            Reply::new(
                451,
                EnhancedStatus::new(4, 3, 0),
                "Local error in processing, try again later",
            )
        })?;

        let id = envelope.message_id.to_string();
        let mut entry = Entry::new(
            Event::Received,
            &id,
            envelope.lane,
            envelope.category,
            received_at_us,
        );
        entry.recipients = Some(envelope.recipients.len());
        entry.peer_uid = Some(envelope.peer_uid);
        entry.peer_pid = Some(envelope.peer_pid);
        entry.size_bytes = Some(submission.body.len());
        shard.log.write(&entry);
        crate::metrics::record_event(&entry);

        let states = vec![
            RecipientState::Pending {
                attempts: 0,
                next_attempt_us: received_at_us,
            };
            envelope.recipients.len()
        ];
        let message = QueuedMessage::new(Rc::new(envelope), states);
        let ready = shard
            .queue
            .borrow_mut()
            .insert(record, message, received_at_us);
        for domain in ready {
            deliver::dispatch(shard, &domain);
        }
        Ok(())
    }
}

impl ShardAdmission {
    /// Applies consent and suppression: marketing needs recorded opt-in
    /// and no suppression of any kind; care honours opt-outs, hard bounces
    /// and complaints; transactional honours hard bounces and complaints.
    /// The reply states the reason in general terms only.
    fn check_lists(&self, category: Category, address: &str) -> Result<(), Reply> {
        let hmac = self.shard.site_key.hmac_address(address);
        match self.shard.lists.load().check(&hmac, category) {
            Verdict::Allowed => Ok(()),
            Verdict::NoConsent => Err(Reply::new(
                550,
                EnhancedStatus::new(5, 7, 1),
                "Recipient has not consented to marketing mail",
            )),
            Verdict::Suppressed(_) => Err(Reply::new(
                550,
                EnhancedStatus::new(5, 7, 1),
                "Recipient is on the suppression list",
            )),
        }
    }
}

/// Header by which a sender gives a message a shorter queue lifetime than
/// its lane's, such as `X-Caduceus-Lifetime: 1h` on a password reset that
/// is worthless after an hour. Removed before delivery.
pub const LIFETIME_HEADER: &str = "X-Caduceus-Lifetime";

/// Reads and removes the lifetime header from the message's header
/// section. A value that is not a duration (`30m`, `2h`, `1d`) gets
/// `554 5.6.0`, because the sender asked for something the engine cannot
/// honour.
fn take_lifetime_header(body: &mut Vec<u8>) -> Result<Option<std::time::Duration>, Reply> {
    let header_end = body
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(body.len(), |position| position + 2);
    let mut start = 0;
    while start < header_end {
        let line_end = body[start..header_end]
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .map_or(header_end, |position| start + position + 2);
        let line = &body[start..line_end];
        let name_length = LIFETIME_HEADER.len();
        if line.len() > name_length
            && line[..name_length].eq_ignore_ascii_case(LIFETIME_HEADER.as_bytes())
            && line[name_length] == b':'
        {
            // RFC 5322 §2.2.3: lines that start with white space continue
            // the field, and go with it.
            let mut field_end = line_end;
            while field_end < header_end && matches!(body[field_end], b' ' | b'\t') {
                field_end = body[field_end..header_end]
                    .windows(2)
                    .position(|pair| pair == b"\r\n")
                    .map_or(header_end, |position| field_end + position + 2);
            }
            let value = String::from_utf8_lossy(&body[start + name_length + 1..field_end])
                .split_whitespace()
                .collect::<String>();
            let lifetime = caduceus_policy::duration::parse_duration(&value).map_err(|_| {
                Reply::new(
                    554,
                    EnhancedStatus::new(5, 6, 0),
                    format!("{LIFETIME_HEADER} must be a duration such as 30m or 2h"),
                )
            })?;
            body.drain(start..field_end);
            return Ok(Some(lifetime));
        }
        start = line_end;
    }
    Ok(None)
}

fn convert_ret(ret: crate::ingress::Ret) -> caduceus_spool::Ret {
    match ret {
        crate::ingress::Ret::Full => caduceus_spool::Ret::Full,
        crate::ingress::Ret::Headers => caduceus_spool::Ret::Headers,
    }
}

/// Maps a failed append to the reply the client gets. Every case is
/// answered before the message is acknowledged, so the client keeps
/// responsibility for the message and retries.
fn append_error_reply(core: u16, error: &AppendError) -> Reply {
    match error {
        AppendError::DiskReserve { .. } => insufficient_storage(),
        AppendError::TooLarge { .. } => Reply::new(
            552,
            EnhancedStatus::new(5, 3, 4),
            "Message too big for the spool",
        ),
        other => {
            tracing::error!(core, error = %other, "ingress: spool append failed; the client gets 451 and will retry");
            Reply::new(
                451,
                EnhancedStatus::new(4, 3, 0),
                "Local error in processing, try again later",
            )
        }
    }
}

/// Returns the category that `policy` sets for mail from the sender's
/// domain.
fn sender_category(policy: &Policy, sender: &str) -> Option<Category> {
    let (_, domain) = sender.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    policy.sender_category(&domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_header_is_read_and_removed() {
        let mut body = b"Subject: reset\r\nX-Caduceus-Lifetime: 1h\r\nTo: a@b.test\r\n\r\nX-Caduceus-Lifetime: 5d\r\n".to_vec();
        let lifetime = take_lifetime_header(&mut body).unwrap();
        assert_eq!(lifetime, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(
            body,
            b"Subject: reset\r\nTo: a@b.test\r\n\r\nX-Caduceus-Lifetime: 5d\r\n".to_vec(),
            "only the header section is searched"
        );
    }

    #[test]
    fn lifetime_header_folded() {
        let mut body = b"X-Caduceus-Lifetime:\r\n 30m\r\nSubject: x\r\n\r\nbody\r\n".to_vec();
        let lifetime = take_lifetime_header(&mut body).unwrap();
        assert_eq!(lifetime, Some(std::time::Duration::from_secs(1800)));
        assert_eq!(body, b"Subject: x\r\n\r\nbody\r\n".to_vec());
    }

    #[test]
    fn lifetime_header_absent() {
        let mut body = b"Subject: hi\r\n\r\nbody\r\n".to_vec();
        assert_eq!(take_lifetime_header(&mut body).unwrap(), None);
        assert_eq!(body, b"Subject: hi\r\n\r\nbody\r\n".to_vec());
    }

    #[test]
    fn lifetime_header_invalid_value() {
        let mut body = b"X-Caduceus-Lifetime: soon\r\n\r\nbody\r\n".to_vec();
        let reply = take_lifetime_header(&mut body).unwrap_err();
        assert_eq!(reply.code, 554);
        assert_eq!(reply.status, Some(EnhancedStatus::new(5, 6, 0)));
    }
}
