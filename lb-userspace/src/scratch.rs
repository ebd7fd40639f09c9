//! Scratch directories for unit tests, removed when dropped: also when the test fails, since
//! a panic still unwinds through the guard.
use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty directory under the system's temporary directory, unique to this
    /// process and `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    /// The same, but the directory is not created (a test of a directory that is missing).
    pub fn missing(name: &str) -> Self {
        let s = Self::new(name);
        std::fs::remove_dir_all(&s.0).expect("scratch dir");
        s
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
