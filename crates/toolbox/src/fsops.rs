//! The receiver's file-system operations, all relative to an open directory and none following a
//! symbolic link. Blocking: call them from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::name::candidate_name;

/// How many partial files of the same content may be in use at once in one folder.
const MAX_PARTIAL_SLOTS: u32 = 16;
/// How many `name (n)` candidates to try before giving up.
const MAX_NAME_CANDIDATES: u32 = 10_000;

/// Why a folder on the way could not be opened.
#[derive(Debug)]
pub(crate) enum DirError {
    /// It is a symbolic link.
    Symlink,
    /// It exists and is not a folder.
    NotAFolder,
    /// Another failure.
    Io(io::Error),
}

/// Opens the download folder itself (the user's configured path; it may be a link).
pub(crate) fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A new descriptor for the same directory.
pub(crate) fn reopen(dir: impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the sub-folder `name` of `parent` without following a link; `None` if it does not exist.
pub(crate) fn open_subdir(parent: impl AsFd, name: &str) -> Result<Option<OwnedFd>, DirError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent.as_fd(), name, flags, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR) => {
            match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    Err(DirError::Symlink)
                }
                Ok(_) => Err(DirError::NotAFolder),
                Err(e) => Err(DirError::Io(e.into())),
            }
        }
        Err(e) => Err(DirError::Io(e.into())),
    }
}

/// Creates (if needed) and opens the sub-folder `name` of `parent`, never through a link.
pub(crate) fn create_subdir(parent: impl AsFd, name: &str) -> Result<OwnedFd, DirError> {
    match rustix::fs::mkdirat(parent.as_fd(), name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(DirError::Io(e.into())),
    }
    open_subdir(parent, name)?.ok_or_else(|| DirError::Io(io::Error::from(io::ErrorKind::NotFound)))
}

/// Length of the regular file `name` in `dir`, 0 if there is none (or it is something else).
pub(crate) fn regular_len(dir: impl AsFd, name: &str) -> u64 {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
            u64::try_from(st.st_size).unwrap_or(0)
        }
        _ => 0,
    }
}

/// An open, exclusively locked partial file.
#[derive(Debug)]
pub(crate) struct Partial {
    pub file: File,
    pub name: String,
    /// We created it (it did not exist before this transfer).
    pub created: bool,
}

/// Opens `base` in `dir` for resuming, or the first of `base-1`, `base-2`, … that no other
/// transfer holds (`flock`), creating it if needed. Never follows a link.
pub(crate) fn open_partial(dir: impl AsFd, base: &str) -> io::Result<Partial> {
    let dir = dir.as_fd();
    let rw = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for slot in 0..MAX_PARTIAL_SLOTS {
        let name = if slot == 0 {
            base.to_owned()
        } else {
            format!("{base}-{slot}")
        };
        let (fd, created) =
            match rustix::fs::openat(dir, name.as_str(), rw | OFlags::NONBLOCK, Mode::empty()) {
                Ok(fd) => (fd, false),
                Err(Errno::NOENT) => {
                    match rustix::fs::openat(
                        dir,
                        name.as_str(),
                        rw | OFlags::CREATE | OFlags::EXCL,
                        Mode::from_raw_mode(0o600),
                    ) {
                        Ok(fd) => (fd, true),
                        Err(Errno::EXIST) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                // A link, a FIFO that would block, …: not ours, try the next slot.
                Err(Errno::LOOP | Errno::AGAIN | Errno::NXIO | Errno::ISDIR) => continue,
                Err(e) => return Err(e.into()),
            };
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            continue;
        }
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
        // Back to blocking I/O for the writes.
        rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
        return Ok(Partial {
            file: File::from(fd),
            name,
            created,
        });
    }
    Err(io::Error::other(
        "too many transfers of the same file into this folder at once",
    ))
}

/// Removes `name` from `dir` (a missing file is fine).
pub(crate) fn remove(dir: impl AsFd, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `(available to us, total)` bytes of the file system holding `dir`.
pub(crate) fn space(dir: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstatvfs(dir)?;
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

/// Renames `from` to the first free candidate of `name` (`name`, `name (1).ext`, …) in `dir`,
/// never replacing anything; returns the name used.
pub(crate) fn rename_to_free_name(dir: impl AsFd, from: &str, name: &str) -> io::Result<String> {
    let dir = dir.as_fd();
    for n in 0..MAX_NAME_CANDIDATES {
        let to = candidate_name(name, n);
        match rename_no_replace(dir, from, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "no free name for \"{name}\" after {MAX_NAME_CANDIDATES} tries"
    )))
}

/// `renameat2(RENAME_NOREPLACE)`; where the file system lacks it, `link` + `unlink` (also atomic
/// against replacing); where that is missing too (FAT), a check and a plain rename.
fn rename_no_replace(dir: impl AsFd, from: &str, to: &str) -> io::Result<()> {
    let dir = dir.as_fd();
    match rustix::fs::renameat_with(dir, from, dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::NOTSUP) => {}
        Err(e) => return Err(e.into()),
    }
    match rustix::fs::linkat(dir, from, dir, to, AtFlags::empty()) {
        Ok(()) => return remove(dir, from),
        Err(Errno::PERM | Errno::NOTSUP | Errno::MLINK) => {}
        Err(e) => return Err(e.into()),
    }
    match rustix::fs::statat(dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(Errno::NOENT) => Ok(rustix::fs::renameat(dir, from, dir, to)?),
        Err(e) => Err(e.into()),
    }
}

/// `fsync` on a directory (makes a rename durable).
pub(crate) fn sync_dir(dir: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn links_are_not_followed_and_names_are_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let root = open_root(tmp.path()).unwrap();
        std::os::unix::fs::symlink("/etc", tmp.path().join("evil")).unwrap();
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        assert!(matches!(open_subdir(&root, "evil"), Err(DirError::Symlink)));
        assert!(matches!(
            open_subdir(&root, "file"),
            Err(DirError::NotAFolder)
        ));
        assert!(open_subdir(&root, "missing").unwrap().is_none());
        let sub = create_subdir(&root, "sub").unwrap();
        assert!(open_subdir(&root, "sub").unwrap().is_some());

        let a = open_partial(&sub, ".p").unwrap();
        assert!(a.created);
        let b = open_partial(&sub, ".p").unwrap();
        assert_eq!(b.name, ".p-1", "the first one is locked");
        drop(b);
        std::fs::write(tmp.path().join("sub/out.txt"), b"old").unwrap();
        let name = rename_to_free_name(&sub, ".p", "out.txt").unwrap();
        assert_eq!(name, "out (1).txt");
        assert_eq!(
            std::fs::read(tmp.path().join("sub/out.txt")).unwrap(),
            b"old"
        );
        assert_eq!(regular_len(&sub, "out (1).txt"), 0);
        let (free, total) = space(&root).unwrap();
        assert!(total >= free);
    }
}
