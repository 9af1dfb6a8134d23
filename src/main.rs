//! The `prkv` binary: one executable, one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use prkv::bench::engine::{self as engine_bench, EngineBenchOptions};
use prkv::bench::raftstore::{self as raftstore_bench, RaftstoreBenchOptions};
use prkv::config::{EngineKind, ReadableSize};

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
    /// Benchmarks (results belong in BENCHMARKS.md, with the command).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PRKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
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
                match engine_bench::run(&opts) {
                    Ok(results) => {
                        println!("{}", engine_bench::render_table(&results));
                        write_json(json.as_deref(), &results)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
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
                match raftstore_bench::run(&opts) {
                    Ok(results) => {
                        println!("{}", raftstore_bench::render_table(&results));
                        write_json(json.as_deref(), &results)
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
