//! Small tmpfs mounts for disk-trouble tests: a full disk, a read-only one. They
//! need root (CI runs as root): where `mount` fails, the test is skipped, or fails
//! under `METERD_TEST_REQUIRE_SERVICES` (see `require`). Unmounted (lazily) on drop.

use super::require::{self, Need};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "256k") at `path`, read-only if asked.
    pub fn mount(path: &Path, size: &str, read_only: bool) -> Need<Tmpfs> {
        if let Err(e) = std::fs::create_dir_all(path) {
            panic!("create the mount point {}: {e}", path.display());
        }
        let mut opts = format!("size={size}");
        if read_only {
            opts.push_str(",ro");
        }
        let why = match Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(path).output() {
            Ok(out) if out.status.success() => return Ok(Tmpfs { path: path.to_path_buf() }),
            Ok(out) => format!("mount exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => format!("cannot run mount: {e}"),
        };
        Err(require::missing(format!("cannot mount a tmpfs at {} ({why})", path.display()), "run as root with mount(8), as CI does"))
    }

    /// Fills the file system with a filler file; returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        if let Ok(mut f) = std::fs::File::create(&filler) {
            let chunk = vec![0u8; 4096];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.sync_all();
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
