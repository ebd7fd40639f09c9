//! One agent per pin directory. Two agents would each program the shared maps from their own
//! bookkeeping (service ids, Maglev table ranges, backend ids) and overwrite each other's
//! entries, translating flows to the wrong backends; and `lb cleanup` under a running agent
//! would unpin its links and maps. So `lb run` holds an exclusive `flock` on the directory
//! (bpffs directories take it, and the kernel drops it when the process ends, however it ends),
//! and `lb cleanup` removes the directory only while holding that lock itself.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::{ensure_pin_dir, DataplaneError, Result};

/// A pin directory held for this process; let go when dropped.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: fs::File,
    path: PathBuf,
}

impl PinDirLock {
    /// Takes `pin_dir` (made as `ensure_pin_dir` makes it) unless another process holds it:
    /// `Ok(None)` then. The agent polls this rather than blocking, so that it still answers
    /// SIGTERM while it waits (as a container's PID 1 it has no default handler).
    pub fn try_acquire(pin_dir: &Path) -> Result<Option<Self>> {
        // A directory removed (`lb cleanup`, a failed first load) and made again between our
        // open and our lock is another inode than the one locked: try again on the new one.
        for _ in 0..8 {
            // Made only when missing: writing into a directory `lb cleanup` is removing could
            // make its removal fail half done.
            if !pin_dir.exists() {
                ensure_pin_dir(pin_dir)?;
            }
            let dir = open(pin_dir)?;
            if !lock(&dir, pin_dir)? {
                return Ok(None);
            }
            if same_directory(&dir, pin_dir) {
                ensure_pin_dir(pin_dir)?;
                return Ok(Some(Self { _dir: dir, path: pin_dir.to_owned() }));
            }
        }
        Err(replaced("locking the pin directory (it keeps being removed and made again)", pin_dir))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn replaced(what: &'static str, pin_dir: &Path) -> DataplaneError {
    DataplaneError::Io { what, path: pin_dir.to_owned(), source: std::io::Error::from(std::io::ErrorKind::Interrupted) }
}

/// Takes `dir`'s exclusive lock if it is free: false if another process holds it.
fn lock(dir: &fs::File, pin_dir: &Path) -> Result<bool> {
    match dir.try_lock() {
        Ok(()) => Ok(true),
        Err(fs::TryLockError::WouldBlock) => Ok(false),
        Err(fs::TryLockError::Error(source)) => {
            Err(DataplaneError::Io { what: "locking the pin directory", path: pin_dir.to_owned(), source })
        }
    }
}

fn open(pin_dir: &Path) -> Result<fs::File> {
    fs::File::open(pin_dir).map_err(|source| DataplaneError::Io {
        what: "opening the pin directory",
        path: pin_dir.to_owned(),
        source,
    })
}

/// Whether `dir` (an open directory) is still what `path` names.
fn same_directory(dir: &fs::File, path: &Path) -> bool {
    match (dir.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Removes everything an agent pinned in `pin_dir`: links (detaching the programs) and maps
/// (`lb cleanup`), refusing while an agent holds it. The lock is held through the removal, so
/// no agent starts on the directory meanwhile; one waiting for it finds it gone and makes a new
/// one.
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    // As in `PinDirLock::try_acquire`: the lock must be on the directory the path names.
    for _ in 0..8 {
        if !pin_dir.exists() {
            return Ok(());
        }
        let dir = open(pin_dir)?;
        if !lock(&dir, pin_dir)? {
            return Err(DataplaneError::AgentRunning { pin_dir: pin_dir.to_owned() });
        }
        if same_directory(&dir, pin_dir) {
            return fs::remove_dir_all(pin_dir).map_err(|source| DataplaneError::Io {
                what: "removing",
                path: pin_dir.to_owned(),
                source,
            });
        }
    }
    Err(replaced("removing the pin directory (it keeps being removed and made again)", pin_dir))
}
