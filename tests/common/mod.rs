//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use prkv::config::{Config, EngineKind, ReadableSize};

/// A small-footprint config for tests.
pub fn test_config(dir: &Path, kind: EngineKind) -> Config {
    let mut c = Config::default();
    c.storage.data_dir = dir.to_path_buf();
    c.storage.engine = kind;
    c.rocksdb.write_buffer_limit = ReadableSize::mib(64);
    c.rocksdb.write_buffer_size = ReadableSize::mib(4);
    c.rocksdb.block_cache_size = ReadableSize::mib(16);
    c.rocksdb.max_background_jobs = 2;
    c.raft_engine.target_file_size = ReadableSize::mib(1);
    c.raft_engine.purge_threshold = ReadableSize::mib(4);
    c
}

/// Starts this test binary again, running only `test_name` (an `#[ignore]`d test that acts as a
/// child process), with `envs` set. Its stdout is piped.
pub fn spawn_child(test_name: &str, envs: &[(&str, String)], shell_prefix: Option<&str>) -> Child {
    let exe = std::env::current_exe().expect("current test executable");
    let mut cmd = match shell_prefix {
        // e.g. "ulimit -n 4096": run the child under a shell that first applies the prefix.
        Some(prefix) => {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(format!("{prefix} && exec \"$0\" \"$@\""))
                .arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args([
        test_name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning child test process")
}

/// Reads the child's stdout until a line containing `prefix`; returns the line from `prefix` on.
/// (libtest prints "test NAME ... " without a newline before the test's own output.)
pub fn wait_for_line(reader: &mut impl BufRead, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("reading child stdout");
        assert!(n > 0, "child exited before printing {prefix:?}");
        if let Some(at) = line.find(prefix) {
            return line[at..].trim_end().to_string();
        }
    }
}

pub fn child_stdout(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    BufReader::new(child.stdout.take().expect("piped stdout"))
}
pub mod bank;
pub mod cluster;
pub mod procs;
pub mod workload;
