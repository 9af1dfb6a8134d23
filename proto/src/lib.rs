//! prkv's protocol types and gRPC services, generated from the `.proto` files beside this crate.
//!
//! `metapb`, `errorpb`, `kvrpcpb`, `tikvpb`, `pdpb`, `keyspacepb` and `eraftpb` are wire
//! compatible with TiKV's protocol (same packages, field numbers and method paths) for the subset
//! prkv serves; `serverpb` holds prkv's own on-disk state and store-to-store messages. They live
//! in their own crate (as in raft-rs's `raft-proto`) so that the main crate never waits on code
//! generation and every layer shares one definition of the wire and disk formats.

#![allow(clippy::all)]

pub mod metapb {
    include!(concat!(env!("OUT_DIR"), "/metapb.rs"));
}
pub mod eraftpb {
    include!(concat!(env!("OUT_DIR"), "/eraftpb.rs"));
}
pub mod errorpb {
    include!(concat!(env!("OUT_DIR"), "/errorpb.rs"));
}
pub mod kvrpcpb {
    include!(concat!(env!("OUT_DIR"), "/kvrpcpb.rs"));
}
pub mod tikvpb {
    include!(concat!(env!("OUT_DIR"), "/tikvpb.rs"));
}
pub mod pdpb {
    include!(concat!(env!("OUT_DIR"), "/pdpb.rs"));
}
pub mod keyspacepb {
    include!(concat!(env!("OUT_DIR"), "/keyspacepb.rs"));
}
pub mod serverpb {
    include!(concat!(env!("OUT_DIR"), "/serverpb.rs"));
}
