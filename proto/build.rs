//! Generates Rust types and gRPC services from `proto/*.proto` with `tonic-build`.
//!
//! `protoc` comes from Debian's `protobuf-compiler` (installed by `.ci/run`); set `PROTOC` to use
//! another one.

fn main() {
    let protos = [
        "proto/metapb.proto",
        "proto/serverpb.proto",
        "proto/eraftpb.proto",
        "proto/errorpb.proto",
        "proto/kvrpcpb.proto",
        "proto/pdpb.proto",
        "proto/keyspacepb.proto",
        "proto/tikvpb.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut b = tonic_build::configure();
    // Small all-scalar messages the code passes by value (prost 0.12 does not derive Copy).
    for t in [
        "metapb.Peer",
        "metapb.RegionEpoch",
        "serverpb.RaftTruncatedState",
        "serverpb.RaftApplyState",
        "pdpb.Timestamp",
    ] {
        b = b.type_attribute(t, "#[derive(Copy)]");
    }
    let built = b
        .build_client(true)
        .build_server(true)
        .compile(&protos, &["proto"]);
    if let Err(e) = built {
        panic!("compiling {protos:?} failed (is protoc installed? `apt-get install protobuf-compiler`): {e}");
    }
}
