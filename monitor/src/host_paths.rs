//! Host paths bound into addon containers, held to exactly what the policy
//! allowed. The policy judges a host path as text; an addon that can write
//! beneath a granted directory could otherwise replace a directory there
//! with a symbolic link (`sub -> /`), and runc, which follows links in a
//! bind mount's source, would mount what the link names at the next start
//! of any container that binds `sub`.
//!
//! So, at every creation of a task (first start and every restart):
//! 1. [`pin`] opens each host path one component at a time with `O_PATH |
//!    O_NOFOLLOW`, refusing `.`, `..` and any symbolic link on the way, and
//!    keeps the opened file and its identity (device and inode);
//! 2. runc mounts the sources while the task is created;
//! 3. [`Pinned::verify`] looks, through the created task's own root
//!    (`/proc/PID/root`, resolved with `RESOLVE_IN_ROOT` as runc resolves
//!    targets), at what is mounted on each target, and refuses the task
//!    unless it is the very file that was checked. A link swapped in
//!    between the check and the mount is caught here, before the task runs.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{OFlag, OpenHow, ResolveFlag, open, openat, openat2},
    sys::stat::{Mode, SFlag, fstat},
};

/// A host path that cannot be bound as the policy allowed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPathError {
    /// Not absolute, or with `.` or `..` segments.
    #[error("host path {0} must be absolute, without `.` or `..` segments")]
    NotPlain(String),
    /// A component is a symbolic link.
    #[error(
        "host path {path}: {link} is a symbolic link; host paths are bound only without links (name the path it points to)"
    )]
    Link {
        /// The host path.
        path: String,
        /// The component that is a link.
        link: String,
    },
    /// It cannot be opened.
    #[error("host path {path}: {reason}")]
    Unreadable {
        /// The host path.
        path: String,
        /// Why.
        reason: String,
    },
    /// What the task has mounted is not what was checked.
    #[error(
        "host path {path} changed while it was mounted on {target}: the container got another file; refused"
    )]
    Swapped {
        /// The host path.
        path: String,
        /// Where it is mounted in the container.
        target: String,
    },
}

#[derive(Debug)]
struct PinnedBind {
    source: String,
    target: String,
    dev: u64,
    ino: u64,
    /// Held open while the task is created.
    _file: OwnedFd,
}

/// Host paths checked and held open for one creation of a task.
#[derive(Debug, Default)]
pub struct Pinned {
    binds: Vec<PinnedBind>,
}

/// Checks and opens each `(host path, target)` bind.
pub fn pin<'a>(
    binds: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Pinned, HostPathError> {
    let mut pinned = Pinned::default();
    for (source, target) in binds {
        let file = open_without_links(source)?;
        let found = fstat(&file).map_err(|err| HostPathError::Unreadable {
            path: source.display().to_string(),
            reason: err.desc().to_owned(),
        })?;
        pinned.binds.push(PinnedBind {
            source: source.display().to_string(),
            target: target.to_owned(),
            dev: found.st_dev,
            ino: found.st_ino,
            _file: file,
        });
    }
    Ok(pinned)
}

/// Opens `path` (`O_PATH`) walking one component at a time, never
/// following a link.
pub fn open_without_links(path: &Path) -> Result<OwnedFd, HostPathError> {
    let text = path.display().to_string();
    let Some(relative) = text.strip_prefix('/') else {
        return Err(HostPathError::NotPlain(text));
    };
    let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(HostPathError::NotPlain(text));
    }
    let unreadable = |err: nix::Error| HostPathError::Unreadable {
        path: text.clone(),
        reason: err.desc().to_owned(),
    };
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = open("/", flags | OFlag::O_DIRECTORY, Mode::empty()).map_err(unreadable)?;
    let mut walked = String::new();
    for part in parts {
        walked.push('/');
        walked.push_str(part);
        let next = openat(current.as_fd(), part, flags, Mode::empty()).map_err(unreadable)?;
        let kind = fstat(&next).map_err(unreadable)?.st_mode & SFlag::S_IFMT.bits();
        if kind == SFlag::S_IFLNK.bits() {
            return Err(HostPathError::Link {
                path: text,
                link: walked,
            });
        }
        current = next;
    }
    Ok(current)
}

impl Pinned {
    /// Checks that the created task `pid` has exactly the pinned files
    /// mounted on their targets.
    pub fn verify(&self, pid: u32) -> Result<(), HostPathError> {
        if self.binds.is_empty() {
            return Ok(());
        }
        let root_path = PathBuf::from(format!("/proc/{pid}/root"));
        let root = open(
            &root_path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| HostPathError::Unreadable {
            path: root_path.display().to_string(),
            reason: format!("cannot look into the created task: {}", err.desc()),
        })?;
        for bind in &self.binds {
            let swapped = || HostPathError::Swapped {
                path: bind.source.clone(),
                target: bind.target.clone(),
            };
            let target = bind.target.trim_start_matches('/');
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let mounted = openat2(
                root.as_fd(),
                if target.is_empty() { "." } else { target },
                how,
            )
            .map_err(|_| swapped())?;
            let found = fstat(&mounted).map_err(|_| swapped())?;
            if (found.st_dev, found.st_ino) != (bind.dev, bind.ino) {
                return Err(swapped());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_plain_paths_and_refuses_links_and_dots() {
        let dir = tempfile::tempdir().unwrap();
        let granted = dir.path().join("x");
        std::fs::create_dir_all(granted.join("real")).unwrap();
        std::os::unix::fs::symlink("/", granted.join("sub")).unwrap();
        assert!(open_without_links(&granted.join("real")).is_ok());
        match open_without_links(&granted.join("sub")) {
            Err(HostPathError::Link { link, .. }) => assert!(link.ends_with("/x/sub"), "{link}"),
            other => panic!("{other:?}"),
        }
        // A link on the way is refused as much as the last component.
        std::os::unix::fs::symlink(granted.join("real"), granted.join("via")).unwrap();
        std::fs::create_dir(granted.join("real").join("deep")).unwrap();
        assert!(matches!(
            open_without_links(&granted.join("via").join("deep")),
            Err(HostPathError::Link { .. })
        ));
        for bad in ["relative", "/a/../b", "/a/./b"] {
            assert!(matches!(
                open_without_links(Path::new(bad)),
                Err(HostPathError::NotPlain(_))
            ));
        }
        assert!(matches!(
            open_without_links(&granted.join("missing")),
            Err(HostPathError::Unreadable { .. })
        ));
    }

    #[test]
    fn verifies_what_is_seen_through_a_root() {
        // This process's own root stands in for a task's: the pinned file
        // is seen on its "target", another file is not.
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let a_text = a.display().to_string();
        let b_text = b.display().to_string();
        let pinned = pin([(a.as_path(), a_text.as_str())]).unwrap();
        assert_eq!(pinned.verify(std::process::id()), Ok(()));
        let elsewhere = pin([(a.as_path(), b_text.as_str())]).unwrap();
        assert!(matches!(
            elsewhere.verify(std::process::id()),
            Err(HostPathError::Swapped { .. })
        ));
    }
}
