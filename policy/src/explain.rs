//! The text behind `caduceus policy explain ADDRESS`.

use std::fmt::Write;

use crate::compiled::{DEFAULT_RULE_ID, EffectiveRule, Policy};
use crate::validate::Matcher;
use crate::{Lane, normalise_address};

impl Policy {
    /// Describes which rule applies to `address` in `lane`, why, and where
    /// each effective setting comes from. `address` may be a full address
    /// or a bare domain, in U-label or A-label form. Returns the reason
    /// when it is neither.
    pub fn explain(&self, address: &str, lane: Lane) -> Result<String, String> {
        let mut text = String::new();
        // Accept a bare domain by giving it a placeholder local part.
        let with_local_part;
        let input = if address.contains('@') {
            address
        } else {
            with_local_part = format!("postmaster@{address}");
            &with_local_part
        };
        let domain = match normalise_address(input) {
            Ok(normalised) => match normalised.rsplit_once('@') {
                Some((_, domain)) => domain.to_string(),
                None => normalised,
            },
            Err(error) => return Err(format!("{address:?}: {error}")),
        };
        // `fmt::Write for String` never returns an error.
        let _ = self.write_explanation(&mut text, &domain, lane);
        Ok(text)
    }

    fn write_explanation(&self, text: &mut String, domain: &str, lane: Lane) -> std::fmt::Result {
        if domain.starts_with('[') {
            writeln!(
                text,
                "domain: {domain} (an address literal, which no domain rule matches)"
            )?;
        } else {
            writeln!(text, "domain: {domain} (lowercase A-label)")?;
        }
        writeln!(text, "lane: {}", lane.as_str())?;
        let rule = self.for_domain(domain, lane);
        if rule.rule_id == DEFAULT_RULE_ID {
            writeln!(text, "matched: no domain rule, so the defaults apply")?;
            self.write_mx_rules(text)?;
        } else {
            let source = &self.sources[rule.rule_id as usize];
            let pattern = match &source.matcher {
                Matcher::Domain(pattern) | Matcher::MxHost(pattern) => pattern,
            };
            let reason = if pattern.wildcard {
                format!("the wildcard matches every name below {}", pattern.name)
            } else {
                "exact match".to_string()
            };
            writeln!(
                text,
                "matched: rule[{}] domain = {:?} ({reason}; the longest matching pattern wins)",
                rule.rule_id,
                pattern.to_string()
            )?;
        }
        self.write_settings(text, rule.settings(), lane)?;
        if let Some(rule_index) = self.sender_rule(domain) {
            let source = &self.sources[rule_index as usize];
            if let Some(category) = source.config.sender_category {
                writeln!(
                    text,
                    "as a sender domain: category {} from rule[{rule_index}]",
                    category.as_str()
                )?;
            }
        }
        Ok(())
    }

    fn write_mx_rules(&self, text: &mut String) -> std::fmt::Result {
        let mx_rules: Vec<String> = self
            .sources
            .iter()
            .enumerate()
            .filter_map(|(index, source)| match &source.matcher {
                Matcher::MxHost(pattern) => {
                    Some(format!("rule[{index}] mx = {:?}", pattern.to_string()))
                }
                Matcher::Domain(_) => None,
            })
            .collect();
        if !mx_rules.is_empty() {
            writeln!(
                text,
                "mx rules: checked against the domain's MX host names at delivery time, and the first host that matches one replaces the defaults below: {}",
                mx_rules.join(", ")
            )?;
        }
        Ok(())
    }

    fn write_settings(
        &self,
        text: &mut String,
        rule: &EffectiveRule,
        lane: Lane,
    ) -> std::fmt::Result {
        let overrides =
            (rule.rule_id != DEFAULT_RULE_ID).then(|| &self.sources[rule.rule_id as usize].config);
        let from = |set_by_rule: bool, default: &str| {
            if set_by_rule {
                format!("rule[{}]", rule.rule_id)
            } else {
                default.to_string()
            }
        };
        let lane_key = format!("lanes.{}", lane.as_str());
        let set = |field: fn(&crate::config::RuleConfig) -> bool| overrides.is_some_and(field);

        writeln!(
            text,
            "  tls = {} ({})",
            rule.tls.as_str(),
            from(set(|r| r.tls.is_some()), "tls.default_mode")
        )?;
        match &rule.route {
            Some(route) => writeln!(text, "  route = {route} (rule[{}])", rule.rule_id)?,
            None => writeln!(
                text,
                "  route: none, so delivery goes to the domain's MX hosts"
            )?,
        }
        match rule.rate_per_sec {
            Some(rate) => writeln!(
                text,
                "  rate = {rate} messages per second, burst = {} (rule[{}])",
                rule.burst, rule.rule_id
            )?,
            None => writeln!(text, "  rate: unlimited")?,
        }
        writeln!(
            text,
            "  max_connections = {} ({})",
            rule.max_connections,
            from(
                set(|r| r.max_connections.is_some()),
                "delivery.max_connections_per_destination"
            )
        )?;
        writeln!(
            text,
            "  max_messages_per_connection = {} ({})",
            rule.max_messages_per_connection,
            from(
                set(|r| r.max_messages_per_connection.is_some()),
                "delivery.max_messages_per_connection"
            )
        )?;
        let schedule: Vec<String> = rule
            .retry_schedule
            .iter()
            .map(|delay| crate::duration::ConfigDuration(*delay).to_string())
            .collect();
        writeln!(
            text,
            "  retry_schedule = [{}] ({})",
            schedule.join(", "),
            from(
                set(|r| r.retry_schedule.is_some()),
                &format!("{lane_key}.retry_schedule")
            )
        )?;
        writeln!(
            text,
            "  max_queue_lifetime = {} ({})",
            crate::duration::ConfigDuration(rule.max_queue_lifetime),
            from(
                set(|r| r.max_queue_lifetime.is_some()),
                &format!("{lane_key}.max_queue_lifetime")
            )
        )?;
        writeln!(
            text,
            "  hold = {} ({})",
            rule.hold,
            from(set(|r| r.hold.is_some()), "default")
        )?;
        if rule.lane_allowed {
            writeln!(
                text,
                "  lanes: the {} lane may send here ({})",
                lane.as_str(),
                from(set(|r| r.lanes.is_some()), "default")
            )?;
        } else {
            writeln!(
                text,
                "  lanes: the {} lane may not send here, so recipients get 550 5.7.1 at RCPT (rule[{}])",
                lane.as_str(),
                rule.rule_id
            )?;
        }
        if rule.source_addresses.is_empty() {
            writeln!(text, "  source_addresses: those of {lane_key}")
        } else {
            let addresses: Vec<String> = rule
                .source_addresses
                .iter()
                .map(|address| address.to_string())
                .collect();
            writeln!(
                text,
                "  source_addresses = [{}] (rule[{}], those also in {lane_key}.source_addresses)",
                addresses.join(", "),
                rule.rule_id
            )
        }
    }
}
