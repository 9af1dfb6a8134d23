//! Generates Rust types from `proto/*.proto` with `prost-build`.
//!
//! `protoc` comes from Debian's `protobuf-compiler` (installed by `.ci/run`); set `PROTOC` to use
//! another one.

fn main() {
    let protos = ["proto/metapb.proto", "proto/serverpb.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = prost_build::Config::new();
    if let Err(e) = config.compile_protos(&protos, &["proto"]) {
        panic!("compiling {protos:?} failed (is protoc installed? `apt-get install protobuf-compiler`): {e}");
    }
}
