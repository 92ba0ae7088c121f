//! `caduceus spool show ID [--content]`: one spooled message's envelope, and
//! with `--content` its decrypted text.
//!
//! When the engine runs, the request goes over the control socket. Every
//! executor looks the id up in its own queue, and only the owning core reads
//! its record. The control thread writes an `envelope_viewed` or
//! `content_viewed` audit record, synced, before it replies, so no content
//! leaves the engine unaudited. When the engine is stopped, the envelope is
//! read from the spool files read-only, as `spool ls` does. Content is then
//! refused, because only the engine can append to the hash-chained audit
//! trail, and a second writer would fork the chain.
//!
//! Both paths build the same JSON view, so one printer serves both.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use base64::Engine as _;
use caduceus_policy::config::Config;
use caduceus_spool::format::RecordHeader;
use caduceus_spool::inspect::{FoundMessage, find_message};
use caduceus_spool::{Envelope, MessageId, RecipientState, RecordRef, Ret};
use serde_json::{Value, json};

use crate::audit::date::rfc3339_us;

/// The message's location and record facts that the envelope does not carry.
pub struct RecordFacts {
    pub shard: u16,
    pub record: RecordRef,
    /// 0 when the record is not encrypted.
    pub key_id: u32,
    pub record_bytes: u64,
    pub body_bytes: u64,
}

impl RecordFacts {
    /// Takes the facts from a record's clear header.
    pub fn from_header(
        shard: u16,
        record: RecordRef,
        header: &RecordHeader,
        body_bytes: u64,
    ) -> RecordFacts {
        RecordFacts {
            shard,
            record,
            key_id: header.key_id,
            record_bytes: u64::from(header.length_bytes),
            body_bytes,
        }
    }
}

/// Builds the JSON view of a message's envelope and recipient states. It
/// never contains the body; the owning core adds `content_base64` only for
/// `--content`.
pub fn envelope_view(facts: &RecordFacts, envelope: &Envelope, states: &[RecipientState]) -> Value {
    let recipients: Vec<Value> = envelope
        .recipients
        .iter()
        .zip(states)
        .map(|(recipient, state)| {
            let mut view = json!({
                "address": recipient.address,
                "domain": recipient.domain,
                "notify": recipient.notify,
                "orcpt": recipient.orcpt,
            });
            let (name, attempts, next_attempt_us) = match *state {
                RecipientState::Pending {
                    attempts,
                    next_attempt_us,
                } => ("pending", Some(attempts), Some(next_attempt_us)),
                RecipientState::Delivered => ("delivered", None, None),
                RecipientState::Bounced => ("bounced", None, None),
                RecipientState::Expired => ("expired", None, None),
                RecipientState::Deleted => ("deleted", None, None),
            };
            view["state"] = json!(name);
            view["attempts"] = json!(attempts);
            view["next_attempt_us"] = json!(next_attempt_us);
            view
        })
        .collect();
    json!({
        "message_id": envelope.message_id.to_string(),
        "shard": facts.shard,
        "segment": facts.record.segment,
        "offset": facts.record.offset,
        "key_id": facts.key_id,
        "record_bytes": facts.record_bytes,
        "body_bytes": facts.body_bytes,
        "lane": envelope.lane.as_str(),
        "category": envelope.category.as_str(),
        "sender": envelope.sender,
        "envid": envelope.envid,
        "ret": envelope.ret.map(|ret| match ret {
            Ret::Full => "full",
            Ret::Headers => "hdrs",
        }),
        "body_8bit": envelope.body_8bit,
        "smtputf8": envelope.smtputf8,
        "peer_uid": envelope.peer_uid,
        "peer_gid": envelope.peer_gid,
        "peer_pid": envelope.peer_pid,
        "received_at_us": envelope.received_at_us,
        "expires_at_us": envelope.expires_at_us,
        "recipients": recipients,
    })
}

/// Runs `caduceus spool show`.
pub fn run(config: &Config, id_text: &str, content: bool) -> Result<(), String> {
    let message_id: MessageId = id_text.trim().parse().map_err(|error| format!("{error}"))?;
    let socket = config.control_socket();
    if engine_is_running(&socket)? {
        return show_online(&socket, message_id, content);
    }
    if content {
        return Err(format!(
            "spool show --content needs the running engine, because reading message content is audited and only the engine appends to the audit trail; nothing listens on {}. Start the engine (`caduceus serve`) and retry",
            socket.display()
        ));
    }
    show_offline(config, message_id)
}

/// Returns true when something accepts on the control socket, false when
/// the socket is missing or refuses, which is what a stopped engine leaves.
/// Any other failure, such as a permission error, is returned, because
/// falling back to the files would hide it.
fn engine_is_running(socket: &Path) -> Result<bool, String> {
    match UnixStream::connect(socket) {
        Ok(_) => Ok(true),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(false)
        }
        Err(error) => Err(format!(
            "cannot connect to the control socket {}: {error}",
            socket.display()
        )),
    }
}

fn show_online(socket: &Path, message_id: MessageId, content: bool) -> Result<(), String> {
    let request = json!({
        "command": "spool.show",
        "message_id": message_id.to_string(),
        "content": content,
    });
    let response = crate::control::request(socket, &request)?;
    if response.get("ok").and_then(Value::as_bool) != Some(true) {
        let error = response
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the engine rejected the command");
        return Err(error.to_string());
    }
    let view = &response["message"];
    let mut out = io::stdout().lock();
    let written = print_view(view, &mut out).and_then(|()| {
        if !content {
            return Ok(());
        }
        let body = decode_content(view).map_err(io::Error::other)?;
        writeln!(out, "\ncontent ({} bytes):", body.len())?;
        out.write_all(&body)?;
        out.flush()
    });
    written.map_err(|error| format!("writing to stdout failed: {error}"))
}

fn decode_content(view: &Value) -> Result<Vec<u8>, String> {
    let text = view
        .get("content_base64")
        .and_then(Value::as_str)
        .ok_or("the engine sent no content")?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|error| format!("the engine sent invalid base64 content: {error}"))
}

fn show_offline(config: &Config, message_id: MessageId) -> Result<(), String> {
    let keyring = crate::runtime::load_keyring(config)?;
    let dir = config.spool_dir();
    let report =
        find_message(&dir, message_id, keyring.as_ref()).map_err(|error| error.to_string())?;
    if report.copies.is_empty() {
        let unreadable = match report.unreadable_records {
            0 => String::new(),
            count => format!(
                "; {count} records could not be opened and may hold it (run `caduceus spool verify`)"
            ),
        };
        return Err(format!(
            "message {message_id} not found in the spool {}{unreadable}",
            dir.display()
        ));
    }
    let mut out = io::stdout().lock();
    let written = (|| -> io::Result<()> {
        writeln!(
            out,
            "(engine stopped: read from the spool files in {})",
            dir.display()
        )?;
        if report.copies.len() > 1 {
            writeln!(
                out,
                "({} shards hold a copy, left by an interrupted adoption; the engine keeps both)",
                report.copies.len()
            )?;
        }
        for copy in &report.copies {
            let FoundMessage {
                shard,
                record,
                key_id,
                record_bytes,
                body_bytes,
                envelope,
                states,
            } = copy;
            let facts = RecordFacts {
                shard: *shard,
                record: *record,
                key_id: *key_id,
                record_bytes: *record_bytes,
                body_bytes: *body_bytes,
            };
            print_view(&envelope_view(&facts, envelope, states), &mut out)?;
        }
        Ok(())
    })();
    written.map_err(|error| format!("writing to stdout failed: {error}"))
}

/// Prints a view built by [`envelope_view`] as labelled lines. Recipient
/// addresses are printed in the clear: the control socket's mode (0600)
/// and the spool's file permissions already limit who can ask.
pub fn print_view(view: &Value, out: &mut impl Write) -> io::Result<()> {
    let text = |key: &str| match &view[key] {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let time = |key: &str| match view[key].as_u64() {
        Some(at_us) => format!("{} ({at_us} us)", rfc3339_us(at_us)),
        None => "-".to_string(),
    };
    writeln!(out, "message id:   {}", text("message_id"))?;
    writeln!(out, "lane:         {}", text("lane"))?;
    writeln!(out, "category:     {}", text("category"))?;
    writeln!(out, "sender:       <{}>", text("sender"))?;
    writeln!(out, "received:     {}", time("received_at_us"))?;
    writeln!(out, "expires:      {}", time("expires_at_us"))?;
    writeln!(
        out,
        "submitted by: uid {} gid {} pid {}",
        text("peer_uid"),
        text("peer_gid"),
        text("peer_pid")
    )?;
    writeln!(
        out,
        "dsn:          envid {} ret {}",
        text("envid"),
        text("ret")
    )?;
    writeln!(
        out,
        "body:         {} bytes, 8bitmime {}, smtputf8 {}",
        text("body_bytes"),
        text("body_8bit"),
        text("smtputf8")
    )?;
    writeln!(
        out,
        "record:       shard {} segment {} offset {}, {} bytes, key id {}",
        text("shard"),
        text("segment"),
        text("offset"),
        text("record_bytes"),
        text("key_id")
    )?;

    let recipients = view["recipients"].as_array().cloned().unwrap_or_default();
    let attempts = recipients
        .iter()
        .filter_map(|recipient| recipient["attempts"].as_u64())
        .max();
    let next_attempt_us = recipients
        .iter()
        .filter_map(|recipient| recipient["next_attempt_us"].as_u64())
        .min();
    writeln!(
        out,
        "attempts:     {}",
        attempts.map_or("- (no recipient pending)".to_string(), |n| n.to_string())
    )?;
    writeln!(
        out,
        "next attempt: {}",
        match next_attempt_us {
            None => "- (no recipient pending)".to_string(),
            // A pending recipient with no attempt yet is due at once.
            Some(0) => "now".to_string(),
            Some(at_us) => format!("{} ({at_us} us)", rfc3339_us(at_us)),
        }
    )?;
    writeln!(out, "recipients:   {}", recipients.len())?;
    for (index, recipient) in recipients.iter().enumerate() {
        let field = |key: &str| match &recipient[key] {
            Value::String(text) => text.clone(),
            Value::Null => "-".to_string(),
            other => other.to_string(),
        };
        let mut line = format!("  {index:>3} <{}> {}", field("address"), field("state"));
        if let Some(attempts) = recipient["attempts"].as_u64() {
            line.push_str(&format!(", {attempts} attempts"));
        }
        match recipient["next_attempt_us"].as_u64() {
            Some(0) => line.push_str(", next attempt now"),
            Some(at_us) => line.push_str(&format!(", next attempt {}", rfc3339_us(at_us))),
            None => {}
        }
        if !recipient["orcpt"].is_null() {
            line.push_str(&format!(", orcpt {}", field("orcpt")));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_policy::{Category, Lane};
    use caduceus_spool::Recipient;

    fn envelope() -> Envelope {
        Envelope {
            message_id: MessageId([7; 16]),
            received_at_us: 1_733_000_000_000_000,
            expires_at_us: 1_733_086_400_000_000,
            lane: Lane::Transactional,
            category: Category::Transactional,
            sender: "billing@clinic.example".into(),
            envid: Some("env-1".into()),
            ret: Some(Ret::Headers),
            body_8bit: false,
            smtputf8: false,
            peer_uid: 1000,
            peer_gid: 1000,
            peer_pid: 42,
            recipients: vec![
                Recipient {
                    address: "a@example.net".into(),
                    domain: "example.net".into(),
                    notify: 0,
                    orcpt: None,
                },
                Recipient {
                    address: "b@example.org".into(),
                    domain: "example.org".into(),
                    notify: 0,
                    orcpt: Some("rfc822;b@example.org".into()),
                },
            ],
        }
    }

    #[test]
    fn view_prints_states_and_no_content() {
        let facts = RecordFacts {
            shard: 1,
            record: RecordRef {
                segment: 3,
                offset: 4096,
            },
            key_id: 2,
            record_bytes: 2304,
            body_bytes: 2048,
        };
        let states = [
            RecipientState::Pending {
                attempts: 2,
                next_attempt_us: 1_733_000_600_000_000,
            },
            RecipientState::Delivered,
        ];
        let view = envelope_view(&facts, &envelope(), &states);
        assert!(view.get("content_base64").is_none());
        let mut printed = Vec::new();
        print_view(&view, &mut printed).expect("print to a Vec");
        let printed = String::from_utf8(printed).expect("UTF-8 output");
        assert!(printed.contains("message id:   07070707"), "{printed}");
        assert!(
            printed.contains("record:       shard 1 segment 3 offset 4096, 2304 bytes, key id 2"),
            "{printed}"
        );
        assert!(printed.contains("attempts:     2"), "{printed}");
        assert!(
            printed.contains("<a@example.net> pending, 2 attempts, next attempt 2024-"),
            "{printed}"
        );
        assert!(
            printed.contains("<b@example.org> delivered, orcpt rfc822;b@example.org"),
            "{printed}"
        );
        assert!(
            printed.contains("dsn:          envid env-1 ret hdrs"),
            "{printed}"
        );
    }

    #[test]
    fn view_without_pending_recipients() {
        let facts = RecordFacts {
            shard: 0,
            record: RecordRef {
                segment: 1,
                offset: 64,
            },
            key_id: 0,
            record_bytes: 512,
            body_bytes: 100,
        };
        let states = [RecipientState::Bounced, RecipientState::Expired];
        let mut printed = Vec::new();
        print_view(&envelope_view(&facts, &envelope(), &states), &mut printed)
            .expect("print to a Vec");
        let printed = String::from_utf8(printed).expect("UTF-8 output");
        assert!(
            printed.contains("next attempt: - (no recipient pending)"),
            "{printed}"
        );
        assert!(printed.contains("<a@example.net> bounced"), "{printed}");
        assert!(printed.contains("<b@example.org> expired"), "{printed}");
    }
}
