//! prkv's protocol types, generated from the `.proto` files beside this crate.
//!
//! They live in their own crate (as in raft-rs's `raft-proto`) so that the main crate never
//! waits on code generation and every layer shares one definition of the wire and disk formats.

#![allow(clippy::all)]

pub mod metapb {
    include!(concat!(env!("OUT_DIR"), "/metapb.rs"));
}

pub mod serverpb {
    include!(concat!(env!("OUT_DIR"), "/serverpb.rs"));
}
