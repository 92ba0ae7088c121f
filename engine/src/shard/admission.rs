//! The engine's side of the submission socket: backpressure at MAIL, checks
//! at RCPT, and the durable append behind every `250` to the final dot.

use std::rc::Rc;

use caduceus_policy::{Category, Lane, Verdict};
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
        _lane: Lane,
        category: Category,
        sender: &str,
        recipient: &SubmittedRecipient,
    ) -> Result<(), Reply> {
        let category = self.sender_category(sender).unwrap_or(category);
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
        let checked_category = self
            .sender_category(&submission.sender)
            .unwrap_or(lane_config.default_category);
        if submission.category == lane_config.default_category {
            submission.category = checked_category;
        } else if submission.category != checked_category {
            for recipient in &submission.recipients {
                self.check_lists(submission.category, &recipient.address)?;
            }
        }
        let lifetime_us = lane_config.max_queue_lifetime.get().as_micros() as u64;
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
        shard.spool.durable(seq).await.map_err(|error| {
            tracing::error!(core = shard.index, message_id = %envelope.message_id, %error, "ingress: group commit failed; the client gets 451 and will retry");
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
    /// The category that policy sets for mail from the sender's domain.
    fn sender_category(&self, sender: &str) -> Option<Category> {
        let (_, domain) = sender.rsplit_once('@')?;
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.shard.current_policy().sender_category(&domain)
    }

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
