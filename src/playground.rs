//! `prkv playground`: a whole cluster on this machine, for a first try and for process-level
//! tests. It runs `prkv pd` and `prkv store` as child processes (the same binary), so each can
//! be killed and restarted on its own, writes each store's config to `<data-dir>/store-N.toml`
//! and each process's log to `<data-dir>/logs/`, waits until every store has registered and
//! every Region has a leader, then serves until Ctrl-C or SIGTERM and stops the children
//! cleanly (stores first, then PD). Rerunning it on the same data dir restarts the same
//! cluster.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, EngineKind};

#[derive(Clone, Debug)]
pub struct PlaygroundOptions {
    pub data_dir: PathBuf,
    pub stores: usize,
    pub engine: Option<EngineKind>,
    pub store_config: Option<PathBuf>,
    pub pd_addr: SocketAddr,
    /// gRPC port of store 1; store N listens on `store_port + N - 1`.
    pub store_port: u16,
    /// Status port of store 1, likewise.
    pub status_port: u16,
    /// Longest wait for the cluster to become ready.
    pub ready_timeout: Duration,
}

/// One store's addresses.
pub struct StoreAddrs {
    pub addr: SocketAddr,
    pub status: SocketAddr,
}

impl PlaygroundOptions {
    pub fn store_addrs(&self, n: usize) -> StoreAddrs {
        let ip = self.pd_addr.ip();
        StoreAddrs {
            addr: SocketAddr::new(ip, self.store_port + n as u16 - 1),
            status: SocketAddr::new(ip, self.status_port + n as u16 - 1),
        }
    }
}

/// Builds store `n`'s config: the user's `--store-config` (if any), with the playground's
/// data dir, addresses, PD and engine on top. Validated like any config file.
pub fn store_config_text(opts: &PlaygroundOptions, n: usize) -> Result<String, String> {
    let mut doc: toml::Table = match &opts.store_config {
        None => toml::Table::new(),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("reading --store-config {}: {e}", p.display()))?;
            text.parse()
                .map_err(|e| format!("--store-config {}: {e}", p.display()))?
        }
    };
    let a = opts.store_addrs(n);
    let dir = opts.data_dir.join(format!("store-{n}"));
    let mut set = |section: &str, key: &str, v: toml::Value| {
        let t = doc
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = t {
            t.insert(key.to_string(), v);
        }
    };
    set(
        "storage",
        "data-dir",
        toml::Value::String(dir.display().to_string()),
    );
    if let Some(kind) = opts.engine {
        set(
            "storage",
            "engine",
            toml::Value::String(kind.as_str().to_string()),
        );
    }
    set("server", "addr", toml::Value::String(a.addr.to_string()));
    set(
        "server",
        "status-addr",
        toml::Value::String(a.status.to_string()),
    );
    set(
        "pd",
        "endpoints",
        toml::Value::Array(vec![toml::Value::String(opts.pd_addr.to_string())]),
    );
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    Config::from_toml(&text).map_err(|e| format!("store {n} config: {e}"))?;
    Ok(text)
}

/// A plain HTTP/1.1 GET (the playground needs nothing more to watch PD). Anything but 200 is
/// an error naming the status line.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let (status, head, body) = http_request(addr, "GET", path)?;
    if status != 200 {
        return Err(head);
    }
    Ok(body)
}

/// One HTTP/1.1 request without a body: `(status, status line, body)`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "malformed HTTP response".to_string())?;
    let status_line = head.lines().next().unwrap_or_default().to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    // tonic answers HTTP/1.1 with chunked bodies: undo the chunking.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        return Ok((status, status_line, out));
    }
    Ok((status, status_line, body.to_string()))
}

/// Whether PD knows `stores` live stores and every Region has a leader.
/// Every store is up, and every Region has a leader and its `replicas` voters: a cluster that
/// is replicated, not merely answering.
fn cluster_ready(pd: SocketAddr, stores: usize, replicas: usize) -> bool {
    let Ok(s) = http_get(pd, "/pd/api/v1/stores") else {
        return false;
    };
    let Ok(s) = serde_json::from_str::<serde_json::Value>(&s) else {
        return false;
    };
    let alive = s["stores"].as_array().map_or(0, |a| {
        a.iter().filter(|x| x["status"]["alive"] == true).count()
    });
    if alive < stores {
        return false;
    }
    let Ok(r) = http_get(pd, "/pd/api/v1/regions") else {
        return false;
    };
    let Ok(r) = serde_json::from_str::<serde_json::Value>(&r) else {
        return false;
    };
    let regions = r["regions"].as_array().cloned().unwrap_or_default();
    let voters = |x: &serde_json::Value| {
        x["peers"].as_array().map_or(0, |p| {
            p.iter().filter(|p| p["role_name"] == "Voter").count()
        })
    };
    !regions.is_empty()
        && regions
            .iter()
            .all(|x| !x["leader"].is_null() && voters(x) >= replicas)
}

pub(crate) fn spawn(exe: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    if std::env::var_os("PRKV_LOG").is_none() {
        cmd.env("PRKV_LOG", "info");
    }
    // If the playground dies without stopping its children (SIGKILL, a crash), the kernel
    // sends them SIGTERM: no orphaned cluster keeps the ports and the data dir.
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))
}

pub(crate) fn terminate(name: &str, child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{name} did not stop within {grace:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the playground until `stop` becomes true.
pub fn run(opts: &PlaygroundOptions, stop: Arc<AtomicBool>) -> Result<(), String> {
    if opts.stores == 0 || opts.stores > 64 {
        return Err(format!("--stores {} is outside 1..=64", opts.stores));
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating prkv: {e}"))?;
    let logs = opts.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    let mut configs = Vec::new();
    for n in 1..=opts.stores {
        let text = store_config_text(opts, n)?;
        let path = opts.data_dir.join(format!("store-{n}.toml"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        configs.push(path);
    }
    let max_replicas = opts.stores.min(3);
    let pd_args = vec![
        "pd".to_string(),
        "--addr".into(),
        opts.pd_addr.to_string(),
        "--data-dir".into(),
        opts.data_dir.join("pd").display().to_string(),
        "--max-replicas".into(),
        max_replicas.to_string(),
    ];
    let mut children: Vec<(String, Child)> = Vec::new();
    children.push(("PD".into(), spawn(&exe, &pd_args, &logs.join("pd.log"))?));
    for (i, cfg) in configs.iter().enumerate() {
        let args = vec![
            "store".to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ];
        let name = format!("store {}", i + 1);
        children.push((
            name,
            spawn(&exe, &args, &logs.join(format!("store-{}.log", i + 1)))?,
        ));
    }
    println!(
        "prkv playground: 1 PD + {} store(s), data in {}, logs in {}",
        opts.stores,
        opts.data_dir.display(),
        logs.display()
    );
    println!(
        "  PD       {}  (gRPC; HTTP API at http://{}/pd/api/v1/regions)",
        opts.pd_addr, opts.pd_addr
    );
    for n in 1..=opts.stores {
        let a = opts.store_addrs(n);
        println!(
            "  store {n}  {}  (status: http://{}/status, http://{}/metrics)",
            a.addr, a.status, a.status
        );
    }
    let deadline = Instant::now() + opts.ready_timeout;
    let mut ready = false;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for (name, c) in children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                let msg = format!(
                    "{name} exited during start-up ({status}); see {}",
                    logs.display()
                );
                for (n, c) in children.iter_mut().rev() {
                    terminate(n, c, Duration::from_secs(10));
                }
                return Err(msg);
            }
        }
        if cluster_ready(opts.pd_addr, opts.stores, max_replicas) {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if ready {
        println!(
            "ready: connect with tikv-client to {} (e.g. RawClient::new(vec![\"{}\"])). Ctrl-C stops the cluster.",
            opts.pd_addr, opts.pd_addr
        );
    } else if !stop.load(Ordering::Relaxed) {
        eprintln!(
            "warning: the cluster is not ready after {:?}; still serving (see {})",
            opts.ready_timeout,
            logs.display()
        );
    }
    let mut reported = vec![false; children.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, (name, c)) in children.iter_mut().enumerate() {
            if !reported[i] {
                if let Ok(Some(status)) = c.try_wait() {
                    eprintln!("{name} exited ({status}); the others keep serving");
                    reported[i] = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping...");
    // Stores first (they flush and say goodbye to PD), then PD.
    for (name, c) in children.iter_mut().rev() {
        terminate(name, c, Duration::from_secs(30));
    }
    println!("stopped");
    Ok(())
}
