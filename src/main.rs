//! The `prkv` binary: one executable, one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use prkv::bench::engine::{self as engine_bench, EngineBenchOptions};
use prkv::bench::raftstore::{self as raftstore_bench, RaftstoreBenchOptions};
use prkv::config::{EngineKind, ReadableDuration, ReadableSize};

#[derive(Parser)]
#[command(
    name = "prkv",
    version,
    about = "A distributed key-value store with one RocksDB tablet per Region"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole cluster on this machine: 1 PD and N stores as child processes.
    Playground {
        /// Where PD and the stores keep their data, configs and logs.
        #[arg(long, default_value = "./prkv-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        stores: usize,
        /// Engine kind of every store (default: the config's, partitioned-raft-kv).
        #[arg(long)]
        engine: Option<EngineKind>,
        /// A store config file applied to every store (addresses and data dirs are set by the
        /// playground).
        #[arg(long)]
        store_config: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:2379")]
        pd_addr: std::net::SocketAddr,
        /// gRPC port of store 1; store N uses this + N - 1.
        #[arg(long, default_value_t = 20160)]
        store_port: u16,
        /// Status port of store 1; store N uses this + N - 1.
        #[arg(long, default_value_t = 20180)]
        status_port: u16,
        /// Seconds to wait for every store to register and every Region to have a leader.
        #[arg(long, default_value_t = 60)]
        ready_timeout_secs: u64,
    },
    /// The placement driver.
    Pd {
        #[arg(long, default_value = "127.0.0.1:2379")]
        addr: std::net::SocketAddr,
        /// Address announced to clients (default: --addr).
        #[arg(long)]
        advertise_addr: Option<String>,
        #[arg(long, default_value = "./prkv-data/pd")]
        data_dir: PathBuf,
        /// PD config ([replication] and [schedule], PD's key names); default: all defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replicas per Region (overrides replication.max-replicas).
        #[arg(long)]
        max_replicas: Option<usize>,
    },
    /// Inspect and operate a running cluster through PD.
    Ctl {
        /// PD's address.
        #[arg(long, default_value = "127.0.0.1:2379")]
        pd: std::net::SocketAddr,
        #[command(subcommand)]
        what: CtlCommand,
    },
    /// A store: serves TiKV's gRPC API for its Region replicas.
    Store {
        /// TOML config (see etc/config-template.toml); without it, all defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Benchmarks (results belong in BENCHMARKS.md, with the command).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every store: state, address, Region and leader counts.
    Stores,
    /// Every Region: range, epoch, peers, leader.
    Regions,
    /// Scale in: move every replica off the store, then mark it Tombstone.
    StoreDelete { id: u64 },
    /// Split a Region in half (PD sends the split to its leader).
    SplitRegion { id: u64 },
    /// Merge Region SOURCE into its neighbour TARGET (PD sends the merge to SOURCE's leader;
    /// their replicas must be on the same stores).
    MergeRegion { source: u64, target: u64 },
    /// The Raft state a stopped store holds for a Region (reads its data dir; no PD needed).
    RaftState {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        region: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// YCSB's core workloads (load, insert, a-f) against a prkv cluster or an etcd cluster,
    /// with the same generator: ops/s, latency percentiles, errors.
    Ycsb {
        /// `prkv://PD_HOST:PORT,...` or `etcd://HOST:PORT,...`.
        #[arg(long)]
        target: String,
        /// load, insert, a, b, c, d, e or f.
        #[arg(long, default_value = "a")]
        workload: String,
        /// raw, raw-batch (raw through BatchCommands streams, as the Go client sends) or txn
        /// (prkv only; etcd has one mode).
        #[arg(long, default_value = "raw")]
        mode: String,
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Stop after this many operations (0: run for --duration).
        #[arg(long, default_value_t = 0)]
        operations: u64,
        #[arg(long, default_value = "30s", value_parser = ReadableDuration::parse)]
        duration: ReadableDuration,
        /// Concurrent clients.
        #[arg(long, default_value_t = 256)]
        threads: usize,
        #[arg(long, default_value_t = 16)]
        key_size: usize,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        /// uniform, zipfian or latest (default: the workload's own).
        #[arg(long)]
        distribution: Option<String>,
        /// Write the result as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The storage layer alone: write data over many Regions with each engine kind and compare
    /// throughput and write amplification.
    Engine {
        /// Engine kinds to run, in order; ratios are relative to the first.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "partitioned-raft-kv,raft-kv"
        )]
        engine: Vec<EngineKind>,
        /// User bytes (keys + values) to write per engine kind.
        #[arg(long, default_value = "2GiB", value_parser = ReadableSize::parse)]
        total: ReadableSize,
        #[arg(long, default_value_t = 64)]
        regions: u64,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value_t = 16)]
        key_size: usize,
        /// Keys per write batch (one apply batch of one Region).
        #[arg(long, default_value_t = 64)]
        batch_keys: usize,
        /// Writer threads; each owns a disjoint set of Regions.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value = "256MiB", value_parser = ReadableSize::parse)]
        write_buffer_limit: ReadableSize,
        /// Scratch directory (removed after each run).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Longest wait for compactions after the load, in seconds.
        #[arg(long, default_value_t = 300)]
        settle_secs: u64,
    },
    /// Time for a new replica of one big Region to catch up (real processes: PD + stores),
    /// next to `cp -r` of the same data.
    AddReplica {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "partitioned-raft-kv,raft-kv"
        )]
        engine: Vec<EngineKind>,
        #[arg(long, default_value = "1GiB", value_parser = ReadableSize::parse)]
        size: ReadableSize,
        #[arg(long, default_value_t = 4096)]
        value_size: usize,
        /// PD's port; the stores use the next six.
        #[arg(long, default_value_t = 24379)]
        base_port: u16,
        /// Scratch directory (removed after each run).
        #[arg(long, default_value = "./prkv-data/bench-add-replica")]
        data_dir: PathBuf,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Split latency of one big Region (3 replicas in one process), from the request to both
    /// halves serving reads, per engine kind and Region size.
    Split {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "partitioned-raft-kv,raft-kv"
        )]
        engine: Vec<EngineKind>,
        /// Region sizes to split, one run each.
        #[arg(long, value_delimiter = ',', default_value = "64MiB,256MiB,1GiB", value_parser = ReadableSize::parse)]
        size: Vec<ReadableSize>,
        #[arg(long, default_value_t = 4096)]
        value_size: usize,
        /// Scratch directory (removed after each run).
        #[arg(long, default_value = "./prkv-data/bench-split")]
        data_dir: PathBuf,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The Raftstore in one process (3 stores, simulated network): proposals/s and fsyncs/s
    /// at several concurrency levels, showing how Readies of many Regions share one fsync.
    Raftstore {
        #[arg(long, default_value = "partitioned-raft-kv")]
        engine: EngineKind,
        #[arg(long, default_value_t = 64)]
        regions: u64,
        /// Proposals kept in flight, one run per value.
        #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
        concurrency: Vec<usize>,
        /// Seconds per concurrency level.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        /// Scratch directory (removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Cuts a running cluster into many Regions (`[r00000000, r00000001)`, ...) through the
    /// gRPC API, then puts a few keys into each: the set-up for measuring many idle Regions.
    Regions {
        /// PD's address.
        #[arg(long, default_value = "127.0.0.1:2379")]
        pd: std::net::SocketAddr,
        /// Regions to end up with.
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// `numbered` (r00000000, r00000001, ...) or `ycsb` (`prkv bench ycsb`'s key space cut
        /// evenly: a pre-split before a load).
        #[arg(long, value_enum, default_value = "numbered")]
        layout: prkv::bench::regions::Layout,
        /// Keys written into each Region after the splits (0: none).
        #[arg(long, default_value_t = 10)]
        keys_per_region: u64,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Write requests in flight while filling.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PRKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A server process that panics exits. A panic in any thread means an invariant broke, and a
/// store whose Raft loop died while its gRPC and heartbeat tasks lived on would look alive to
/// PD and clients and never answer. Exiting lets a supervisor restart it; recovery rebuilds
/// the state from what is durable.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(panic = %info, "a thread panicked; the process exits");
        // Rust's own exit code for a panicking main thread.
        std::process::exit(101);
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(cli.command, Command::Pd { .. } | Command::Store { .. });
    init_logging(if server { "info" } else { "warn" });
    if server {
        exit_on_panic();
        // Crash points and fail points a test asked for (`src/crash.rs`).
        prkv::crash::arm_from_env();
    }
    match cli.command {
        Command::Playground {
            data_dir,
            stores,
            engine,
            store_config,
            pd_addr,
            store_port,
            status_port,
            ready_timeout_secs,
        } => run_playground(prkv::playground::PlaygroundOptions {
            data_dir,
            stores,
            engine,
            store_config,
            pd_addr,
            store_port,
            status_port,
            ready_timeout: Duration::from_secs(ready_timeout_secs),
        }),
        Command::Pd {
            addr,
            advertise_addr,
            data_dir,
            config,
            max_replicas,
        } => {
            let mut cfg = match config {
                None => prkv::pd::PdConfig::default(),
                Some(path) => match std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))
                    .and_then(|t| prkv::pd::PdConfig::from_toml(&t).map_err(|e| e.to_string()))
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            if let Some(r) = max_replicas {
                cfg.replication.max_replicas = r;
            }
            run_pd(prkv::pd::PdOptions {
                addr,
                advertise_addr,
                data_dir,
                config: cfg,
            })
        }
        Command::Ctl { pd, what } => {
            let res = match what {
                CtlCommand::Stores => prkv::ctl::stores(pd),
                CtlCommand::Regions => prkv::ctl::regions(pd),
                CtlCommand::StoreDelete { id } => prkv::ctl::delete_store(pd, id),
                CtlCommand::SplitRegion { id } => prkv::ctl::split_region(pd, id),
                CtlCommand::MergeRegion { source, target } => {
                    prkv::ctl::merge_region(pd, source, target)
                }
                CtlCommand::RaftState { data_dir, region } => {
                    prkv::ctl::raft_state(&data_dir, region)
                }
            };
            match res {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Store { config } => run_store(config),
        Command::Bench { what } => match what {
            BenchCommand::Engine {
                engine,
                total,
                regions,
                value_size,
                key_size,
                batch_keys,
                threads,
                write_buffer_limit,
                data_dir,
                json,
                settle_secs,
            } => {
                if regions == 0 || threads == 0 || batch_keys == 0 || value_size == 0 {
                    eprintln!(
                        "error: --regions, --threads, --batch-keys and --value-size must be > 0"
                    );
                    return ExitCode::from(2);
                }
                let opts = EngineBenchOptions {
                    kinds: engine,
                    total_bytes: total.0,
                    regions,
                    value_size,
                    key_size,
                    batch_keys,
                    threads,
                    write_buffer_limit,
                    data_dir: data_dir.unwrap_or_else(engine_bench::default_bench_dir),
                    seed: 42,
                    settle_timeout: Duration::from_secs(settle_secs),
                };
                report(
                    engine_bench::run(&opts),
                    |r| engine_bench::render_table(r),
                    json.as_deref(),
                )
            }
            BenchCommand::Ycsb {
                target,
                workload,
                mode,
                records,
                operations,
                duration,
                threads,
                key_size,
                value_size,
                distribution,
                json,
            } => {
                use prkv::bench::ycsb::{self, Distribution, Mode, TargetSpec, YcsbOptions};
                let target = match TargetSpec::parse(&target) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                };
                let mode = match mode.as_str() {
                    "raw" => Mode::Raw,
                    "raw-batch" => Mode::RawBatch,
                    "txn" => Mode::Txn,
                    other => {
                        eprintln!("error: --mode {other:?}: raw, raw-batch or txn");
                        return ExitCode::from(2);
                    }
                };
                let distribution = match distribution.as_deref() {
                    None => None,
                    Some("uniform") => Some(Distribution::Uniform),
                    Some("zipfian") => Some(Distribution::Zipfian),
                    Some("latest") => Some(Distribution::Latest),
                    Some(other) => {
                        eprintln!("error: --distribution {other:?}: uniform, zipfian or latest");
                        return ExitCode::from(2);
                    }
                };
                if key_size == 0 || key_size > 4096 || value_size > 1 << 20 {
                    eprintln!("error: --key-size must be in 1..=4096, --value-size at most 1MiB");
                    return ExitCode::from(2);
                }
                let opts = YcsbOptions {
                    target,
                    workload,
                    mode,
                    records,
                    operations,
                    duration: duration.0,
                    threads,
                    key_size,
                    value_size,
                    distribution,
                };
                report(ycsb::run(&opts), ycsb::render_table, json.as_deref())
            }
            BenchCommand::AddReplica {
                engine,
                size,
                value_size,
                base_port,
                data_dir,
                json,
            } => {
                if value_size == 0 || size.0 == 0 || value_size > 1 << 20 {
                    eprintln!("error: --size must be > 0 and --value-size in 1..=1MiB");
                    return ExitCode::from(2);
                }
                let opts = prkv::bench::add_replica::AddReplicaBenchOptions {
                    engines: engine,
                    size: size.0,
                    value_size,
                    base_port,
                    data_dir,
                };
                report(
                    prkv::bench::add_replica::run(&opts),
                    |r| prkv::bench::add_replica::render_table(r),
                    json.as_deref(),
                )
            }
            BenchCommand::Split {
                engine,
                size,
                value_size,
                data_dir,
                json,
            } => {
                if value_size == 0 || size.iter().any(|s| s.0 == 0) {
                    eprintln!("error: --size values and --value-size must be > 0");
                    return ExitCode::from(2);
                }
                let opts = prkv::bench::split::SplitBenchOptions {
                    engines: engine,
                    sizes: size.iter().map(|s| s.0).collect(),
                    value_size,
                    data_dir,
                };
                report(
                    prkv::bench::split::run(&opts),
                    |r| prkv::bench::split::render_table(r),
                    json.as_deref(),
                )
            }
            BenchCommand::Raftstore {
                engine,
                regions,
                concurrency,
                secs,
                value_size,
                data_dir,
                json,
            } => {
                if regions == 0 || concurrency.contains(&0) || secs == 0 {
                    eprintln!("error: --regions, --concurrency values and --secs must be > 0");
                    return ExitCode::from(2);
                }
                let opts = RaftstoreBenchOptions {
                    engine,
                    regions,
                    concurrency,
                    secs,
                    value_size,
                    data_dir: data_dir
                        .unwrap_or_else(|| PathBuf::from("./prkv-data/bench-raftstore")),
                };
                report(
                    raftstore_bench::run(&opts),
                    |r| raftstore_bench::render_table(r),
                    json.as_deref(),
                )
            }
            BenchCommand::Regions {
                pd,
                layout,
                count,
                keys_per_region,
                value_size,
                concurrency,
            } => {
                if count == 0 || count > 100_000_000 || value_size > 1 << 20 || concurrency == 0 {
                    eprintln!(
                        "error: --count must be in 1..=100000000, --value-size at most 1MiB, \
                         --concurrency > 0"
                    );
                    return ExitCode::from(2);
                }
                let opts = prkv::bench::regions::RegionsBenchOptions {
                    pd,
                    layout,
                    count,
                    keys_per_region,
                    value_size,
                    concurrency,
                };
                match prkv::bench::regions::run(&opts) {
                    Ok((split, fill)) => {
                        println!("{count} Regions: splits took {split:.1} s, filling {fill:.1} s");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        },
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    // Two workers: gRPC handlers only hand work to the store loop and wait.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("prkv-grpc")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

fn run_pd(opts: prkv::pd::PdOptions) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(prkv::pd::serve(opts, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_store(config: Option<PathBuf>) -> ExitCode {
    let cfg = match config {
        None => prkv::config::Config::default(),
        Some(p) => match prkv::config::Config::from_file(&p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(prkv::server::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_playground(opts: prkv::playground::PlaygroundOptions) -> ExitCode {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        rt.block_on(shutdown_signal());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    match prkv::playground::run(&opts, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A bench's outcome: its table on stdout and its JSON in `json` (if asked), or its error.
fn report<T: serde::Serialize, E: std::fmt::Display>(
    res: Result<T, E>,
    render: impl FnOnce(&T) -> String,
    json: Option<&std::path::Path>,
) -> ExitCode {
    match res {
        Ok(results) => {
            println!("{}", render(&results));
            write_json(json, &results)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_json<T: serde::Serialize>(path: Option<&std::path::Path>, results: &T) -> ExitCode {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(results).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
