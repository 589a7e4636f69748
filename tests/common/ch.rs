//! ClickHouse for the tests: the shared server `scripts/test` started
//! (`METERD_TEST_CLICKHOUSE_URL`), plain HTTP queries against it, and private
//! `clickhouse-server` processes (`METERD_TEST_CLICKHOUSE_SERVER_BIN`) for the
//! tests that kill and restart the server. Without the variables a test is
//! skipped, or fails under `METERD_TEST_REQUIRE_SERVICES` (see `require`).

use super::ports::free_port;
use super::require::{self, Need};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A database name no other test uses.
pub fn unique_db() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("meterd_it_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

/// Runs a query over ClickHouse's HTTP interface; returns the body's lines.
pub async fn query(url: &str, sql: &str) -> String {
    let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("connect clickhouse");
    // HTTP/1.0: a plain body, no chunked encoding to undo.
    let req = format!("POST / HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{sql}", sql.len());
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    body.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect::<Vec<_>>().join("\n")
}

/// `sum(value)` of a meter in `db.usage_minute` (`u64::MAX` if unreadable).
pub async fn sum(url: &str, db: &str, meter: &str) -> u64 {
    let text = query(url, &format!("SELECT sum(value) FROM {db}.usage_minute WHERE meter = '{meter}'")).await;
    text.lines().filter_map(|l| l.trim().parse::<u64>().ok()).next().unwrap_or(u64::MAX)
}

/// What a test proxy does with a request that has `INSERT` and its table in it.
#[derive(Clone)]
enum OnInsert {
    /// While armed: pass it on, wait until ClickHouse starts answering (so the
    /// insert happened), then cut both connections without passing the answer
    /// on; disarm and count the cut.
    Cut { armed: Arc<AtomicBool>, cuts: Arc<AtomicU64> },
    /// Hold it, unanswered and not passed on, until the client gives up; count it.
    Hold { held: Arc<AtomicU64> },
}

/// A TCP proxy to ClickHouse that, while armed, forwards a request containing
/// `INSERT` and `table` (in the URL's query), waits until ClickHouse starts
/// answering (so the insert happened), and then cuts both connections without
/// passing the answer on.
pub async fn cutting_proxy(upstream: String, table: &'static str, armed: Arc<AtomicBool>, cuts: Arc<AtomicU64>) -> std::net::SocketAddr {
    proxy(upstream, table, OnInsert::Cut { armed, cuts }).await
}

/// A TCP proxy to ClickHouse that forwards everything except requests with
/// `INSERT` and `table` in them: those it holds, unanswered and not passed on,
/// until the client gives up (a server that hangs on one table). `held` counts them.
pub async fn holding_proxy(upstream: String, table: &'static str, held: Arc<AtomicU64>) -> std::net::SocketAddr {
    proxy(upstream, table, OnInsert::Hold { held }).await
}

async fn proxy(upstream: String, table: &'static str, on_insert: OnInsert) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            tokio::spawn(relay(client, upstream.clone(), table, on_insert.clone()));
        }
    });
    addr
}

/// Relays one connection both ways, applying `on_insert` to the table's inserts.
async fn relay(mut client: tokio::net::TcpStream, upstream: String, table: &'static str, on_insert: OnInsert) {
    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
    let (mut buf, mut back) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut seen = Vec::new();
    loop {
        tokio::select! {
            n = client.read(&mut buf) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                seen.extend_from_slice(&buf[..n]);
                let has = |needle: &[u8]| seen.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle));
                let insert = has(b"INSERT") && has(table.as_bytes());
                match &on_insert {
                    OnInsert::Hold { held } if insert => {
                        held.fetch_add(1, Ordering::SeqCst);
                        // Swallow the rest until the client hangs up.
                        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                    OnInsert::Cut { armed, cuts } if insert && armed.load(Ordering::SeqCst) => {
                        if server.write_all(&buf[..n]).await.is_err() { return; }
                        // Let the whole request through, wait for the answer to start, drop it.
                        let mut answer = [0u8; 1];
                        loop {
                            tokio::select! {
                                n = client.read(&mut buf) => match n {
                                    Ok(n) if n > 0 => { let _ = server.write_all(&buf[..n]).await; }
                                    _ => return,
                                },
                                r = server.read(&mut answer) => {
                                    let _ = r;
                                    armed.store(false, Ordering::SeqCst);
                                    cuts.fetch_add(1, Ordering::SeqCst);
                                    return; // both sockets dropped: the answer never arrives
                                }
                            }
                        }
                    }
                    _ => {
                        if server.write_all(&buf[..n]).await.is_err() { return; }
                    }
                }
            }
            n = server.read(&mut back) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                if client.write_all(&back[..n]).await.is_err() { return; }
            }
        }
    }
}

/// A private clickhouse-server with its state in a temp dir (kept across restarts).
pub struct ClickHouseServer {
    pub http_port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClickHouseServer {
    pub async fn start() -> Need<ClickHouseServer> {
        let bin = require::clickhouse_server_bin()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let http_port = free_port();
        write_config(dir.path(), http_port, free_port(), free_port());
        let mut server = ClickHouseServer { http_port, bin, dir, child: None };
        server.spawn().await;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("log/stdout.log")).expect("log");
        let child = Command::new(&self.bin)
            .arg(format!("--config-file={}", self.dir.path().join("config.xml").display()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn clickhouse-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if super::connect_listening(("127.0.0.1", self.http_port)).await.is_some() && query(&self.url(), "SELECT 1").await == "1" {
                return;
            }
            assert!(Instant::now() < deadline, "clickhouse-server did not start on {}", self.http_port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the server stops at once, mid-whatever.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on its data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_config(dir: &Path, http: u16, tcp: u16, interserver: u16) {
    for sub in ["data/tmp", "data/user_files", "data/format_schemas", "log"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let d = dir.display();
    let config = format!(
        r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/log/clickhouse-server.log</log><errorlog>{d}/log/clickhouse-server.err.log</errorlog><size>10M</size><count>1</count></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <mark_cache_size>67108864</mark_cache_size>
    <path>{d}/data/</path>
    <tmp_path>{d}/data/tmp/</tmp_path>
    <user_files_path>{d}/data/user_files/</user_files_path>
    <format_schema_path>{d}/data/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"#
    );
    std::fs::write(dir.join("config.xml"), config).expect("config.xml");
    let users = r#"<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#;
    std::fs::write(dir.join("users.xml"), users).expect("users.xml");
}
