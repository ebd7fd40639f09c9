//! Wake-ups for the YAML source: inotify on the manifests' directory, so that a file written
//! and closed, created, moved in or out, or deleted (as editors, `git checkout` and ConfigMap
//! volumes, which swap their `..data` link, do) is looked at within tens of milliseconds
//! rather than at the next look at the stamps. Those looks stay as the fallback for what
//! inotify cannot see: a writer that keeps its file open, network filesystems, a file that
//! is a symlink into another directory, a `--manifests` symlink swapped to a new target.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};

#[derive(Debug, thiserror::Error)]
pub enum FileEventsError {
    #[error("watching {path} for changes (inotify): {source}")]
    Watch { path: PathBuf, source: Errno },
}

/// Why `FileEvents::wait` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Something in the directory changed, and then nothing more for `QUIET`: look now.
    Changed,
    /// Nothing was reported within the timeout.
    Timeout,
}

/// How long the directory must stay quiet after an event before the caller looks. Writers
/// often remove or rename a file away just before putting its new version in place (`git
/// checkout` unlinks and creates; editors keep a backup by renaming): a look inside that gap
/// would take the file's Services for deleted. The gap is microseconds to a few
/// milliseconds; this keeps a change well within 100 ms of serving.
const QUIET: Duration = Duration::from_millis(20);
/// However busy the directory, a wake-up comes at most this long after the first event.
const QUIET_MAX: Duration = Duration::from_millis(250);

pub struct FileEvents {
    inotify: Inotify,
    /// What `--manifests` names.
    path: PathBuf,
    /// The directory watched, and its watch; `None` when it could not be watched (it is
    /// tried again at each wait).
    watch: Option<(PathBuf, WatchDescriptor)>,
}

/// The directory to watch for `path`: itself when it is one. A single manifest is as often
/// replaced by a rename over it as rewritten in place, and a watch on the file would stay with
/// the replaced inode, so its directory is watched.
fn dir_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_owned();
    }
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
}

impl FileEvents {
    /// Watches `path`'s directory (`path` itself when it is one). Fails only if inotify
    /// itself does; a directory that cannot be watched yet (it does not exist) is reported
    /// by `wait`, which tries again each time.
    pub fn new(path: &Path) -> Result<Self, FileEventsError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|source| FileEventsError::Watch { path: path.to_owned(), source })?;
        let mut events = Self { inotify, path: path.to_owned(), watch: None };
        let _ = events.rewatch();
        Ok(events)
    }

    /// Watches the directory `path` now resolves to, if that is not the one watched: after a
    /// `--manifests` directory that did not exist at start appears, or after the watched
    /// directory was deleted or moved (its watch then ends with IN_IGNORED).
    fn rewatch(&mut self) -> Result<(), FileEventsError> {
        let dir = dir_of(&self.path);
        if self.watch.as_ref().is_some_and(|(d, _)| *d == dir) {
            return Ok(());
        }
        if let Some((_, wd)) = self.watch.take() {
            // It may be gone already (IN_IGNORED); nothing to do then.
            let _ = self.inotify.rm_watch(wd);
        }
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        let wd = self
            .inotify
            .add_watch(&dir, mask)
            .map_err(|source| FileEventsError::Watch { path: dir.clone(), source })?;
        self.watch = Some((dir, wd));
        Ok(())
    }

    /// Waits up to `timeout` for changes; all events queued are consumed by one wake (the
    /// caller looks at every file's stamp anyway, so which files changed does not matter).
    /// A directory that cannot be watched is an error each time, and the wait a plain sleep.
    pub fn wait(&mut self, timeout: Duration) -> Result<Wake, FileEventsError> {
        if let Err(e) = self.rewatch() {
            std::thread::sleep(timeout);
            return Err(e);
        }
        if !self.readable(timeout)? {
            return Ok(Wake::Timeout);
        }
        let first = Instant::now();
        loop {
            self.drain()?;
            if first.elapsed() >= QUIET_MAX || !self.readable(QUIET)? {
                return Ok(Wake::Changed);
            }
        }
    }

    fn readable(&self, timeout: Duration) -> Result<bool, FileEventsError> {
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)) {
            Ok(0) | Err(Errno::EINTR) => Ok(false),
            Ok(_) => Ok(true),
            Err(source) => Err(self.error(source)),
        }
    }

    /// Reads every queued event; a watch that ended (its directory deleted or moved) is
    /// forgotten, to be made again by the next `rewatch`.
    fn drain(&mut self) -> Result<(), FileEventsError> {
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => {
                    // IN_IGNORED: the watch ended (its directory was deleted); IN_MOVE_SELF: it
                    // follows the directory to wherever it was moved.
                    let ended = AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_MOVE_SELF;
                    if events.iter().any(|e| e.mask.intersects(ended)) {
                        self.watch = None;
                    }
                }
                Ok(_) | Err(Errno::EAGAIN) => return Ok(()),
                Err(source) => return Err(self.error(source)),
            }
        }
    }

    fn error(&self, source: Errno) -> FileEventsError {
        let path = self.watch.as_ref().map_or_else(|| dir_of(&self.path), |(d, _)| d.clone());
        FileEventsError::Watch { path, source }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    use crate::scratch::Scratch;

    fn scratch(name: &str) -> Scratch {
        Scratch::new(&format!("file-events-{name}"))
    }

    #[test]
    fn a_written_file_wakes_and_quiet_times_out() {
        let dir = scratch("dir");
        let mut events = FileEvents::new(&dir).expect("inotify");
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
        fs::write(dir.join("a.yaml"), "kind: Service\n").expect("write");
        // Generous: the event is queued by the write's close, before `wait` is called.
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        // All of it consumed by that wake.
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
        fs::remove_file(dir.join("a.yaml")).expect("remove");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
    }

    /// A file removed and written again at once (as `git checkout` does) is one wake-up,
    /// after which the file is there: the caller never looks inside the gap.
    #[test]
    fn a_file_removed_and_put_back_wakes_once_with_the_file_back() {
        let dir = scratch("gap");
        let file = dir.join("a.yaml");
        fs::write(&file, "kind: Service\n").expect("write");
        let mut events = FileEvents::new(&dir).expect("inotify");
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                fs::remove_file(&file).expect("remove");
                // At once, as `git checkout` does: a gap far shorter than QUIET (a sleep here
                // made it a race with the machine's load).
                fs::write(&file, "kind: List\n").expect("write");
            })
        };
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        writer.join().expect("writer");
        assert!(file.exists());
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
    }

    #[test]
    fn a_single_file_replaced_by_rename_wakes() {
        let dir = scratch("file");
        let file = dir.join("services.yaml");
        fs::write(&file, "kind: Service\n").expect("write");
        let mut events = FileEvents::new(&file).expect("inotify");
        fs::write(dir.join(".services.yaml.tmp"), "kind: List\n").expect("write");
        let _ = events.wait(Duration::from_secs(10)).expect("wait");
        fs::rename(dir.join(".services.yaml.tmp"), &file).expect("rename");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
    }

    /// A ConfigMap volume: the files are symlinks through `..data`, a link the kubelet swaps
    /// by rename to a new timestamped directory.
    #[test]
    fn a_configmap_style_data_swap_wakes() {
        let dir = scratch("configmap");
        fs::create_dir(dir.join("..v1")).expect("mkdir");
        fs::write(dir.join("..v1/services.yaml"), "kind: Service\n").expect("write");
        std::os::unix::fs::symlink("..v1", dir.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/services.yaml", dir.join("services.yaml")).expect("link");
        let mut events = FileEvents::new(&dir).expect("inotify");
        fs::create_dir(dir.join("..v2")).expect("mkdir");
        fs::write(dir.join("..v2/services.yaml"), "kind: List\n").expect("write");
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).expect("link");
        let _ = events.wait(Duration::from_secs(10)).expect("wait");
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        assert_eq!(fs::read_to_string(dir.join("services.yaml")).expect("read"), "kind: List\n");
    }

    /// The watched directory deleted and made again: the watch follows the new one (a file
    /// written in it wakes, which no watch but one on it could report).
    #[test]
    fn a_replaced_directory_is_watched_again() {
        let dir = scratch("replaced");
        let mut events = FileEvents::new(&dir).expect("inotify");
        fs::remove_dir_all(&dir).expect("remove");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
        fs::create_dir_all(&dir).expect("mkdir");
        // Watches the new directory before it waits; what the watch in between (on the
        // parent) saw may wake it.
        let _ = events.wait(Duration::from_millis(50)).expect("wait");
        fs::write(dir.join("a.yaml"), "kind: Service\n").expect("write");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
    }

    /// A directory that does not exist is an error of each wait, naming it; once it
    /// exists, it is watched.
    #[test]
    fn a_missing_directory_is_an_error_naming_it_until_it_appears() {
        let dir = Scratch::missing("file-events-missing");
        let mut events = FileEvents::new(&dir.join("x.yaml")).expect("inotify");
        let e = events.wait(Duration::from_millis(10)).expect_err("no such directory");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(events.wait(Duration::from_millis(50)).expect("wait"), Wake::Timeout);
        fs::write(dir.join("x.yaml"), "kind: Service\n").expect("write");
        assert_eq!(events.wait(Duration::from_secs(10)).expect("wait"), Wake::Changed);
    }
}
