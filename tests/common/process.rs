//! Running the real `meterd` binary: spawn with a config, wait until healthy,
//! SIGTERM or SIGKILL it, read its log. Processes are killed when dropped, so a
//! failing test leaves none behind.

use super::Client;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A meterd process, killed on drop if still running.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "meterd did not exit; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The meterd binary with `--config`, free of the caller's METERD_* overrides.
pub fn meterd_command(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterd"));
    cmd.arg("--config").arg(config).env_remove("METERD_LISTEN").env_remove("METERD_CONFIG").stdin(Stdio::null());
    cmd
}

/// Starts meterd, logging to `log`.
pub fn spawn(config: &Path, log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = meterd_command(config).stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().expect("spawn meterd");
    Proc { child, log }
}

/// Waits until `/healthz` answers (panics with the log if the process dies).
/// A restart after a kill under load replays the WAL and reopens the dedupe
/// runs first: CI once saw one still silent after 20 s, on a busy machine, so
/// the wait is a minute.
pub async fn wait_healthy(p: &mut Proc, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            panic!("meterd exited early with {status}; log:\n{}", p.log());
        }
        if healthz_ok(addr).await {
            return;
        }
        assert!(Instant::now() < deadline, "meterd not healthy within a minute; log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `/healthz` at `addr` answers 200; any failure on the way is a no.
async fn healthz_ok(addr: SocketAddr) -> bool {
    let client = Client { addr, token: None };
    let asked = client.try_send(hyper::Method::GET, "/healthz", None, bytes::Bytes::new());
    matches!(tokio::time::timeout(Duration::from_secs(5), asked).await, Ok(Ok(r)) if r.status == 200)
}
