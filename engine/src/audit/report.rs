//! `caduceus report`: the per-message table built from the audit streams.
//!
//! A message appears when its receipt time (its `accepted` record's
//! `received_at_us`, else the record's time) falls within the date
//! range (UTC days, both ends included). Its outcomes are taken from every
//! stream, whatever their date, because a retry may finish days later.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::chain::list_streams;
use super::date::{DAY_US, Date, rfc3339_us};

/// One recipient's final state in the report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RecipientRow {
    /// The address or `hmac:<hex>`, as the audit record holds it; empty for
    /// recipients with no outcome record yet.
    pub recipient: String,
    /// delivered, bounced, expired, deleted, deferred (still pending after
    /// a temporary failure) or pending (no attempt recorded).
    pub outcome: String,
    pub attempts: u32,
    pub reply_code: Option<u16>,
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    /// When the last outcome was recorded, RFC 3339 UTC.
    pub final_at: Option<String>,
}

/// One message in the report.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MessageRow {
    pub message_id: String,
    pub received_at: String,
    pub lane: String,
    pub category: String,
    pub peer_uid: Option<u64>,
    pub recipients: Vec<RecipientRow>,
    /// DSNs generated for the message (their message ids).
    pub dsns: Vec<String>,
}

fn text(value: &Value, field: &str) -> Option<String> {
    value.get(field).and_then(Value::as_str).map(str::to_string)
}

/// Builds the table for accepted records dated `from..=to`.
pub fn build(audit_dir: &Path, from: Date, to: Date) -> Result<Vec<MessageRow>, String> {
    let from_us = (from.to_days().max(0) as u64) * DAY_US;
    let to_us = ((to.to_days() + 1).max(0) as u64) * DAY_US;
    let streams = list_streams(audit_dir)
        .map_err(|error| format!("cannot list {}: {error}", audit_dir.display()))?;
    let mut messages: BTreeMap<(u64, String), MessageRow> = BTreeMap::new();
    let mut by_id: HashMap<String, (u64, String)> = HashMap::new();
    let mut outcomes: Vec<Value> = Vec::new();
    let mut dsns: Vec<(String, String)> = Vec::new();
    let mut expected_recipients: HashMap<String, u64> = HashMap::new();
    for (_, files) in streams {
        for (_, path) in files {
            let content = std::fs::read(&path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            for line in content.split(|byte| *byte == b'\n') {
                let Ok(value) = serde_json::from_slice::<Value>(line) else {
                    continue;
                };
                match value.get("event").and_then(Value::as_str) {
                    Some("accepted") => {
                        // A record rebuilt at start is dated by the start;
                        // the message's own receipt time comes first.
                        let at_us = ["received_at_us", "at_us"]
                            .into_iter()
                            .find_map(|field| value.get(field).and_then(Value::as_u64))
                            .unwrap_or(0);
                        if at_us < from_us || at_us >= to_us {
                            continue;
                        }
                        let Some(id) = text(&value, "message_id") else {
                            continue;
                        };
                        let key = (at_us, id.clone());
                        expected_recipients.insert(
                            id.clone(),
                            value.get("recipients").and_then(Value::as_u64).unwrap_or(0),
                        );
                        by_id.insert(id.clone(), key.clone());
                        messages.insert(
                            key,
                            MessageRow {
                                message_id: id,
                                received_at: rfc3339_us(at_us),
                                lane: text(&value, "lane").unwrap_or_default(),
                                category: text(&value, "category").unwrap_or_default(),
                                peer_uid: value.get("peer_uid").and_then(Value::as_u64),
                                recipients: Vec::new(),
                                dsns: Vec::new(),
                            },
                        );
                    }
                    Some("outcome") => outcomes.push(value),
                    Some("dsn") => {
                        if let (Some(id), Some(dsn)) =
                            (text(&value, "message_id"), text(&value, "dsn_message_id"))
                        {
                            dsns.push((id, dsn));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    outcomes.sort_by_key(|value| value.get("at_us").and_then(Value::as_u64).unwrap_or(0));
    for outcome in outcomes {
        let Some(key) = text(&outcome, "message_id").and_then(|id| by_id.get(&id).cloned()) else {
            continue;
        };
        let Some(message) = messages.get_mut(&key) else {
            continue;
        };
        let recipient = text(&outcome, "recipient").unwrap_or_default();
        let position = message
            .recipients
            .iter()
            .position(|row| row.recipient == recipient);
        let row = match position {
            Some(index) => &mut message.recipients[index],
            None => {
                message.recipients.push(RecipientRow {
                    recipient,
                    ..RecipientRow::default()
                });
                message
                    .recipients
                    .last_mut()
                    .expect("a row was pushed on the line above")
            }
        };
        row.outcome = text(&outcome, "outcome").unwrap_or_default();
        row.attempts = outcome
            .get("attempt")
            .and_then(Value::as_u64)
            .map_or(row.attempts, |attempt| attempt as u32);
        row.reply_code = outcome
            .get("reply_code")
            .and_then(Value::as_u64)
            .map(|code| code as u16);
        row.remote_host = text(&outcome, "remote_host");
        row.remote_ip = text(&outcome, "remote_ip");
        row.tls_version = text(&outcome, "tls_version");
        row.tls_cipher = text(&outcome, "tls_cipher");
        row.final_at = outcome.get("at_us").and_then(Value::as_u64).map(rfc3339_us);
    }
    for (id, dsn) in dsns {
        if let Some(message) = by_id.get(&id).and_then(|key| messages.get_mut(key)) {
            message.dsns.push(dsn);
        }
    }
    for message in messages.values_mut() {
        let expected = expected_recipients
            .get(&message.message_id)
            .copied()
            .unwrap_or(0) as usize;
        while message.recipients.len() < expected {
            message.recipients.push(RecipientRow {
                outcome: "pending".into(),
                ..RecipientRow::default()
            });
        }
    }
    Ok(messages.into_values().collect())
}

/// Quotes a CSV field when it needs it (RFC 4180 §2).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Renders the table as CSV, one row per recipient.
pub fn to_csv(rows: &[MessageRow]) -> String {
    let mut out = String::from(
        "message_id,received_at,lane,category,peer_uid,recipient,outcome,attempts,reply_code,remote_host,remote_ip,tls_version,tls_cipher,final_at,dsns\r\n",
    );
    for message in rows {
        for recipient in &message.recipients {
            let fields = [
                message.message_id.clone(),
                message.received_at.clone(),
                message.lane.clone(),
                message.category.clone(),
                message
                    .peer_uid
                    .map(|uid| uid.to_string())
                    .unwrap_or_default(),
                recipient.recipient.clone(),
                recipient.outcome.clone(),
                recipient.attempts.to_string(),
                recipient
                    .reply_code
                    .map(|code| code.to_string())
                    .unwrap_or_default(),
                recipient.remote_host.clone().unwrap_or_default(),
                recipient.remote_ip.clone().unwrap_or_default(),
                recipient.tls_version.clone().unwrap_or_default(),
                recipient.tls_cipher.clone().unwrap_or_default(),
                recipient.final_at.clone().unwrap_or_default(),
                message.dsns.join(" "),
            ];
            let line: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
            out.push_str(&line.join(","));
            out.push_str("\r\n");
        }
    }
    out
}
