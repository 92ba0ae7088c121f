//! The control plane's owner of the lists: journal, compile and publication.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{Change, ImportedRecords, Journal, JournalError, ListFileError, ListTable, Lists};
use crate::SiteKey;

/// The overlay size at which [`ListStore::apply`] compiles the changes into
/// a new list file. Each change copies the overlay, so this bounds the cost
/// of one change (about 1 MB of copying at this size) and the memory that
/// runtime changes hold.
pub const DEFAULT_MAX_OVERLAY_ENTRIES: usize = 65_536;

/// An error from loading, changing or compiling the lists.
#[derive(Debug, thiserror::Error)]
pub enum ListStoreError {
    #[error(transparent)]
    File(#[from] ListFileError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// The control thread's handle on the lists.
///
/// It owns the journal and the current snapshot. Delivery cores never touch
/// it: they read the `ArcSwap` from [`ListStore::published`], whose `load`
/// takes no lock, and see each new snapshot from their next lookup on.
/// Every change is journalled with fdatasync before it is published, so a
/// published change survives a crash.
pub struct ListStore {
    list_path: PathBuf,
    key: SiteKey,
    journal: Journal,
    current: Arc<Lists>,
    published: Arc<ArcSwap<Lists>>,
    max_overlay_entries: usize,
}

impl std::fmt::Debug for ListStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListStore")
            .field("list_path", &self.list_path)
            .field("journal", &self.journal.path())
            .field("base_len", &self.current.base().len())
            .field("overlay_len", &self.current.overlay_len())
            .finish_non_exhaustive()
    }
}

impl ListStore {
    /// Loads the list file at `list_path` (no file means empty lists),
    /// replays the journal at `journal_path` over it, and publishes the
    /// result.
    pub fn open(
        list_path: &Path,
        journal_path: &Path,
        key: SiteKey,
    ) -> Result<ListStore, ListStoreError> {
        let base = match ListTable::open(list_path, &key) {
            Ok(table) => table,
            Err(ListFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                tracing::info!(
                    list_file = %list_path.display(),
                    "lists: no list file yet; starting with empty lists"
                );
                ListTable::empty(&key)
            }
            Err(error) => return Err(error.into()),
        };
        let (journal, changes) = Journal::open(journal_path, &key)?;
        let current = Arc::new(Lists::from_table(Arc::new(base)).with_changes(&changes));
        tracing::info!(
            list_file = %list_path.display(),
            base_entries = current.base().len(),
            replayed_changes = changes.len(),
            "lists: loaded"
        );
        Ok(ListStore {
            list_path: list_path.to_path_buf(),
            key,
            journal,
            published: Arc::new(ArcSwap::new(Arc::clone(&current))),
            current,
            max_overlay_entries: DEFAULT_MAX_OVERLAY_ENTRIES,
        })
    }

    /// Sets the overlay size at which [`ListStore::apply`] compiles; at
    /// least 1.
    pub fn set_max_overlay_entries(&mut self, max_overlay_entries: usize) {
        self.max_overlay_entries = max_overlay_entries.max(1);
    }

    /// Returns the cell that the delivery cores read snapshots from.
    pub fn published(&self) -> Arc<ArcSwap<Lists>> {
        Arc::clone(&self.published)
    }

    /// Returns the snapshot published last.
    pub fn snapshot(&self) -> Arc<Lists> {
        Arc::clone(&self.current)
    }

    /// Journals `changes` durably, then publishes a snapshot with them.
    /// When the runtime changes outgrow the overlay limit, compiles them
    /// into a new list file as well.
    ///
    /// Returns an error only when the journal append fails, in which case
    /// nothing is published. A failed compile after a successful append is
    /// logged and retried on the next change, because the changes are
    /// already durable in the journal.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), ListStoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.journal.append(changes)?;
        let next = Arc::new(self.current.with_changes(changes));
        self.publish(next);
        if self.current.overlay_len() > self.max_overlay_entries
            && let Err(error) = self.compile()
        {
            tracing::error!(
                list_file = %self.list_path.display(),
                overlay_entries = self.current.overlay_len(),
                %error,
                "lists: compile after change failed; the changes stay in the journal and the compile is retried on the next change"
            );
        }
        Ok(())
    }

    /// Adds imported entries to the base table: writes the new list file
    /// with the journal's changes folded in, empties the journal and
    /// publishes the result.
    pub fn import(&mut self, imported: ImportedRecords) -> Result<(), ListStoreError> {
        let mut builder = self.current.to_builder();
        let imported_count = imported.len();
        builder.add_imported(imported);
        self.install(builder.build(&self.key))?;
        tracing::info!(
            list_file = %self.list_path.display(),
            imported_entries = imported_count,
            base_entries = self.current.base().len(),
            "lists: import installed"
        );
        Ok(())
    }

    /// Folds the runtime changes into a new list file, empties the journal
    /// and publishes the new table.
    pub fn compile(&mut self) -> Result<(), ListStoreError> {
        let folded_changes = self.current.overlay_len();
        let table = self.current.to_builder().build(&self.key);
        self.install(table)?;
        tracing::info!(
            list_file = %self.list_path.display(),
            folded_changes,
            base_entries = self.current.base().len(),
            "lists: compiled"
        );
        Ok(())
    }

    /// Makes `table` durable as the list file, then empties the journal,
    /// then publishes. This order keeps every change durable in the file or
    /// the journal at each step. Replaying journal changes that the file
    /// already contains changes nothing.
    fn install(&mut self, table: ListTable) -> Result<(), ListStoreError> {
        table.write(&self.list_path)?;
        // The file now contains everything, so publish before the reset,
        // because a failed reset leaves changes that replay harmlessly.
        self.publish(Arc::new(Lists::from_table(Arc::new(table))));
        self.journal.reset()?;
        Ok(())
    }

    fn publish(&mut self, next: Arc<Lists>) {
        self.published.store(Arc::clone(&next));
        self.current = next;
    }
}
