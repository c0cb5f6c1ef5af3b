//! The storage seam: the only way the store touches files. The simulator implements it to tear
//! writes and lose unsynced data on a simulated crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Named blobs with atomic replacement.
pub trait Storage: Send {
    /// The whole content of `name`, or `None` if it does not exist.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replace `name` with `data` atomically and durably: after a crash at any moment the blob
    /// is either the old or the new content, and once this returns it is the new content.
    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Remove `name` durably; removing a missing blob is not an error.
    fn remove(&mut self, name: &str) -> io::Result<()>;
    /// Names of all blobs.
    fn list(&self) -> io::Result<Vec<String>>;
}

/// Blobs as files in one directory: temp file, fsync, rename, fsync the directory.
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
}

/// Prefix of temporary files; [`FsStorage::list`] skips them.
const TMP_PREFIX: &str = ".tmp.";

impl FsStorage {
    /// Storage in `dir`, which must exist.
    pub fn new(dir: &Path) -> Self {
        FsStorage {
            dir: dir.to_path_buf(),
        }
    }

    /// Delete temp files a killed writer left behind. Only call while holding the store's
    /// exclusive lock.
    pub fn remove_leftovers(&mut self) -> io::Result<()> {
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX))
            {
                fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Storage for FsStorage {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(name))?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            if let Some(n) = e.file_name().to_str()
                && !n.starts_with('.')
                && e.file_type()?.is_file()
            {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}
