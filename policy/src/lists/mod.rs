//! Consent and suppression lists.
//!
//! Both lists store addresses only as HMAC-SHA-256 of the normalised address
//! under the site key ([`crate::SiteKey::try_hmac_address`]), never in clear
//! and never as a plain hash, which a dictionary of addresses reverses.
//!
//! One table contains both lists: each entry is a truncated HMAC (see
//! [`table`]) with a byte of flags saying which lists it is on and for which
//! suppression reasons. The engine checks a recipient with
//! [`Lists::check`], which reads an immutable snapshot and so takes no lock.
//! The control thread owns a [`ListStore`]: it journals each change durably,
//! then publishes a new snapshot that the delivery cores pick up through
//! `arc-swap`.

mod import;
mod journal;
mod store;
mod table;

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::Category;

pub use import::{ImportError, ImportList, ImportOptions, ImportedRecords, import_csv};
pub use journal::{Journal, JournalError};
pub use store::{ListStore, ListStoreError};
pub use table::{ListBuilder, ListFileError, ListTable};

/// The reason an address is suppressed.
///
/// The discriminants are flag bits stored in list files and journals; never
/// renumber them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// The recipient asked to receive no more mail (CAN-SPAM opt-out).
    OptOut = 0b0000_0010,
    /// A delivery to the address failed permanently.
    HardBounce = 0b0000_0100,
    /// The recipient reported a message as spam.
    Complaint = 0b0000_1000,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::OptOut, Reason::HardBounce, Reason::Complaint];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OptOut => "opt-out",
            Reason::HardBounce => "hard-bounce",
            Reason::Complaint => "complaint",
        }
    }

    /// Parses `opt-out`, `hard-bounce` or `complaint`, ignoring ASCII case.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL
            .into_iter()
            .find(|reason| text.eq_ignore_ascii_case(reason.as_str()))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One list membership of an address: recorded marketing consent, or a
/// suppression for one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    Consent,
    Suppression(Reason),
}

impl Entry {
    /// Returns the flag bit of this entry in a record.
    pub(crate) fn flag(self) -> u8 {
        match self {
            Entry::Consent => CONSENT_FLAG,
            Entry::Suppression(reason) => reason as u8,
        }
    }

    pub(crate) fn from_flag(flag: u8) -> Option<Entry> {
        if flag == CONSENT_FLAG {
            return Some(Entry::Consent);
        }
        Reason::ALL
            .into_iter()
            .find(|reason| *reason as u8 == flag)
            .map(Entry::Suppression)
    }
}

/// Flag bit of a marketing opt-in.
pub(crate) const CONSENT_FLAG: u8 = 0b0000_0001;
/// Every flag bit a record may carry; the others must be zero.
pub(crate) const KNOWN_FLAGS: u8 =
    CONSENT_FLAG | Reason::OptOut as u8 | Reason::HardBounce as u8 | Reason::Complaint as u8;

/// The outcome of checking one recipient against the lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Marketing mail to an address without recorded opt-in consent.
    NoConsent,
    Suppressed(Reason),
}

/// Whether a change adds or removes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOp {
    Add,
    Remove,
}

/// One runtime change to the lists, as the control plane journals it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub op: ChangeOp,
    pub entry: Entry,
    /// HMAC-SHA-256 of the normalised address under the site key.
    pub hmac: [u8; 32],
    /// When the operator or the bounce processor made the change.
    pub time_unix_ms: u64,
}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The HMAC is printed as a short prefix, as logs show it.
        f.debug_struct("Change")
            .field("op", &self.op)
            .field("entry", &self.entry)
            .field("hmac_prefix", &hex::encode(&self.hmac[..8]))
            .field("time_unix_ms", &self.time_unix_ms)
            .finish()
    }
}

/// Returns the table key of an HMAC: its first 15 bytes as the high 120 bits
/// of a `u128`, with the low 8 bits, where records keep their flags, zero.
pub(crate) fn key_of(hmac: &[u8; 32]) -> u128 {
    let mut prefix = [0u8; 16];
    prefix[..15].copy_from_slice(&hmac[..15]);
    u128::from_be_bytes(prefix)
}

/// Applies the rules of each category to the flags of one address.
///
/// Marketing needs recorded consent (HIPAA, 45 CFR 164.508(a)(3)) and honours
/// every suppression. Care honours opt-outs, hard bounces and complaints.
/// Transactional mail honours hard bounces and complaints but not opt-outs,
/// because CAN-SPAM opt-outs cover commercial messages only. A suppression
/// wins over consent, so an opted-out address gets no marketing even with a
/// consent record.
pub(crate) fn verdict_of(flags: u8, category: Category) -> Verdict {
    let honoured: &[Reason] = match category {
        Category::Marketing | Category::Care => {
            &[Reason::Complaint, Reason::HardBounce, Reason::OptOut]
        }
        Category::Transactional => &[Reason::Complaint, Reason::HardBounce],
    };
    // The most serious reason is reported when several apply.
    if let Some(reason) = honoured.iter().find(|reason| flags & **reason as u8 != 0) {
        return Verdict::Suppressed(*reason);
    }
    if category == Category::Marketing && flags & CONSENT_FLAG == 0 {
        return Verdict::NoConsent;
    }
    Verdict::Allowed
}

/// A hasher for table keys, which are HMAC outputs. It uses 64 bits of the
/// key as the hash.
///
/// Keys are HMACs under the secret site key, so they are uniformly
/// distributed, and a sender without the key cannot choose addresses whose
/// keys collide. A keyed hash such as SipHash would add cost and no
/// protection.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if a key is hashed as bytes; fold them in.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = (key >> 64) as u64;
    }
}

pub(crate) type Overlay = HashMap<u128, u8, BuildHasherDefault<KeyHasher>>;

/// An immutable snapshot of both lists: a base table plus the runtime
/// changes made since the table was compiled.
///
/// `Lists` is `Send + Sync` and never changes after it is built. The
/// control thread makes a new snapshot for each batch of changes with
/// [`Lists::with_changes`], sharing the base table, and publishes it; see
/// [`ListStore`].
#[derive(Clone)]
pub struct Lists {
    base: Arc<ListTable>,
    /// The flags of every key changed since the base was compiled, 0 for a
    /// key whose last entry was removed. Consulted before the base.
    overlay: Arc<Overlay>,
}

impl fmt::Debug for Lists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only counts, so that logging a snapshot never dumps its HMACs.
        f.debug_struct("Lists")
            .field("base_len", &self.base.len())
            .field("overlay_len", &self.overlay.len())
            .finish()
    }
}

impl Lists {
    /// Returns lists with no entries for the site key `key`. Under them,
    /// marketing mail is never allowed and other mail always is.
    pub fn empty(key: &crate::SiteKey) -> Lists {
        Lists::from_table(Arc::new(ListTable::empty(key)))
    }

    pub fn from_table(base: Arc<ListTable>) -> Lists {
        Lists {
            base,
            overlay: Arc::new(Overlay::default()),
        }
    }

    /// Checks one recipient, given as the HMAC of its normalised address.
    /// Allocates nothing and takes no locks.
    pub fn check(&self, hmac: &[u8; 32], category: Category) -> Verdict {
        verdict_of(self.flags(hmac), category)
    }

    /// Returns the flag byte of an address: the overlay's value when the
    /// address changed at runtime, else the base table's, else 0.
    fn flags(&self, hmac: &[u8; 32]) -> u8 {
        let key = key_of(hmac);
        if !self.overlay.is_empty()
            && let Some(flags) = self.overlay.get(&key)
        {
            return *flags;
        }
        self.base.flags_of_key(key)
    }

    /// Returns whether an address is on the list that `entry` names.
    pub fn contains(&self, hmac: &[u8; 32], entry: Entry) -> bool {
        self.flags(hmac) & entry.flag() != 0
    }

    /// Returns a new snapshot with `changes` applied in order. The base table
    /// is shared, and the overlay is copied, so the cost grows with the
    /// number of changes since the last compile. [`ListStore`] compiles
    /// when the overlay grows past its limit.
    pub fn with_changes(&self, changes: &[Change]) -> Lists {
        let mut overlay = Overlay::clone(&self.overlay);
        overlay.reserve(changes.len());
        for change in changes {
            let key = key_of(&change.hmac);
            let current = match overlay.get(&key) {
                Some(flags) => *flags,
                None => self.base.flags_of_key(key),
            };
            let flag = change.entry.flag();
            let next = match change.op {
                ChangeOp::Add => current | flag,
                ChangeOp::Remove => current & !flag,
            };
            overlay.insert(key, next);
        }
        Lists {
            base: Arc::clone(&self.base),
            overlay: Arc::new(overlay),
        }
    }

    /// Returns the table compiled from list files and imports.
    pub fn base(&self) -> &Arc<ListTable> {
        &self.base
    }

    /// Returns the number of addresses changed at runtime since the base
    /// table was compiled.
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// Returns a builder holding the base table with the overlay folded in,
    /// ready to be written as the next list file.
    pub fn to_builder(&self) -> ListBuilder {
        let mut builder = ListBuilder::from_table(&self.base);
        builder.set_flags(self.overlay.iter().map(|(key, flags)| (*key, *flags)));
        builder
    }
}
