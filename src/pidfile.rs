//! The `--pid-file` file: [`PidFile::create`] writes `<pid>\n` atomically (a temporary file in
//! the same directory, then `rename`), so a reader never sees a partial number; dropping the
//! guard removes the file only if it still holds this process's PID, so a process that took
//! over (a new binary after a SIGUSR2 upgrade, which rewrote the file) keeps its file.
//!
//! This module must never touch sockets, signals or other processes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// A written PID file; removed on drop if it is still ours.
#[derive(Debug)]
pub struct PidFile {
    /// Where the file is; always the path given to `create`.
    path: PathBuf,
    /// The PID written, this process's.
    pid: u32,
}

impl PidFile {
    /// Write this process's PID to `path` (replacing any file there). Errors name the path and
    /// the step ("pid file /run/x.pid: write /run/.x.pid.123.tmp: Permission denied").
    pub fn create(path: &Path) -> Result<PidFile, Error> {
        let pid = std::process::id();
        write_pid_file(path, pid)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim().parse::<u32>() == Ok(self.pid));
        if ours && let Err(e) = fs::remove_file(&self.path) {
            log::warn!("pid file {}: remove: {e}", self.path.display());
        }
    }
}

/// Write `pid` and a newline to `path` atomically: a temporary file next to it (same
/// directory, so `rename` stays on one file system), synced, then renamed over `path`.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    let fail = |step: String, e: std::io::Error| {
        Error::runtime(format!("pid file {}: {step}: {e}", path.display()))
    };
    let name = path.file_name().ok_or_else(|| {
        Error::runtime(format!(
            "pid file {}: not a file name (ends in '..' or '/')",
            path.display()
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{pid}.tmp"));
    let tmp = path.with_file_name(tmp_name);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{pid}\n").as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| fail(format!("write {}", tmp.display()), e))
        .and_then(|()| {
            fs::rename(&tmp, path).map_err(|e| fail(format!("rename {}", tmp.display()), e))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("epoxy-pidfile-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn written_with_our_pid_and_removed_on_drop() {
        let dir = scratch("own");
        let path = dir.join("proxy.pid");
        fs::write(&path, "stale\n").expect("stale file");
        let guard = PidFile::create(&path).expect("create");
        assert_eq!(guard.path(), path);
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
        // Only the pid file is left in the directory: the temporary file was renamed.
        assert_eq!(fs::read_dir(&dir).map(|d| d.count()).ok(), Some(1));
        drop(guard);
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_taken_over_by_another_process_is_left_alone() {
        let dir = scratch("taken");
        let path = dir.join("proxy.pid");
        let guard = PidFile::create(&path).expect("create");
        // A new process (after an upgrade) rewrote it with its own PID.
        let other = std::process::id().wrapping_add(1);
        write_pid_file(&path, other).expect("rewrite");
        drop(guard);
        assert_eq!(fs::read_to_string(&path).ok(), Some(format!("{other}\n")));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_place_is_an_error_naming_the_path() {
        let dir = scratch("missing");
        let path = dir.join("no-such-dir").join("proxy.pid");
        let e = PidFile::create(&path).expect_err("missing directory");
        assert!(
            e.to_string()
                .starts_with(&format!("pid file {}: write ", path.display())),
            "{e}"
        );
        assert_eq!(e.exit_code(), 1);
        let e = PidFile::create(Path::new("/")).expect_err("no file name");
        assert!(e.to_string().contains("not a file name"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
