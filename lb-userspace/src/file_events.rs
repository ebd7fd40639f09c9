//! Wake-ups for the YAML source: inotify on the manifests' directory, so that a file written
//! and closed, or moved into place (as editors, `git checkout` and ConfigMap volumes, which
//! swap their `..data` link, do), is read at once rather than at the next look at the stamps.
//! Those looks stay as the fallback: inotify tells nothing of a writer that keeps its file
//! open, of network filesystems, or of a watched directory that was itself replaced.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

#[derive(Debug, thiserror::Error)]
pub enum FileEventsError {
    #[error("watching {path} for changes (inotify): {source}")]
    Watch { path: PathBuf, source: Errno },
}

/// Why `FileEvents::wait` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something in the directory changed: look at the stamps now.
    Changed,
    /// Nothing was reported within the timeout.
    Timeout,
}

pub struct FileEvents {
    inotify: Inotify,
    dir: PathBuf,
}

impl FileEvents {
    /// Watches `path`'s directory (`path` itself when it is one).
    pub fn new(path: &Path) -> Result<Self, FileEventsError> {
        // A single manifest is as often replaced by a rename over it as rewritten in place; a
        // watch on the file would stay with the replaced inode, so its directory is watched.
        let dir = if path.is_dir() {
            path.to_owned()
        } else {
            path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
        };
        let err = |source| FileEventsError::Watch { path: dir.clone(), source };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(err)?;
        // No IN_MODIFY: a file is read once its writer has closed it, not halfway through
        // (a half-written file could parse as fewer objects than it will hold).
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE;
        inotify.add_watch(&dir, mask).map_err(err)?;
        Ok(Self { inotify, dir })
    }

    /// Waits up to `timeout` for changes; all events queued are consumed by one wake (the
    /// caller looks at every file's stamp anyway, so which files changed does not matter).
    pub fn wait(&self, timeout: Duration) -> Result<Wake, FileEventsError> {
        let err = |source| FileEventsError::Watch { path: self.dir.clone(), source };
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)) {
            Ok(0) | Err(Errno::EINTR) => return Ok(Wake::Timeout),
            Ok(_) => {}
            Err(e) => return Err(err(e)),
        }
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => {}
                Ok(_) | Err(Errno::EAGAIN) => return Ok(Wake::Changed),
                Err(e) => return Err(err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-file-events-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_written_file_wakes_and_quiet_times_out() {
        let dir = scratch("dir");
        let events = FileEvents::new(&dir).expect("inotify");
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
        fs::write(dir.join("a.yaml"), "kind: Service\n").expect("write");
        // Generous: the event is queued by the write's close, before `wait` is called.
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        // All of it consumed by that wake.
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
        fs::remove_file(dir.join("a.yaml")).expect("remove");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_single_file_replaced_by_rename_wakes() {
        let dir = scratch("file");
        let file = dir.join("services.yaml");
        fs::write(&file, "kind: Service\n").expect("write");
        let events = FileEvents::new(&file).expect("inotify");
        fs::write(dir.join(".services.yaml.tmp"), "kind: List\n").expect("write");
        let _ = events.wait(Duration::from_secs(10)).expect("wait");
        fs::rename(dir.join(".services.yaml.tmp"), &file).expect("rename");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("lb-file-events-missing-{}", std::process::id()));
        let e = FileEvents::new(&dir.join("x.yaml")).err().expect("no such directory");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    }
}
