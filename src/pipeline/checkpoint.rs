//! The durable checkpoint in RocksDB: the LSN up to which every event is in JetStream, and the
//! PostgreSQL timeline that LSN was read on (an LSN means nothing across a failover without it).

use std::path::{Path, PathBuf};

use crate::lsn::Lsn;

const KEY_CONFIRMED_LSN: &[u8] = b"confirmed_lsn";
/// Where decoding must restart to rebuild what a backfill under way knows (see `backfill`).
const KEY_BACKFILL_HOLD: &[u8] = b"backfill_hold";
const KEY_TIMELINE: &[u8] = b"timeline";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open the checkpoint store at {path}: {error}. {hint}")]
    Open {
        path: PathBuf,
        error: rocksdb::Error,
        hint: &'static str,
    },
    #[error("cannot read the checkpoint at {path}: {error}")]
    Read {
        path: PathBuf,
        error: rocksdb::Error,
    },
    #[error("cannot write the checkpoint at {path}: {error} (is the disk full?)")]
    Write {
        path: PathBuf,
        error: rocksdb::Error,
    },
    #[error(
        "the checkpoint at {path} is corrupt: key `{key}` holds {len} bytes, expected {expected}"
    )]
    Corrupt {
        path: PathBuf,
        key: &'static str,
        len: usize,
        expected: usize,
    },
}

/// The checkpoint store. Writes are synced to disk before they return.
pub struct Checkpoint {
    db: rocksdb::DB,
    path: PathBuf,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        // A checkpoint store holds a handful of keys: keep RocksDB's footprint small.
        options.set_max_open_files(64);
        options.set_keep_log_file_num(2);
        options.set_write_buffer_size(1 << 20);
        let db = rocksdb::DB::open(&options, path).map_err(|error| CheckpointError::Open {
            path: path.to_owned(),
            hint: open_hint(&error),
            error,
        })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    /// Opens an existing store for reading only, beside a running walstream (RocksDB's
    /// read-only mode takes no lock); `None` when there is no store at `path`.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, CheckpointError> {
        if !path.join("CURRENT").exists() {
            return Ok(None);
        }
        let db = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), path, false)
            .map_err(|error| CheckpointError::Open {
                path: path.to_owned(),
                hint: open_hint(&error),
                error,
            })?;
        Ok(Some(Self {
            db,
            path: path.to_owned(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last LSN stored, if any.
    pub fn confirmed_lsn(&self) -> Result<Option<Lsn>, CheckpointError> {
        self.read_lsn(KEY_CONFIRMED_LSN, "confirmed_lsn")
    }

    /// Where a restart must decode from for the backfills under way, if any.
    pub fn backfill_hold(&self) -> Result<Option<Lsn>, CheckpointError> {
        self.read_lsn(KEY_BACKFILL_HOLD, "backfill_hold")
    }

    /// The timeline the confirmed LSN was read on; `None` for a checkpoint written before
    /// walstream kept it.
    pub fn timeline(&self) -> Result<Option<u32>, CheckpointError> {
        Ok(self
            .read::<4>(KEY_TIMELINE, "timeline")?
            .map(u32::from_be_bytes))
    }

    fn read_lsn(&self, key: &[u8], name: &'static str) -> Result<Option<Lsn>, CheckpointError> {
        Ok(self
            .read::<8>(key, name)?
            .map(|raw| Lsn(u64::from_be_bytes(raw))))
    }

    fn read<const N: usize>(
        &self,
        key: &[u8],
        name: &'static str,
    ) -> Result<Option<[u8; N]>, CheckpointError> {
        let value = self.db.get(key).map_err(|error| CheckpointError::Read {
            path: self.path.clone(),
            error,
        })?;
        value
            .map(|bytes| {
                <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| CheckpointError::Corrupt {
                    path: self.path.clone(),
                    key: name,
                    len: bytes.len(),
                    expected: N,
                })
            })
            .transpose()
    }

    /// Stores `lsn` and syncs it to disk.
    pub fn store_confirmed_lsn(&self, lsn: Lsn) -> Result<(), CheckpointError> {
        self.store_progress(lsn, None, None)
    }

    /// Stores `lsn`, the backfill hold and the timeline `lsn` was read on (kept as it is when
    /// `None`) together, synced to disk.
    pub fn store_progress(
        &self,
        lsn: Lsn,
        hold: Option<Lsn>,
        timeline: Option<u32>,
    ) -> Result<(), CheckpointError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(KEY_CONFIRMED_LSN, lsn.0.to_be_bytes());
        match hold {
            Some(hold) => batch.put(KEY_BACKFILL_HOLD, hold.0.to_be_bytes()),
            None => batch.delete(KEY_BACKFILL_HOLD),
        }
        if let Some(timeline) = timeline {
            batch.put(KEY_TIMELINE, timeline.to_be_bytes());
        }
        let mut write_options = rocksdb::WriteOptions::default();
        write_options.set_sync(true);
        self.db
            .write_opt(batch, &write_options)
            .map_err(|error| CheckpointError::Write {
                path: self.path.clone(),
                error,
            })
    }
}

/// What the operator can do about a store that does not open.
fn open_hint(error: &rocksdb::Error) -> &'static str {
    let text = error.to_string();
    if error.kind() == rocksdb::ErrorKind::Corruption {
        "The store is damaged. Move the directory away and start again: with an empty \
         checkpoint walstream resumes from the slot and the stream's last event, losing and \
         repeating nothing"
    } else if text.contains("No space left") {
        "The disk is full: free space, then start again (nothing was confirmed past what is stored)"
    } else if text.contains("lock") {
        "Another walstream is using it: give each instance its own checkpoint.path"
    } else {
        "Is the directory writable by walstream's user?"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let checkpoint = Checkpoint::open(dir.path()).unwrap();
            assert_eq!(checkpoint.confirmed_lsn().unwrap(), None);
            checkpoint.store_confirmed_lsn(Lsn(0x16B3748)).unwrap();
        }
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.confirmed_lsn().unwrap(), Some(Lsn(0x16B3748)));
    }

    #[test]
    fn the_backfill_hold_is_stored_with_the_lsn_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        checkpoint
            .store_progress(Lsn(200), Some(Lsn(100)), Some(2))
            .unwrap();
        assert_eq!(checkpoint.backfill_hold().unwrap(), Some(Lsn(100)));
        checkpoint.store_progress(Lsn(300), None, None).unwrap();
        assert_eq!(checkpoint.backfill_hold().unwrap(), None);
        assert_eq!(checkpoint.confirmed_lsn().unwrap(), Some(Lsn(300)));
        assert_eq!(
            checkpoint.timeline().unwrap(),
            Some(2),
            "kept when not given"
        );
    }

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Checkpoint::open(dir.path()).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("Another walstream"), "{err}");
    }
}
