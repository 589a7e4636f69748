//! Throwaway `redis-server` processes for the tests that need to stop, restart
//! or cluster Redis (the shared one from `scripts/test` must not be disturbed).
//! The binary comes from `METERD_TEST_REDIS_SERVER_BIN` (set by `scripts/test`);
//! without it a test is skipped, or fails under `METERD_TEST_REQUIRE_SERVICES`
//! (see `require`).

use super::ports::free_port;
use super::require::{self, Need};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One redis-server without persistence: a restart comes back empty.
pub struct RedisServer {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    cluster: bool,
}

impl RedisServer {
    /// Starts a server on a free port with its files under a temp dir.
    pub async fn start(cluster: bool) -> Need<RedisServer> {
        let bin = require::redis_server_bin()?;
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let mut server = RedisServer { port: server_port(cluster), bin, dir, child: None, cluster };
        // A port found free may be taken before redis binds it (another test's
        // server, a client's ephemeral port, or a cluster node's bus port at
        // port + 10000): a server that exits at once is started on a new port.
        for attempt in 1.. {
            match server.spawn().await {
                Ok(()) => break,
                Err(log) if attempt < 5 => {
                    eprintln!("redis-server on {} exited at start (attempt {attempt}); trying another port:\n{log}", server.port);
                    server.port = server_port(cluster);
                }
                Err(log) => panic!("redis-server exited at start five times; last log:\n{log}"),
            }
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.log", self.port))
    }

    /// Starts redis-server on `self.port` and waits until it listens; `Err`
    /// with its log when it exits first (the port was taken, say).
    async fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_path());
        if self.cluster {
            cmd.arg("--cluster-enabled").arg("yes").arg("--cluster-config-file").arg(self.dir.join(format!("nodes-{}.conf", self.port)));
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while super::connect_listening(("127.0.0.1", self.port)).await.is_none() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait redis-server"));
            if exited.is_some() {
                self.child = None;
                return Err(std::fs::read_to_string(self.log_path()).unwrap_or_default());
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("redis-server did not start on {} within 10 s; log:\n{log}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the server (SIGKILL: nothing is saved).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart_empty(&mut self) {
        self.stop();
        if self.cluster {
            let _ = std::fs::remove_file(self.dir.join(format!("nodes-{}.conf", self.port)));
        }
        // The same port is needed (clients hold its URL): a start that loses
        // the port to someone else is retried on it for a while.
        for attempt in 1.. {
            match self.spawn().await {
                Ok(()) => break,
                Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(log) => panic!("redis-server could not restart on {}; log:\n{log}", self.port),
            }
        }
    }

    /// A plain connection for the test's own reads.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("client");
        client.get_multiplexed_async_connection().await.expect("connect to test redis")
    }
}

/// A free port for a server; for a cluster node one whose bus port (port +
/// 10000, which redis requires to be at most 65535) is free too, both below
/// the ephemeral range (see `free_port`).
fn server_port(cluster: bool) -> u16 {
    if !cluster {
        return free_port();
    }
    // Below 55536, so that the bus port fits.
    let end = super::ports::ephemeral_start().saturating_sub(10_000).min(55_536);
    super::ports::free_ports_below(end, &[0, 10_000])
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-master Redis Cluster on free ports (no replicas).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Need<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::start(true).await?);
        }
        let cli = nodes[0].bin.with_file_name("redis-cli");
        let mut cmd = Command::new(&cli);
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = cmd.arg("--cluster-replicas").arg("0").arg("--cluster-yes").output().expect("run redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        // Wait until every node agrees that all slots are served.
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info = Command::new(&cli).arg("-p").arg(n.port.to_string()).arg("cluster").arg("info").output().expect("cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(RedisCluster { nodes })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// A cluster connection for the test's own reads.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let client = redis::cluster::ClusterClient::new(self.urls()).expect("cluster client");
        client.get_async_connection().await.expect("connect to test cluster")
    }
}
