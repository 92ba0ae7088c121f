//! Per-destination pacing: a token bucket for the message rate, and a
//! backoff factor that cuts the rate and the connection count when a
//! receiver pushes back.

use std::time::{Duration, Instant};

use crate::smtp::Reply;

/// The maximum wait that `TokenBucket::take` returns. Callers wait and
/// then take again, so a longer wait is split into several. Without the
/// cap, a rate such as 1e-300 gives a wait that no `Duration` can store.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// A token bucket: `rate_per_sec` tokens per second, holding at most
/// `burst` (and at least one) tokens.
///
/// Over any interval of length T it grants at most `burst + rate × T`
/// tokens, so a one-second window never holds more than `rate + burst`
/// messages.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// Creates a full bucket.
    pub fn new(rate_per_sec: f64, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            rate_per_sec,
            capacity,
            tokens: capacity,
            updated: now,
        }
    }

    pub fn rate_per_sec(&self) -> f64 {
        self.rate_per_sec
    }

    /// Changes the rate, keeping the tokens earned so far.
    pub fn set_rate(&mut self, rate_per_sec: f64, now: Instant) {
        self.refill(now);
        self.rate_per_sec = rate_per_sec;
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.capacity);
        self.updated = now;
    }

    /// Takes one token, or returns how long until one is available, at
    /// most `MAX_WAIT`.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.rate_per_sec <= 0.0 {
            return Err(Duration::from_secs(1));
        }
        let missing = 1.0 - self.tokens;
        let wait = Duration::try_from_secs_f64(missing / self.rate_per_sec).unwrap_or(MAX_WAIT);
        Err(wait.min(MAX_WAIT))
    }
}

/// The floor of the backoff factor: a destination in the deepest backoff
/// still gets 1/16 of its configured rate and one connection.
const MIN_FACTOR: f64 = 1.0 / 16.0;
/// Each push-back halves the factor.
const CUT: f64 = 0.5;
/// Each recovery step multiplies the factor by this, up to 1.
const RECOVER: f64 = 1.25;
/// Successful deliveries between two recovery steps.
const SUCCESSES_PER_STEP: u32 = 20;
/// Push-backs within this interval count as one, so that one burst of 421
/// replies from a pipelined batch does not cut the rate several times.
const CUT_INTERVAL: Duration = Duration::from_secs(1);

/// The throttling of a destination below its configured limits.
#[derive(Clone, Debug)]
pub struct Backoff {
    factor: f64,
    successes: u32,
    last_cut: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            factor: 1.0,
            successes: 0,
            last_cut: None,
        }
    }
}

/// A change of the backoff factor, for the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FactorChange {
    pub from: f64,
    pub to: f64,
}

impl Backoff {
    pub fn factor(&self) -> f64 {
        self.factor
    }

    pub fn is_active(&self) -> bool {
        self.factor < 1.0
    }

    /// Records a reply that shows the receiver pushing back.
    pub fn push_back(&mut self, now: Instant) -> Option<FactorChange> {
        self.successes = 0;
        if let Some(last) = self.last_cut
            && now.saturating_duration_since(last) < CUT_INTERVAL
        {
            return None;
        }
        let from = self.factor;
        self.factor = (self.factor * CUT).max(MIN_FACTOR);
        self.last_cut = Some(now);
        (self.factor != from).then_some(FactorChange {
            from,
            to: self.factor,
        })
    }

    /// Records a successful delivery; every `SUCCESSES_PER_STEP` of them
    /// raise the factor one step.
    pub fn success(&mut self) -> Option<FactorChange> {
        if self.factor >= 1.0 {
            return None;
        }
        self.successes += 1;
        if self.successes < SUCCESSES_PER_STEP {
            return None;
        }
        self.successes = 0;
        let from = self.factor;
        self.factor = (self.factor * RECOVER).min(1.0);
        Some(FactorChange {
            from,
            to: self.factor,
        })
    }

    /// The connection limit under backoff: the configured limit scaled by
    /// the factor, at least one.
    pub fn connections(&self, configured: u32) -> u32 {
        ((f64::from(configured) * self.factor).floor() as u32).max(1)
    }
}

/// Whether a reply shows the receiver asking the sender to slow down: a
/// 421, or a 4xx whose text matches one of `patterns` (lowercase,
/// compared case-insensitively).
pub fn is_push_back(reply: &Reply, patterns: &[String]) -> bool {
    if reply.code == 421 {
        return true;
    }
    if !reply.is_transient() {
        return false;
    }
    let text = reply.lines.join(" ").to_ascii_lowercase();
    patterns
        .iter()
        .any(|pattern| text.contains(pattern.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::EnhancedStatus;

    #[test]
    fn bucket_grants_burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5, start);
        for _ in 0..5 {
            assert!(bucket.take(start).is_ok());
        }
        let wait = bucket.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(bucket.take(start + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn bucket_wait_for_tiny_rate_is_capped() {
        // rate = 1e-300 passes `policy check` (it is finite and above
        // zero). The wait for its second token is 1e300 seconds, which no
        // Duration can store, and the executor thread panicked on it.
        let start = Instant::now();
        for rate in [1e-300, f64::MIN_POSITIVE, 1e-19, 1e-9] {
            let mut bucket = TokenBucket::new(rate, 1, start);
            assert!(bucket.take(start).is_ok());
            let wait = bucket.take(start).unwrap_err();
            assert_eq!(wait, MAX_WAIT, "rate {rate}");
            assert!(start.checked_add(wait).is_some(), "rate {rate}");
        }
    }

    #[test]
    fn bucket_never_exceeds_rate_plus_burst_per_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(200.0, 20, start);
        let mut granted = Vec::new();
        let mut now = start;
        while now < start + Duration::from_secs(3) {
            match bucket.take(now) {
                Ok(()) => granted.push(now),
                Err(wait) => now += wait,
            }
        }
        for (index, first) in granted.iter().enumerate() {
            let in_window = granted[index..]
                .iter()
                .take_while(|at| at.duration_since(*first) < Duration::from_secs(1))
                .count();
            assert!(in_window <= 220, "{in_window} grants in one second");
        }
        let rate = granted.len() as f64 / 3.0;
        assert!((rate - 200.0).abs() / 200.0 < 0.1, "sustained {rate}/s");
    }

    #[test]
    fn backoff_cuts_once_per_interval_and_recovers() {
        let start = Instant::now();
        let mut backoff = Backoff::default();
        assert_eq!(
            backoff.push_back(start),
            Some(FactorChange { from: 1.0, to: 0.5 })
        );
        assert_eq!(backoff.push_back(start + Duration::from_millis(10)), None);
        assert!(backoff.push_back(start + Duration::from_secs(2)).is_some());
        assert_eq!(backoff.factor(), 0.25);
        let mut changes = 0;
        while backoff.is_active() {
            if backoff.success().is_some() {
                changes += 1;
            }
        }
        assert_eq!(backoff.factor(), 1.0);
        assert_eq!(changes, 7, "0.25 × 1.25^7 ≥ 1");
    }

    #[test]
    fn push_back_patterns() {
        let patterns = caduceus_policy::config::DeliveryConfig::default().push_back_patterns;
        let reply = |code, text: &str| Reply::new(code, EnhancedStatus::new(4, 7, 0), text);
        assert!(is_push_back(&reply(421, "closing"), &patterns));
        assert!(is_push_back(&reply(450, "Rate limit exceeded"), &patterns));
        assert!(!is_push_back(&reply(450, "mailbox busy"), &patterns));
        assert!(!is_push_back(
            &Reply::new(550, EnhancedStatus::new(5, 7, 1), "too many errors"),
            &patterns
        ));
    }
}
