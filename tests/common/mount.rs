//! Small tmpfs mounts for disk-trouble tests: a full disk, a read-only one. They
//! need root (CI runs as root); `Tmpfs::mount` returns `None` elsewhere and the
//! test says it was skipped. Unmounted (lazily) on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "256k") at `path`, read-only if asked.
    pub fn mount(path: &Path, size: &str, read_only: bool) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).ok()?;
        let mut opts = format!("size={size}");
        if read_only {
            opts.push_str(",ro");
        }
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(path).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs at {} (needs root)", path.display());
            return None;
        }
        Some(Tmpfs { path: path.to_path_buf() })
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
