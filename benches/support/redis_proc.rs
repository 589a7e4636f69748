//! A throwaway `redis-server` for the benches that need one (`redis`,
//! `leased`): started on a free loopback port, killed when dropped. Included
//! with `#[path]` beside `tests/common/require.rs` as `require`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisProc(Child);

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `METERD_TEST_REDIS_SERVER_BIN` (or `redis-server`); its port.
pub fn start_redis() -> crate::require::Need<(RedisProc, u16)> {
    let bin = std::env::var_os("METERD_TEST_REDIS_SERVER_BIN").filter(|b| !b.is_empty()).unwrap_or_else(|| "redis-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let child = match Command::new(&bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => RedisProc(child),
        Err(e) => return Err(crate::require::missing(format!("cannot start {}: {e}", bin.display()), "install redis-server")),
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((child, port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} did not listen on {port} within 2 s", bin.display());
}
