//! The sender's side of "send this file or folder": which files go, under which names.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::PlanError;
use crate::name::{MAX_DEPTH, sanitise};

/// Most files one plan may hold.
pub const MAX_PLAN_FILES: usize = 10_000;

/// One file to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where it is on this computer.
    pub path: PathBuf,
    /// Its relative name on the wire, `/`-separated; a folder's name is the first component.
    pub name: String,
    /// Its size when planned (the size sent is the one found when it is hashed).
    pub size: u64,
}

impl Outgoing {
    /// A single file sent under `name` (checked with [`crate::sanitise`]).
    pub fn new(path: impl Into<PathBuf>, name: impl Into<String>, size: u64) -> Self {
        Self {
            path: path.into(),
            name: name.into(),
            size,
        }
    }
}

/// Something inside a folder that will not be sent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it is.
    pub path: PathBuf,
    /// Why it is left out ("symbolic link, not followed", …).
    pub reason: String,
}

/// What [`plan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files to send, each on its own stream, in name order.
    pub files: Vec<Outgoing>,
    /// Entries left out; show them to the user.
    pub skipped: Vec<Skipped>,
}

impl Plan {
    /// Sum of the files' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Turns a file or a folder into the files to send.
///
/// The path itself is what the user picked and may be a symbolic link; inside a folder, symbolic
/// links are never followed (they are listed in [`Plan::skipped`]), nor are devices, sockets and
/// pipes, names the receiver would refuse (see [`crate::sanitise`]) or folders nested deeper than
/// a name may go. Empty folders are not sent. More than [`MAX_PLAN_FILES`] files is an error.
pub fn plan(path: &Path) -> Result<Plan, PlanError> {
    let io_err = |source| PlanError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    let root_name = root_name(path)?;
    let mut plan = Plan::default();
    if meta.is_file() {
        plan.files.push(Outgoing::new(path, root_name, meta.len()));
        return Ok(plan);
    }
    if !meta.is_dir() {
        return Err(PlanError::NotAFile(path.to_owned()));
    }
    let entries = fs::read_dir(path).map_err(io_err)?;
    walk(path, entries, &root_name, 1, &mut plan)?;
    Ok(plan)
}

fn root_name(path: &Path) -> Result<String, PlanError> {
    let name = match path.file_name() {
        Some(name) => name.to_owned(),
        None => fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(ToOwned::to_owned))
            .ok_or_else(|| PlanError::BadName {
                path: path.to_owned(),
                reason: "this path has no name".into(),
            })?,
    };
    let name = name.into_string().map_err(|_| PlanError::BadName {
        path: path.to_owned(),
        reason: "the name is not valid UTF-8 text".into(),
    })?;
    sanitise(name.as_bytes()).map_err(|e| PlanError::BadName {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(name)
}

fn walk(
    dir: &Path,
    entries: fs::ReadDir,
    rel: &str,
    depth: usize,
    plan: &mut Plan,
) -> Result<(), PlanError> {
    let mut list: Vec<fs::DirEntry> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => list.push(entry),
            Err(e) => plan.skipped.push(Skipped {
                path: dir.to_owned(),
                reason: format!("cannot list everything: {e}"),
            }),
        }
    }
    let mut entries = list;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let skip = |plan: &mut Plan, reason: &str| {
            plan.skipped.push(Skipped {
                path: path.clone(),
                reason: reason.into(),
            })
        };
        // `file_type` does not follow symbolic links.
        let Ok(kind) = entry.file_type() else {
            skip(plan, "cannot be read");
            continue;
        };
        let Ok(name) = entry.file_name().into_string() else {
            skip(plan, "the name is not valid UTF-8 text");
            continue;
        };
        let child = format!("{rel}/{name}");
        if kind.is_symlink() {
            skip(plan, "symbolic link, not followed");
        } else if kind.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                skip(plan, "folder nested too deep");
                continue;
            }
            if let Err(e) = sanitise(child.as_bytes()) {
                skip(plan, &e.to_string());
                continue;
            }
            match fs::read_dir(&path) {
                Ok(sub) => walk(&path, sub, &child, depth + 1, plan)?,
                Err(e) => skip(plan, &format!("cannot be read: {e}")),
            }
        } else if kind.is_file() {
            if let Err(e) = sanitise(child.as_bytes()) {
                skip(plan, &e.to_string());
                continue;
            }
            let size = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) => {
                    skip(plan, &format!("cannot be read: {e}"));
                    continue;
                }
            };
            if plan.files.len() >= MAX_PLAN_FILES {
                return Err(PlanError::TooManyFiles {
                    path: dir.to_owned(),
                    limit: MAX_PLAN_FILES,
                });
            }
            plan.files.push(Outgoing::new(path, child, size));
        } else {
            skip(plan, "not a regular file (device, socket or pipe)");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn folder_plan_skips_links_and_names_files_under_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("photos");
        fs::create_dir_all(root.join("2024/summer")).unwrap();
        fs::write(root.join("a.jpg"), b"aaaa").unwrap();
        fs::write(root.join("2024/summer/b.jpg"), b"bb").unwrap();
        fs::create_dir(root.join("empty")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        fs::write(root.join("con.txt"), b"c").unwrap();

        let plan = plan(&root).unwrap();
        let names: Vec<&str> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["photos/2024/summer/b.jpg", "photos/a.jpg"]);
        assert_eq!(plan.total_bytes(), 6);
        let skipped: Vec<(String, &str)> = plan
            .skipped
            .iter()
            .map(|s| {
                (
                    s.path.file_name().unwrap().to_string_lossy().into_owned(),
                    s.reason.as_str(),
                )
            })
            .collect();
        assert!(
            skipped.contains(&("passwd".into(), "symbolic link, not followed")),
            "{skipped:?}"
        );
        assert!(
            skipped.contains(&("etc".into(), "symbolic link, not followed")),
            "{skipped:?}"
        );
        assert!(
            skipped
                .iter()
                .any(|(n, r)| n == "con.txt" && r.contains("device name")),
            "{skipped:?}"
        );
    }

    #[test]
    fn single_file_plan() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("notes.txt");
        fs::write(&file, b"hello").unwrap();
        let plan = plan(&file).unwrap();
        assert_eq!(plan.files, [Outgoing::new(&file, "notes.txt", 5)]);
        assert!(plan.skipped.is_empty());
        assert!(matches!(
            super::plan(&tmp.path().join("missing")),
            Err(PlanError::Io { .. })
        ));
    }
}
