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
    /// A name that would lead outside its directory of the state dir.
    #[error("{name} is not a plain file name: refused as a path under the state dir")]
    Outside {
        /// The name, quoted.
        name: String,
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

    /// `<root>/<dir>/<name><suffix>`: the one way a path under the state
    /// dir is made from a name the monitor was given (a container id, an
    /// installation id, a volume name). A name that is not one plain path
    /// component (empty, `.`, `..`, with `/`, NUL or a control character,
    /// over 200 bytes) is refused, so no name reaches outside its directory.
    fn beneath(&self, dir: &str, names: &[&str], suffix: &str) -> Result<PathBuf, StateDirError> {
        let mut path = self.root.join(dir);
        for (i, name) in names.iter().enumerate() {
            if !is_plain_name(name) {
                return Err(StateDirError::Outside {
                    name: addons_descriptor::quoted(name),
                });
            }
            if i + 1 == names.len() && !suffix.is_empty() {
                path.push(format!("{name}{suffix}"));
            } else {
                path.push(name);
            }
        }
        Ok(path)
    }

    /// The log of container `id`.
    pub fn log(&self, id: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("logs", &[id], ".log")
    }

    /// The directory of container `id`'s generated files.
    pub fn container_dir(&self, id: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("containers", &[id], "")
    }

    /// The last status of container `id`'s service.
    pub fn status_file(&self, id: &str) -> Result<PathBuf, StateDirError> {
        Ok(self.container_dir(id)?.join("status.pb"))
    }

    /// The failure history of container `id`'s service.
    pub fn failures_file(&self, id: &str) -> Result<PathBuf, StateDirError> {
        Ok(self.container_dir(id)?.join("failures.json"))
    }

    /// The swap record of core container `core_id`.
    pub fn swap_record(&self, core_id: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("cores", &[core_id], ".json")
    }

    /// The node's trial of a release of `installation` rolling out.
    pub fn trial(&self, installation: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("trials", &[installation], ".json")
    }

    /// Where the node's release trials are kept.
    pub fn trials(&self) -> PathBuf {
        self.root.join("trials")
    }

    /// The network namespace of container `id`.
    pub fn netns(&self, id: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("netns", &[id], "")
    }

    /// The CNI ADD results of container `id`.
    pub fn cni_attachments(&self, id: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("cni/containers", &[id], ".json")
    }

    /// The named volumes of an installation.
    pub fn volumes(&self, installation: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("volumes", &[installation], "")
    }

    /// The named volume `name` of an installation.
    pub fn volume(&self, installation: &str, name: &str) -> Result<PathBuf, StateDirError> {
        self.beneath("volumes", &[installation, name], "")
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

/// Most bytes read from the end of a log for its tail: an addon that
/// writes without end costs the monitor this much memory per read, never
/// the size of its log.
pub const MAX_TAIL_BYTES: u64 = 1 << 20;

/// Longest line of a tail; the rest of a longer one is cut.
const MAX_TAIL_LINE: usize = 4096;

/// The last `lines` lines of a log, read from at most the last
/// [`MAX_TAIL_BYTES`] of it and of its rotated file (`.1`), which holds
/// the lines before when the log was just started anew; a missing file has
/// none.
pub fn tail(path: &Path, lines: usize) -> std::io::Result<Vec<String>> {
    let mut newest = tail_of(path, lines)?;
    if newest.len() < lines {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        let mut older = tail_of(Path::new(&rotated), lines - newest.len())?;
        older.append(&mut newest);
        newest = older;
    }
    Ok(newest)
}

/// The last `lines` lines of one file, read from at most its last
/// [`MAX_TAIL_BYTES`].
fn tail_of(path: &Path, lines: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read as _, Seek as _};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(MAX_TAIL_BYTES);
    file.seek(std::io::SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(MAX_TAIL_BYTES).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    // A read that starts inside the file starts inside a line.
    if start > 0 && !all.is_empty() {
        all.remove(0);
    }
    Ok(all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| crate::bounded(line, MAX_TAIL_LINE).to_owned())
        .collect())
}

/// Whether `name` is one plain path component.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(|c| c == '\0' || c.is_control())
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

    #[test]
    fn tails_read_only_the_end() {
        let dir = tempdir();
        let path = dir.join("big.log");
        assert!(tail(&path, 5).unwrap().is_empty());
        let mut text = String::new();
        for i in 0..200_000 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&"x".repeat(10_000));
        std::fs::write(&path, &text).unwrap();
        assert!(text.len() as u64 > MAX_TAIL_BYTES);
        let last = tail(&path, 3).unwrap();
        assert_eq!(last[..2], ["line 199998", "line 199999"]);
        assert_eq!(last[2].len(), MAX_TAIL_LINE);
        let many = tail(&path, 1_000_000).unwrap();
        assert!(
            many.len() < 200_000 && many[0].starts_with("line "),
            "{}",
            many[0]
        );
        // Just started anew: the lines before come from the rotated file.
        std::fs::rename(&path, dir.join("big.log.1")).unwrap();
        std::fs::write(&path, "new 1\n").unwrap();
        let across = tail(&path, 3).unwrap();
        assert_eq!(across[1..], ["x".repeat(MAX_TAIL_LINE), "new 1".to_owned()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_name_leads_outside_the_state_dir() {
        let state = StateDir::new("/var/lib/oak");
        assert_eq!(
            state.volume("01jb8n1m3q9x6c2v4t7w0y5z8k", "data").unwrap(),
            Path::new("/var/lib/oak/volumes/01jb8n1m3q9x6c2v4t7w0y5z8k/data")
        );
        assert_eq!(
            state.log("root_web").unwrap(),
            Path::new("/var/lib/oak/logs/root_web.log")
        );
        for name in ["", ".", "..", "../../etc", "a/b", "/etc", "a\0b", "x\n"] {
            assert!(state.volume(name, "etc").is_err(), "{name:?}");
            assert!(state.volume("i", name).is_err(), "{name:?}");
            assert!(state.container_dir(name).is_err(), "{name:?}");
            assert!(state.swap_record(name).is_err(), "{name:?}");
            assert!(state.trial(name).is_err(), "{name:?}");
        }
        // `..log` is a plain name: the suffix cannot make it a parent.
        assert!(state.log(".").is_err());
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
