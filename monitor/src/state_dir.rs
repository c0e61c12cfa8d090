//! The monitor's state dir, typed: one method per kind of file, so every
//! path is made in one place, and one way to write and read a record.
//!
//! Records are written atomically (a temp file in the same directory,
//! fsync, rename, fsync of the directory), so a crash leaves either the old
//! or the new record. A record that does not parse is an error naming the
//! file, never read as empty: a caller either rebuilds it from what the
//! node shows (containerd's labels, CNI results) or reports it.
//!
//! ```text
//! <state>/logs/<container>.log            service output (rotated to .1)
//! <state>/containers/<container>/         hosts, resolv.conf, status.pb,
//!                                         failures.json
//! <state>/cores/<core container>.json     swap record: ports to put back
//! <state>/cni/networks.json               subnet index per network
//! <state>/cni/containers/<container>.json CNI ADD results, for DEL
//! <state>/cni/ipam/                       host-local IPAM leases
//! <state>/netns/<container>               network namespaces
//! <state>/volumes/<installation>/<name>/  named volumes
//! ```

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

/// A state-dir file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// Reading, writing or syncing failed.
    #[error("{action} {}: {err}", .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The file exists but does not hold a valid record.
    #[error("{} is corrupt: {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why it does not parse.
        reason: String,
    },
}

/// The monitor's state dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state dir at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The log of container `id`.
    pub fn log(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// The directory of container `id`'s generated files.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// The last status of container `id`'s service.
    pub fn status_file(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("status.pb")
    }

    /// The failure history of container `id`'s service.
    pub fn failures_file(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("failures.json")
    }

    /// The swap record of core container `core_id`.
    pub fn swap_record(&self, core_id: &str) -> PathBuf {
        self.root.join("cores").join(format!("{core_id}.json"))
    }

    /// The node's trial of a release of `installation` rolling out.
    pub fn trial(&self, installation: &str) -> PathBuf {
        self.trials().join(format!("{installation}.json"))
    }

    /// Where the node's release trials are kept.
    pub fn trials(&self) -> PathBuf {
        self.root.join("trials")
    }

    /// The named volumes of an installation.
    pub fn volumes(&self, installation: &str) -> PathBuf {
        self.root.join("volumes").join(installation)
    }

    /// Reads a JSON record: `None` when the file does not exist.
    pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateDirError> {
        match Self::read(path)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|err| StateDirError::Corrupt {
                        path: path.to_owned(),
                        reason: err.to_string(),
                    })
            }
        }
    }

    /// Reads a file: `None` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<Vec<u8>>, StateDirError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(StateDirError::Io {
                action: "reading",
                path: path.to_owned(),
                err,
            }),
        }
    }

    /// Writes a JSON record atomically.
    pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StateDirError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|err| StateDirError::Corrupt {
            path: path.to_owned(),
            reason: format!("cannot encode: {err}"),
        })?;
        write_atomic(path, &bytes)
    }

    /// Removes a file; a missing one is fine.
    pub fn remove(path: &Path) -> Result<(), StateDirError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(StateDirError::Io {
                action: "removing",
                path: path.to_owned(),
                err,
            }),
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old content or the
/// new, never a mix: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateDirError> {
    let io = |action: &'static str, at: &Path| {
        let at = at.to_owned();
        move |err| StateDirError::Io {
            action,
            path: at,
            err,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let mut temp_name = path.file_name().unwrap_or_default().to_owned();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(temp_name);
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io("writing", &temp)(err));
    }
    std::fs::rename(&temp, path).map_err(io("renaming into", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_refuses_corrupt_records() {
        let dir = tempdir();
        let path = dir.join("cni").join("networks.json");
        assert_eq!(StateDir::read_json::<Vec<u8>>(&path).unwrap(), None);
        StateDir::write_json(&path, &vec![1_u8, 2]).unwrap();
        assert_eq!(
            StateDir::read_json::<Vec<u8>>(&path).unwrap(),
            Some(vec![1, 2])
        );
        // Only the record is left behind, no temp file.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::write(&path, b"[1, ").unwrap();
        let err = StateDir::read_json::<Vec<u8>>(&path).unwrap_err();
        assert!(matches!(err, StateDirError::Corrupt { .. }));
        assert!(
            err.to_string().contains("networks.json is corrupt"),
            "{err}"
        );
        StateDir::remove(&path).unwrap();
        StateDir::remove(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "state-dir-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
