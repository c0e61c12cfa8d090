//! Addon logs written by the monitor's own binary, as containerd's shim
//! runs a binary logger (`binary://` log URI): the shim hands it the
//! container's stdout and stderr as fds 3 and 4 and waits for fd 5 to
//! close. It writes what arrives to the log file and, the moment the file
//! would pass its size limit, renames it to `.1` and starts a new one. An
//! addon that writes without end fills at most twice the limit on disk,
//! never the node's disk, and the monitor reads at most the end of a file.
//!
//! The logger runs as `addons-monitor --log-writer --path FILE --max-bytes
//! N` (the shim passes the URI's query as arguments, in any order), from a
//! copy of the monitor's binary in the state dir: the shim runs on the
//! host, where a monitor running in a container has no binary of its own.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

/// The argument that makes the monitor's binary the log writer.
pub const FLAG: &str = "--log-writer";

/// Bytes read from a pipe at once.
const CHUNK: usize = 64 << 10;

/// A log file that rotates by size as it is written.
#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl Log {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            written,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Appends `bytes`, rotating first when they would pass the limit.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + bytes.len() as u64 > self.max_bytes {
            let mut rotated = self.path.as_os_str().to_owned();
            rotated.push(".1");
            std::fs::rename(&self.path, PathBuf::from(rotated))?;
            *self = Self::open(&self.path, self.max_bytes)?;
        }
        // A single write larger than the limit keeps only its end.
        let keep = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
        let bytes = &bytes[bytes.len().saturating_sub(keep)..];
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Copies everything from `source` into `log` until it closes.
fn pump(mut source: File, log: &Mutex<Log>) {
    let mut buffer = vec![0_u8; CHUNK];
    loop {
        match source.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                let written = log
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(&buffer[..n]);
                if let Err(err) = written {
                    // Keep draining: a full pipe would stall the addon.
                    eprintln!("addons-monitor log writer: {err}");
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Runs the log writer with `args` (what follows the binary's name).
pub fn run(args: &[String]) -> Result<(), String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| format!("{flag} is missing"))
    };
    let path = PathBuf::from(value("--path")?);
    let max_bytes: u64 = value("--max-bytes")?
        .parse()
        .map_err(|_| "--max-bytes is not a number".to_owned())?;
    let log = Arc::new(Mutex::new(
        Log::open(&path, max_bytes).map_err(|err| format!("{}: {err}", path.display()))?,
    ));
    // The container's stdout and stderr, as the shim passed them.
    let stdout = File::open("/proc/self/fd/3").map_err(|err| format!("stdout: {err}"))?;
    let stderr = File::open("/proc/self/fd/4").map_err(|err| format!("stderr: {err}"))?;
    // Ready: the shim waits for fd 5 to close before it starts the task.
    nix::unistd::close(5).map_err(|err| format!("cannot signal readiness: {err}"))?;
    let other = log.clone();
    let errors = std::thread::spawn(move || pump(stderr, &other));
    pump(stdout, &log);
    let _ = errors.join();
    Ok(())
}

/// The log URI of a task whose output goes to `log`, written by the binary
/// at `writer` with `max_bytes` per file.
pub fn uri(writer: &Path, log: &Path, max_bytes: u64) -> String {
    format!(
        "binary://{}?{FLAG}=&--path={}&--max-bytes={max_bytes}",
        escape(&writer.display().to_string()),
        escape(&log.display().to_string())
    )
}

/// `text` percent-encoded for a URI, `/` kept.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Puts the running binary at `<state>/bin/addons-monitor`, where the
/// shim runs it from (a hard link when the state dir is on the same
/// filesystem, else a copy), replacing what an older monitor left there
/// (its running log writers keep their own file); returns its path.
pub fn install(state_root: &Path) -> std::io::Result<PathBuf> {
    install_from(&std::env::current_exe()?, state_root)
}

/// [`install`] of the binary `exe`. A file there already with the same
/// bytes stays: a monitor restarted on a state dir of another filesystem
/// would otherwise copy itself anew at each start, and each copy stays
/// taken while a log writer of an earlier start runs from it, until the
/// disk is full (found by the fault campaign).
fn install_from(exe: &Path, state_root: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = state_root.join("bin");
    std::fs::create_dir_all(&dir)?;
    let target = dir.join("addons-monitor");
    if same_file(exe, &target) {
        return Ok(target);
    }
    let temp = dir.join(format!(".addons-monitor.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    if std::fs::hard_link(exe, &temp).is_err() {
        let copied = std::fs::copy(exe, &temp)
            .and_then(|_| std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o700)));
        if let Err(err) = copied {
            // A part copied to a full disk is not left to take its room.
            let _ = std::fs::remove_file(&temp);
            return Err(err);
        }
    }
    std::fs::rename(&temp, &target)?;
    Ok(target)
}

/// Whether `a` and `b` are one file, or two with the same bytes.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(first), Ok(second)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if (first.dev(), first.ino()) == (second.dev(), second.ino()) {
        return true;
    }
    if first.len() != second.len() {
        return false;
    }
    let (Ok(mut a), Ok(mut b)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let (mut x, mut y) = (vec![0; CHUNK], vec![0; CHUNK]);
    loop {
        match (read_full(&mut a, &mut x), read_full(&mut b, &mut y)) {
            (Ok(0), Ok(0)) => return true,
            (Ok(n), Ok(m)) if n == m && x[..n] == y[..m] => {}
            _ => return false,
        }
    }
}

/// Reads until `buffer` is full or the file ends; how much it read.
fn read_full(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_with_the_same_bytes_stays_and_another_is_replaced() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("exe");
        std::fs::write(&exe, vec![7_u8; 3 * CHUNK + 5]).unwrap();
        let state = dir.path().join("state");
        // What an earlier start copied (another filesystem: no link).
        std::fs::create_dir_all(state.join("bin")).unwrap();
        let copied = state.join("bin/addons-monitor");
        std::fs::copy(&exe, &copied).unwrap();
        let inode = std::fs::metadata(&copied).unwrap().ino();
        assert_eq!(install_from(&exe, &state).unwrap(), copied);
        assert_eq!(std::fs::metadata(&copied).unwrap().ino(), inode, "kept");
        // Another binary: replaced, and nothing else is left in the dir.
        let mut other = vec![7_u8; 3 * CHUNK + 5];
        other[2 * CHUNK + 1] = 8;
        std::fs::write(&exe, &other).unwrap();
        install_from(&exe, &state).unwrap();
        assert_eq!(std::fs::read(&copied).unwrap(), other);
        assert_eq!(std::fs::read_dir(state.join("bin")).unwrap().count(), 1);
    }

    #[test]
    fn rotates_as_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root_x.log");
        let mut log = Log::open(&path, 10).unwrap();
        log.write(b"0123456").unwrap();
        log.write(b"789").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        log.write(b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert_eq!(
            std::fs::read(dir.path().join("root_x.log.1")).unwrap(),
            b"0123456789"
        );
        // One write over the limit keeps its end.
        log.write(b"ABCDEFGHIJKLMNOP").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"GHIJKLMNOP");
        // Reopened, it counts what is there.
        let mut again = Log::open(&path, 12).unwrap();
        again.write(b"xyz").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"xyz");
    }

    #[test]
    fn writes_uris_the_shim_reads() {
        assert_eq!(
            uri(
                Path::new("/var/lib/m/bin/addons-monitor"),
                Path::new("/var/lib/m/logs/root x.log"),
                1024
            ),
            "binary:///var/lib/m/bin/addons-monitor?--log-writer=&--path=/var/lib/m/logs/root%20x.log&--max-bytes=1024"
        );
    }
}
