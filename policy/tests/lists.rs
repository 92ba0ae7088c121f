//! Consent and suppression lists: verdicts, journal replay, CSV import and
//! the list file, all against real files in a temporary directory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::Arc;

use caduceus_policy::lists::{
    Change, ChangeOp, Entry, ImportError, ImportList, ImportOptions, Journal, JournalError,
    ListBuilder, ListFileError, ListStore, ListStoreError, ListTable, Reason, import_csv,
};
use caduceus_policy::{Category, Lists, SiteKey, Verdict};

fn site_key() -> SiteKey {
    SiteKey::from_bytes(&[0x5a; 32])
}

fn change(key: &SiteKey, op: ChangeOp, entry: Entry, address: &str) -> Change {
    Change {
        op,
        entry,
        hmac: key.try_hmac_address(address).unwrap(),
        time_unix_ms: 1_780_000_000_000,
    }
}

fn add(key: &SiteKey, entry: Entry, address: &str) -> Change {
    change(key, ChangeOp::Add, entry, address)
}

const CONSENT: Entry = Entry::Consent;
const OPT_OUT: Entry = Entry::Suppression(Reason::OptOut);
const HARD_BOUNCE: Entry = Entry::Suppression(Reason::HardBounce);
const COMPLAINT: Entry = Entry::Suppression(Reason::Complaint);

/// Returns each address, its entries, and the expected verdict for
/// transactional, care and marketing mail.
fn verdict_table() -> Vec<(&'static str, Vec<Entry>, [Verdict; 3])> {
    use Verdict::{Allowed, NoConsent, Suppressed};
    vec![
        ("nobody@example.com", vec![], [Allowed, Allowed, NoConsent]),
        (
            "opted-in@example.com",
            vec![CONSENT],
            [Allowed, Allowed, Allowed],
        ),
        (
            "opted-out@example.com",
            vec![OPT_OUT],
            [
                Allowed,
                Suppressed(Reason::OptOut),
                Suppressed(Reason::OptOut),
            ],
        ),
        (
            "consent-then-opt-out@example.com",
            vec![CONSENT, OPT_OUT],
            [
                Allowed,
                Suppressed(Reason::OptOut),
                Suppressed(Reason::OptOut),
            ],
        ),
        (
            "bounced@example.com",
            vec![CONSENT, HARD_BOUNCE],
            [
                Suppressed(Reason::HardBounce),
                Suppressed(Reason::HardBounce),
                Suppressed(Reason::HardBounce),
            ],
        ),
        (
            "complained@example.com",
            vec![COMPLAINT],
            [
                Suppressed(Reason::Complaint),
                Suppressed(Reason::Complaint),
                Suppressed(Reason::Complaint),
            ],
        ),
        (
            "everything@example.com",
            vec![CONSENT, OPT_OUT, HARD_BOUNCE, COMPLAINT],
            [
                Suppressed(Reason::Complaint),
                Suppressed(Reason::Complaint),
                Suppressed(Reason::Complaint),
            ],
        ),
        (
            "bounce-and-opt-out@example.com",
            vec![OPT_OUT, HARD_BOUNCE],
            [
                Suppressed(Reason::HardBounce),
                Suppressed(Reason::HardBounce),
                Suppressed(Reason::HardBounce),
            ],
        ),
    ]
}

const CATEGORIES: [Category; 3] = [Category::Transactional, Category::Care, Category::Marketing];

fn table_changes(key: &SiteKey) -> Vec<Change> {
    verdict_table()
        .into_iter()
        .flat_map(|(address, entries, _)| {
            entries
                .into_iter()
                .map(move |entry| add(key, entry, address))
        })
        .collect()
}

fn assert_verdicts(lists: &Lists, key: &SiteKey, path: &str) {
    for (address, _, expected) in verdict_table() {
        let hmac = key.try_hmac_address(address).unwrap();
        for (category, verdict) in CATEGORIES.iter().zip(expected) {
            assert_eq!(
                lists.check(&hmac, *category),
                verdict,
                "{path}: {address} as {}",
                category.as_str()
            );
        }
    }
}

#[test]
fn verdicts_from_base_and_overlay() {
    let key = site_key();
    let changes = table_changes(&key);

    // The same entries as runtime changes over empty lists...
    let overlay = Lists::empty(&key).with_changes(&changes);
    assert_verdicts(&overlay, &key, "overlay");

    // ...as a compiled base table...
    let mut builder = ListBuilder::new();
    builder.apply(&changes);
    let table = Arc::new(builder.build(&key));
    let base = Lists::from_table(Arc::clone(&table));
    assert_verdicts(&base, &key, "base");
    for (address, _, expected) in verdict_table() {
        let hmac = key.try_hmac_address(address).unwrap();
        for (category, verdict) in CATEGORIES.iter().zip(expected) {
            assert_eq!(table.check(&hmac, *category), verdict, "table: {address}");
        }
    }

    // ...and compiled again from base plus overlay.
    let folded = Lists::from_table(Arc::new(overlay.to_builder().build(&key)));
    assert_verdicts(&folded, &key, "folded");
    assert_eq!(folded.overlay_len(), 0);
}

#[test]
fn normalised_forms_share_entry() {
    let key = site_key();
    let lists = Lists::empty(&key).with_changes(&[add(&key, OPT_OUT, "Pat@Bücher.Example")]);
    let hmac = key.try_hmac_address("Pat@xn--bcher-kva.example").unwrap();
    assert_eq!(
        lists.check(&hmac, Category::Care),
        Verdict::Suppressed(Reason::OptOut)
    );
    // The local part is case-sensitive (RFC 5321 §2.4).
    let other = key.try_hmac_address("pat@xn--bcher-kva.example").unwrap();
    assert_eq!(lists.check(&other, Category::Care), Verdict::Allowed);
}

#[test]
fn overlay_removes_base_entry() {
    let key = site_key();
    let mut builder = ListBuilder::new();
    builder.apply(&[
        add(&key, OPT_OUT, "a@example.com"),
        add(&key, CONSENT, "a@example.com"),
    ]);
    let base = Lists::from_table(Arc::new(builder.build(&key)));
    let hmac = key.try_hmac_address("a@example.com").unwrap();
    assert_eq!(
        base.check(&hmac, Category::Marketing),
        Verdict::Suppressed(Reason::OptOut)
    );

    let removed = base.with_changes(&[change(&key, ChangeOp::Remove, OPT_OUT, "a@example.com")]);
    assert_eq!(removed.check(&hmac, Category::Marketing), Verdict::Allowed);
    assert!(removed.contains(&hmac, CONSENT));
    assert!(!removed.contains(&hmac, OPT_OUT));
    // The earlier snapshot is unchanged.
    assert_eq!(
        base.check(&hmac, Category::Marketing),
        Verdict::Suppressed(Reason::OptOut)
    );

    let both_removed =
        removed.with_changes(&[change(&key, ChangeOp::Remove, CONSENT, "a@example.com")]);
    let compiled = both_removed.to_builder().build(&key);
    assert_eq!(compiled.len(), 0, "an address with no entries is dropped");
}

#[test]
fn journal_replays_after_restart() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let list_path = directory.path().join("lists.bin");
    let journal_path = directory.path().join("lists.journal");

    let mut store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    let published = store.published();
    let changes = table_changes(&key);
    store.apply(&changes[..3]).unwrap();
    store.apply(&changes[3..]).unwrap();
    assert_verdicts(&published.load(), &key, "published before restart");
    drop(store);
    assert!(
        !list_path.exists(),
        "no compile ran, so only the journal holds the changes"
    );

    // A restart replays the journal over the (missing) list file.
    let mut store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    assert_verdicts(&store.snapshot(), &key, "replayed");
    assert_eq!(store.snapshot().base().len(), 0);

    // A compile moves the changes into the list file and empties the
    // journal, and a restart after it still finds them.
    store.compile().unwrap();
    assert_eq!(store.snapshot().overlay_len(), 0);
    let journal_size = fs::metadata(&journal_path).unwrap().len();
    assert_eq!(journal_size, 32, "journal holds only its header");
    drop(store);
    let store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    assert_verdicts(&store.snapshot(), &key, "compiled");
    assert_eq!(store.snapshot().overlay_len(), 0);
}

#[test]
fn journal_replay_is_idempotent() {
    // A crash after the list file is written but before the journal is
    // emptied replays changes the file already holds.
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let list_path = directory.path().join("lists.bin");
    let journal_path = directory.path().join("lists.journal");
    let changes = vec![
        add(&key, CONSENT, "a@example.com"),
        add(&key, OPT_OUT, "a@example.com"),
        change(&key, ChangeOp::Remove, OPT_OUT, "a@example.com"),
        add(&key, COMPLAINT, "b@example.com"),
    ];
    let (mut journal, replayed) = Journal::open(&journal_path, &key).unwrap();
    assert!(replayed.is_empty());
    journal.append(&changes).unwrap();
    drop(journal);
    let mut builder = ListBuilder::new();
    builder.apply(&changes);
    builder.build(&key).write(&list_path).unwrap();

    let store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    let lists = store.snapshot();
    let a = key.try_hmac_address("a@example.com").unwrap();
    let b = key.try_hmac_address("b@example.com").unwrap();
    assert_eq!(lists.check(&a, Category::Marketing), Verdict::Allowed);
    assert_eq!(
        lists.check(&b, Category::Transactional),
        Verdict::Suppressed(Reason::Complaint)
    );
    assert_eq!(lists.base().len(), 2);
}

#[test]
fn journal_cuts_torn_last_record() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("lists.journal");
    let (mut journal, _) = Journal::open(&path, &key).unwrap();
    journal
        .append(&[add(&key, OPT_OUT, "a@example.com")])
        .unwrap();
    journal
        .append(&[add(&key, OPT_OUT, "b@example.com")])
        .unwrap();
    drop(journal);
    let full_length = fs::metadata(&path).unwrap().len();

    // Half of a third record, as a crash during the write leaves it.
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&[1u8; 20]).unwrap();
    drop(file);
    let (_, changes) = Journal::open(&path, &key).unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(fs::metadata(&path).unwrap().len(), full_length);

    // A whole last record with a bad checksum is also a torn write.
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (_, changes) = Journal::open(&path, &key).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].hmac,
        key.try_hmac_address("a@example.com").unwrap()
    );
}

#[test]
fn journal_rejects_damage_before_end() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("lists.journal");
    let (mut journal, _) = Journal::open(&path, &key).unwrap();
    journal
        .append(&[
            add(&key, OPT_OUT, "a@example.com"),
            add(&key, OPT_OUT, "b@example.com"),
        ])
        .unwrap();
    drop(journal);
    let mut bytes = fs::read(&path).unwrap();
    bytes[32 + 20] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let error = Journal::open(&path, &key).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, JournalError::Invalid { .. }), "{message}");
    assert!(message.contains("record 0"), "{message}");
}

#[test]
fn journal_rejects_other_site_key() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("lists.journal");
    Journal::open(&path, &site_key()).unwrap();
    let other = SiteKey::from_bytes(&[0x11; 32]);
    let error = Journal::open(&path, &other).unwrap_err();
    assert!(error.to_string().contains("different site key"), "{error}");
}

fn suppression_import(default_reason: Option<Reason>) -> ImportOptions {
    ImportOptions {
        list: ImportList::Suppression { default_reason },
        threads: 2,
    }
}

fn import_error(input: &str, options: &ImportOptions) -> (u64, String) {
    match import_csv(input.as_bytes(), &site_key(), options) {
        Err(ImportError::Line { line, problem }) => (line, problem),
        other => panic!("expected a line error for {input:?}, got {other:?}"),
    }
}

#[test]
fn csv_import_reads_reasons() {
    let key = site_key();
    let input = "\u{feff}Address,Reason\r\n\
                 a@example.com,opt-out\r\n\
                 \r\n\
                 \"\"\"x,y\"\"@example.com\",Complaint\n\
                 b@Bücher.example\n\
                 a@example.com,hard-bounce\n";
    let imported = import_csv(
        input.as_bytes(),
        &key,
        &suppression_import(Some(Reason::HardBounce)),
    )
    .unwrap();
    assert_eq!(imported.len(), 3, "a@example.com appears twice");
    let mut builder = ListBuilder::new();
    builder.add_imported(imported);
    let table = builder.build(&key);
    let a = key.try_hmac_address("a@example.com").unwrap();
    assert!(table.contains(&a, OPT_OUT));
    assert!(table.contains(&a, HARD_BOUNCE));
    let quoted = key.try_hmac_address("\"x,y\"@example.com").unwrap();
    assert!(table.contains(&quoted, COMPLAINT));
    let b = key.try_hmac_address("b@xn--bcher-kva.example").unwrap();
    assert!(table.contains(&b, HARD_BOUNCE), "default reason applies");
}

#[test]
fn csv_import_errors_name_line() {
    let no_default = suppression_import(None);
    let with_default = suppression_import(Some(Reason::OptOut));
    let consent = ImportOptions {
        list: ImportList::Consent,
        threads: 2,
    };
    let cases: [(&str, &ImportOptions, u64, &str); 9] = [
        (
            "address\na@example.com\nno-at-sign\n",
            &with_default,
            3,
            "no @",
        ),
        (
            "a@example.com,opt-out\nb@example.com,bounced\n",
            &no_default,
            2,
            "unknown reason",
        ),
        (
            "a@example.com,opt-out\nb@example.com\n",
            &no_default,
            2,
            "no reason",
        ),
        (
            "a@example.com\nb@example.com,opt-out\n",
            &consent,
            2,
            "takes no reason",
        ),
        (
            "a@example.com\n\"b@example.com\n",
            &consent,
            2,
            "not closed",
        ),
        (
            "a@example.com\nb@example.com,opt-out,x\n",
            &with_default,
            2,
            "more than two",
        ),
        (
            "a@example.com\n,opt-out\n",
            &with_default,
            2,
            "address field is empty",
        ),
        (
            "a@example.com\nb@under_score.example\n",
            &consent,
            2,
            "invalid domain",
        ),
        (
            "a@example.com\r\n\r\n@example.com\r\n",
            &consent,
            3,
            "local part is empty",
        ),
    ];
    for (input, options, expected_line, expected_text) in cases {
        let (line, problem) = import_error(input, options);
        assert_eq!(line, expected_line, "{input:?}: {problem}");
        assert!(problem.contains(expected_text), "{input:?}: {problem}");
        assert!(
            !problem.contains("example.com"),
            "errors never repeat the address: {problem}"
        );
    }

    let mut bytes = b"a@example.com\nb@example.com\n".to_vec();
    bytes.extend_from_slice(b"\xff\xfe@example.com\n");
    match import_csv(&bytes[..], &site_key(), &consent) {
        Err(ImportError::Line { line: 3, problem }) => assert!(problem.contains("UTF-8")),
        other => panic!("expected a UTF-8 error on line 3, got {other:?}"),
    }
}

#[test]
fn csv_import_first_error_across_chunks() {
    // About 3 MB of input spans several 1 MiB chunks, so both threads see
    // errors; the earliest line must win whichever thread finishes first.
    let mut input = String::new();
    for n in 1..=150_000u32 {
        match n {
            70_001 => input.push_str("bad-line-one\n"),
            140_001 => input.push_str("bad-line-two\n"),
            _ => input.push_str(&format!("user{n}@example.com\n")),
        }
    }
    for _ in 0..5 {
        let (line, problem) = import_error(&input, &suppression_import(Some(Reason::OptOut)));
        assert_eq!(line, 70_001, "{problem}");
    }
}

#[test]
fn csv_import_rejects_overlong_line() {
    let input = format!("a@example.com\n{}\n", "x".repeat(2 << 20));
    let (line, problem) = import_error(&input, &suppression_import(Some(Reason::OptOut)));
    assert_eq!(line, 2);
    assert!(problem.contains("longer than"), "{problem}");
}

#[test]
fn list_file_round_trip() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("lists.bin");
    let addresses: Vec<String> = (0..5_000)
        .map(|n| format!("patient{n}@clinic.example"))
        .collect();
    let mut builder = ListBuilder::new();
    let changes: Vec<Change> = addresses
        .iter()
        .enumerate()
        .map(|(n, address)| {
            let entry = [CONSENT, OPT_OUT, HARD_BOUNCE, COMPLAINT][n % 4];
            add(&key, entry, address)
        })
        .collect();
    builder.apply(&changes);
    let table = builder.build(&key);
    table.write(&path).unwrap();
    let size = fs::metadata(&path).unwrap().len();
    assert_eq!(size, 64 + 16 * 5_000);

    let loaded = ListTable::open(&path, &key).unwrap();
    let bytes = fs::read(&path).unwrap();
    let shared = ListTable::from_image(Arc::new(bytes.clone()), &key, "memory").unwrap();
    for candidate in [&table, &loaded, &shared] {
        assert_eq!(candidate.len(), 5_000);
        for change in &changes {
            assert!(candidate.contains(&change.hmac, change.entry));
        }
        let absent = key.try_hmac_address("patient5000@clinic.example").unwrap();
        assert_eq!(
            candidate.check(&absent, Category::Marketing),
            Verdict::NoConsent
        );
    }

    let empty = ListTable::empty(&key);
    empty.write(&path).unwrap();
    assert!(ListTable::open(&path, &key).unwrap().is_empty());
}

#[test]
fn list_file_rejects_damage() {
    let key = site_key();
    let mut builder = ListBuilder::new();
    builder.apply(&[
        add(&key, OPT_OUT, "a@example.com"),
        add(&key, CONSENT, "b@example.com"),
    ]);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("lists.bin");
    builder.build(&key).write(&path).unwrap();
    let good = fs::read(&path).unwrap();

    let open_bytes = |bytes: Vec<u8>, key: &SiteKey| match ListTable::from_image(
        Arc::new(bytes),
        key,
        "test image",
    ) {
        Err(ListFileError::Invalid { problem, .. }) => problem,
        other => panic!("expected an invalid file, got {other:?}"),
    };
    let mut flipped_record = good.clone();
    flipped_record[64 + 3] ^= 0x40;
    assert!(open_bytes(flipped_record, &key).contains("record checksum"));
    let mut flipped_header = good.clone();
    flipped_header[17] ^= 0x01;
    assert!(open_bytes(flipped_header, &key).contains("header checksum"));
    let truncated = good[..good.len() - 1].to_vec();
    assert!(open_bytes(truncated, &key).contains("truncated"));
    assert!(open_bytes(good[..10].to_vec(), &key).contains("shorter than"));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(open_bytes(magic, &key).contains("magic"));
    let other_key = SiteKey::from_bytes(&[0x11; 32]);
    assert!(open_bytes(good.clone(), &other_key).contains("different site key"));

    let missing = ListTable::open(&directory.path().join("missing.bin"), &key).unwrap_err();
    assert!(matches!(
        missing,
        ListFileError::Io {
            operation: "open",
            ..
        }
    ));
}

#[test]
fn store_compiles_when_overlay_fills() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let list_path = directory.path().join("lists.bin");
    let journal_path = directory.path().join("lists.journal");
    let mut store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    store.set_max_overlay_entries(10);
    for n in 0..25 {
        store
            .apply(&[add(&key, OPT_OUT, &format!("u{n}@example.com"))])
            .unwrap();
        assert!(store.snapshot().overlay_len() <= 10);
    }
    let lists = store.snapshot();
    for n in 0..25 {
        let hmac = key.try_hmac_address(&format!("u{n}@example.com")).unwrap();
        assert!(lists.contains(&hmac, OPT_OUT), "u{n}");
    }
    assert!(lists.base().len() >= 15, "two compiles ran");
}

#[test]
fn store_import_keeps_runtime_changes() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let list_path = directory.path().join("lists.bin");
    let journal_path = directory.path().join("lists.journal");
    let mut store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();

    store
        .apply(&[add(&key, CONSENT, "runtime@example.com")])
        .unwrap();

    let imported = import_csv(
        "imported@example.com\n".as_bytes(),
        &key,
        &ImportOptions {
            list: ImportList::Consent,
            threads: 1,
        },
    )
    .unwrap();
    store.import(imported).unwrap();
    drop(store);

    let store = ListStore::open(&list_path, &journal_path, key.clone()).unwrap();
    let lists = store.snapshot();
    for address in ["runtime@example.com", "imported@example.com"] {
        let hmac = key.try_hmac_address(address).unwrap();
        assert_eq!(
            lists.check(&hmac, Category::Marketing),
            Verdict::Allowed,
            "{address}"
        );
    }
    assert_eq!(lists.base().len(), 2);
}

#[test]
fn store_rejects_damaged_list_file() {
    let key = site_key();
    let directory = tempfile::tempdir().unwrap();
    let list_path = directory.path().join("lists.bin");
    fs::write(&list_path, b"not a list file").unwrap();
    let error = ListStore::open(&list_path, &directory.path().join("j"), key).unwrap_err();
    assert!(matches!(error, ListStoreError::File(_)), "{error}");
}

#[test]
fn import_of_one_million() {
    let key = site_key();
    let mut input = String::with_capacity(30 << 20);
    input.push_str("address,reason\n");
    let reasons = ["opt-out", "hard-bounce", "complaint", ""];
    for n in 0..1_000_000u32 {
        input.push_str(&format!(
            "member{n}@plan{}.example,{}\n",
            n % 97,
            reasons[n as usize % 4]
        ));
    }
    let imported = import_csv(
        input.as_bytes(),
        &key,
        &suppression_import(Some(Reason::OptOut)),
    )
    .unwrap();

    assert_eq!(imported.len(), 1_000_000);
    let mut builder = ListBuilder::new();
    builder.add_imported(imported);
    let table = builder.build(&key);
    assert_eq!(table.len(), 1_000_000);

    for n in (0..1_000_000u32).step_by(997) {
        let hmac = key
            .try_hmac_address(&format!("member{n}@plan{}.example", n % 97))
            .unwrap();
        let expected = [
            Reason::OptOut,
            Reason::HardBounce,
            Reason::Complaint,
            Reason::OptOut,
        ][n as usize % 4];
        assert_eq!(
            table.check(&hmac, Category::Transactional),
            if expected == Reason::OptOut {
                Verdict::Allowed
            } else {
                Verdict::Suppressed(expected)
            },
            "member{n}"
        );
        assert_eq!(
            table.check(&hmac, Category::Care),
            Verdict::Suppressed(expected)
        );
    }
    let absent = key.try_hmac_address("member1000000@plan0.example").unwrap();
    assert_eq!(table.check(&absent, Category::Care), Verdict::Allowed);
}

#[test]
fn lists_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Lists>();
    assert_send_sync::<ListTable>();
    assert_send_sync::<ListStore>();
}
