//! Real `prkv` processes on loopback ports: a PD and stores started as the binary a user runs,
//! killed with SIGKILL or stopped with SIGTERM, for process-level tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PRKV_BUILT: &str = env!("CARGO_BIN_EXE_prkv");

/// The `prkv` binary under test: the one this build made, or `PRKV_TEST_BIN` (to run a test
/// against another build, e.g. to show that it fails before a fix).
pub fn prkv_bin() -> String {
    std::env::var("PRKV_TEST_BIN").unwrap_or_else(|_| PRKV_BUILT.to_string())
}

/// Store settings that make failover quick in tests: 100 ms ticks (1 s election timeout), PD
/// heartbeats every second, small memtables.
pub const FAST_STORE_CONFIG: &str = r#"
[raftstore]
raft-base-tick-interval = "100ms"
raft-heartbeat-ticks = 2
raft-election-timeout-ticks = 10
raft-store-max-leader-lease = "800ms"
pd-heartbeat-tick-interval = "1s"
pd-store-heartbeat-tick-interval = "1s"

[rocksdb]
write-buffer-limit = "64MiB"
write-buffer-size = "8MiB"
block-cache-size = "32MiB"
"#;

/// `n` consecutive free loopback ports (checked by binding them all).
///
/// They are drawn from 10000-32767, below Linux's ephemeral range (32768-60999): a port
/// checked free there could be handed to some process's outgoing connection before the
/// server that should listen on it starts. Concurrent tests open thousands of connections.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base: u16 = 10_000 + rand::random::<u16>() % (32_768 - 10_000 - n);
        let ok = (0..n).all(|i| {
            base.checked_add(i)
                .is_some_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if ok {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A plain HTTP GET (reusing the playground's client).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    prkv::playground::http_get(addr, path)
}

pub fn http_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let body = http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Waits until PD reports `stores` live stores and every Region has a leader and `replicas`
/// voters.
pub fn wait_cluster(pd: SocketAddr, stores: usize, replicas: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let (Ok(s), Ok(r)) = (
            http_get(pd, "/pd/api/v1/stores"),
            http_get(pd, "/pd/api/v1/regions"),
        ) {
            let s: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            let r: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
            let alive = s["stores"].as_array().map_or(0, |a| {
                a.iter().filter(|x| x["status"]["alive"] == true).count()
            });
            let regions = r["regions"].as_array().cloned().unwrap_or_default();
            let ok = alive >= stores
                && !regions.is_empty()
                && regions.iter().all(|x| {
                    !x["leader"].is_null()
                        && x["peers"].as_array().map_or(0, |p| {
                            p.iter().filter(|p| p["role_name"] == "Voter").count()
                        }) == replicas
                        && x["pending_peers"].as_array().is_none_or(|p| p.is_empty())
                });
            if ok {
                return;
            }
            last = format!("{alive} stores alive, regions: {r}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("cluster not ready after {timeout:?}: {last}");
}

pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(args: &[&str], log: &Path) -> Proc {
        Self::spawn_env(args, log, &[])
    }

    /// Like `spawn`, with more environment variables.
    pub fn spawn_env(args: &[&str], log: &Path, envs: &[(String, String)]) -> Proc {
        Self::spawn_limited(args, log, envs, None)
    }

    /// Like `spawn_env`, under `ulimit -n nofile` if given (soft and hard: the process cannot
    /// raise it).
    pub fn spawn_limited(
        args: &[&str],
        log: &Path,
        envs: &[(String, String)],
        nofile: Option<u64>,
    ) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(prkv_bin());
                c
            }
            None => Command::new(prkv_bin()),
        };
        let child = cmd
            .args(args)
            .env(
                "PRKV_LOG",
                std::env::var("PRKV_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // The status port's `/fault/partition` (network partitions for the nemesis).
            .env("PRKV_FAULTS", "1")
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Proc { child }
    }

    /// SIGSTOP (`pause`) or SIGCONT: the process stays, frozen, with its sockets open.
    pub fn pause(&mut self, pause: bool) {
        let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (SIGKILL after `grace`); returns whether it exited by itself.
    pub fn sigterm(&mut self, grace: Duration) -> bool {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.sigkill();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.sigkill();
        }
    }
}

/// Adds `extra`'s keys to `doc`, section by section (a TOML file may name a section once).
fn merge(doc: &mut toml::Table, extra: toml::Table) {
    for (section, values) in extra {
        let t = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let (toml::Value::Table(t), toml::Value::Table(v)) = (t, values) {
            t.extend(v);
        }
    }
}

/// A PD and `n` stores as separate processes.
pub struct ProcCluster {
    pub dir: PathBuf,
    pub pd_addr: SocketAddr,
    pub store_base: u16,
    pub pd: Option<Proc>,
    pub stores: Vec<Option<Proc>>,
    pub extra_config: String,
    pub pd_config: String,
    /// Stores with reserved ports.
    pub max_stores: usize,
    /// Environment variables for the next start of PD and of every store (e.g.
    /// `PRKV_CRASH_AT`).
    pub pd_env: Vec<(String, String)>,
    pub store_env: Vec<(String, String)>,
    /// `ulimit -n` for stores started from now on, if set.
    pub store_nofile: Option<u64>,
}

/// Stores a test may add to a running cluster (ports are reserved for them).
const SPARE_STORES: usize = 2;

impl ProcCluster {
    pub fn start(dir: &Path, n: usize, extra_config: &str) -> ProcCluster {
        Self::start_with_pd(dir, n, extra_config, "")
    }

    /// Like `start`, with a PD config file (`[replication]`, `[schedule]`).
    pub fn start_with_pd(dir: &Path, n: usize, extra_config: &str, pd_config: &str) -> ProcCluster {
        Self::start_with_env(
            dir,
            n,
            extra_config,
            pd_config,
            Vec::new(),
            Vec::new(),
            None,
        )
    }

    /// Like `start_with_pd`, with environment variables for PD and for the stores, and the
    /// stores' `ulimit -n`.
    pub fn start_with_env(
        dir: &Path,
        n: usize,
        extra_config: &str,
        pd_config: &str,
        pd_env: Vec<(String, String)>,
        store_env: Vec<(String, String)>,
        store_nofile: Option<u64>,
    ) -> ProcCluster {
        let base = free_ports(1 + 2 * (n + SPARE_STORES) as u16);
        let mut c = ProcCluster {
            dir: dir.to_path_buf(),
            pd_addr: addr(base),
            store_base: base + 1,
            pd: None,
            stores: (0..n).map(|_| None).collect(),
            extra_config: extra_config.to_string(),
            pd_config: pd_config.to_string(),
            max_stores: n + SPARE_STORES,
            pd_env,
            store_env,
            store_nofile,
        };
        c.start_pd();
        for i in 1..=n {
            c.start_store(i);
        }
        c
    }

    pub fn start_pd(&mut self) {
        let data = self.dir.join("pd");
        let cfg = self.dir.join("pd.toml");
        std::fs::write(&cfg, &self.pd_config).unwrap();
        self.pd = Some(Proc::spawn_env(
            &[
                "pd",
                "--addr",
                &self.pd_addr.to_string(),
                "--data-dir",
                data.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ],
            &self.dir.join("pd.log"),
            &self.pd_env,
        ));
    }

    pub fn store_addr(&self, i: usize) -> SocketAddr {
        addr(self.store_base + 2 * (i as u16 - 1))
    }

    pub fn status_addr(&self, i: usize) -> SocketAddr {
        addr(self.store_base + 2 * (i as u16 - 1) + 1)
    }

    /// Starts store `i` (1-based); `i` may be one past the last store: scale out.
    pub fn start_store(&mut self, i: usize) {
        assert!(i <= self.max_stores, "no ports reserved for store {i}");
        while self.stores.len() < i {
            self.stores.push(None);
        }
        // The test's settings, then this store's own (merged: one table per section).
        let mut doc: toml::Table = FAST_STORE_CONFIG.parse().unwrap();
        merge(&mut doc, self.extra_config.parse().unwrap());
        let own: toml::Table = format!(
            "[storage]\ndata-dir = {:?}\n[server]\naddr = \"{}\"\nstatus-addr = \"{}\"\n[pd]\nendpoints = [\"{}\"]\n",
            self.dir.join(format!("store-{i}")),
            self.store_addr(i),
            self.status_addr(i),
            self.pd_addr
        )
        .parse()
        .unwrap();
        merge(&mut doc, own);
        let cfg = toml::to_string(&doc).unwrap();
        let path = self.dir.join(format!("store-{i}.toml"));
        std::fs::write(&path, cfg).unwrap();
        self.stores[i - 1] = Some(Proc::spawn_limited(
            &["store", "--config", path.to_str().unwrap()],
            &self.dir.join(format!("store-{i}.log")),
            &self.store_env,
            self.store_nofile,
        ));
    }

    pub fn kill_store(&mut self, i: usize) {
        if let Some(mut p) = self.stores[i - 1].take() {
            p.sigkill();
        }
    }

    /// Store `i` was started and has not exited.
    pub fn store_running(&mut self, i: usize) -> bool {
        self.stores[i - 1]
            .as_mut()
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) store `i`.
    pub fn pause_store(&mut self, i: usize, pause: bool) {
        if let Some(p) = self.stores[i - 1].as_mut() {
            p.pause(pause);
        }
    }

    /// How PD ended, if it has (see `store_exit`).
    pub fn pd_exit(&mut self) -> Option<Option<i32>> {
        let p = self.pd.as_mut()?;
        match p.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            _ => None,
        }
    }

    pub fn kill_pd(&mut self) {
        if let Some(mut p) = self.pd.take() {
            p.sigkill();
        }
    }

    /// Cuts Raft traffic between store `i` and every other store (both sides drop it); the
    /// stores' clients and PD still reach it. Stores not running are skipped.
    pub fn isolate_store(&self, i: usize) {
        let n = self.stores.len();
        for s in 1..=n {
            let cut: Vec<String> = if s == i {
                (1..=n).filter(|o| *o != i).map(|o| o.to_string()).collect()
            } else {
                vec![i.to_string()]
            };
            self.fault_partition(s, &cut.join(","));
        }
    }

    /// Heals every partition and ends every delay.
    pub fn heal(&self) {
        for s in 1..=self.stores.len() {
            self.fault_partition(s, "");
            self.fault_post(s, "/fault/delay?stores=");
        }
    }

    /// Delays Raft messages between store `i` and every other store (both ways) by a random
    /// time up to `ms` each: they arrive late and reordered (`server::fault`).
    pub fn delay_store(&self, i: usize, ms: u64) {
        let n = self.stores.len();
        for s in 1..=n {
            let from: Vec<String> = if s == i {
                (1..=n).filter(|o| *o != i).map(|o| o.to_string()).collect()
            } else {
                vec![i.to_string()]
            };
            self.fault_post(
                s,
                &format!("/fault/delay?stores={}&ms={ms}", from.join(",")),
            );
        }
    }

    /// Arms crash point `point` on store `i` (`prkv::crash`); `""` disarms every point. A
    /// store just restarted may not listen yet: asked again for up to 10 s. Returns whether
    /// the store took it.
    pub fn arm_crash(&mut self, i: usize, point: &str) -> bool {
        if self.stores[i - 1].is_none() {
            return false;
        }
        let path = format!("/fault/crash?point={point}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match prkv::playground::http_request(self.status_addr(i), "POST", &path) {
                Ok((200, _, _)) => return true,
                Ok((_, head, body)) => {
                    println!("store {i}: POST {path}: {head} {body}");
                    return false;
                }
                // Armed, and reached before the answer went out: a store just restarted can
                // replay the very entry that crashed it (a merge's, a split's) within
                // milliseconds of being armed again.
                Err(_) if self.store_exit(i) == Some(Some(prkv::crash::CRASH_EXIT_CODE)) => {
                    return true
                }
                Err(e) if Instant::now() > deadline => {
                    println!("store {i}: POST {path}: {e}");
                    return false;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// How store `i` ended, if it has: its exit code (`None` inside: killed by a signal).
    pub fn store_exit(&mut self, i: usize) -> Option<Option<i32>> {
        let p = self.stores[i - 1].as_mut()?;
        match p.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            _ => None,
        }
    }

    fn fault_post(&self, s: usize, path: &str) {
        if self.stores[s - 1].is_none() {
            return;
        }
        match prkv::playground::http_request(self.status_addr(s), "POST", path) {
            Ok((200, _, _)) => {}
            Ok((_, head, body)) => println!("store {s}: POST {path}: {head} {body}"),
            Err(e) => println!("store {s}: POST {path}: {e}"),
        }
    }

    fn fault_partition(&self, s: usize, stores: &str) {
        if self.stores[s - 1].is_none() {
            return;
        }
        let path = format!("/fault/partition?stores={stores}");
        match prkv::playground::http_request(self.status_addr(s), "POST", &path) {
            Ok((200, _, _)) => {}
            // A store just restarted may not listen yet; it starts healed.
            Ok((_, head, body)) => println!("store {s}: POST {path}: {head} {body}"),
            Err(e) => println!("store {s}: POST {path}: {e}"),
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.pd_addr.to_string()]
    }
}

impl Drop for ProcCluster {
    /// A failing test shows the end of every process's log: the temporary directory that
    /// holds them is removed with the test.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = std::iter::once("pd.log".to_string())
            .chain((1..=self.stores.len()).map(|i| format!("store-{i}.log")));
        for name in logs {
            let Ok(text) = std::fs::read_to_string(self.dir.join(&name)) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            println!("---- last {} lines of {name} ----", tail.len());
            for l in tail {
                println!("{l}");
            }
        }
    }
}

/// Enough to show how a process ended, short enough to keep a failing CI log readable.
const LOG_TAIL_LINES: usize = 40;

/// `prkv playground` as a child process, waiting for its "ready" line.
pub struct Playground {
    pub proc: Proc,
    pub pd_addr: SocketAddr,
    pub store_port: u16,
    pub status_port: u16,
}

impl Playground {
    pub fn start(dir: &Path, ports: u16, store_config: &Path, stores: usize) -> Playground {
        let pd_addr = addr(ports);
        let (store_port, status_port) = (ports + 1, ports + 1 + stores as u16);
        let mut child = Command::new(prkv_bin())
            .args([
                "playground",
                "--data-dir",
                dir.to_str().unwrap(),
                "--stores",
                &stores.to_string(),
                "--pd-addr",
                &pd_addr.to_string(),
                "--store-port",
                &store_port.to_string(),
                "--status-port",
                &status_port.to_string(),
                "--store-config",
                store_config.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("playground: {line}");
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        let proc = Proc { child };
        rx.recv_timeout(Duration::from_secs(120))
            .expect("playground did not print its ready line");
        Playground {
            proc,
            pd_addr,
            store_port,
            status_port,
        }
    }
}
