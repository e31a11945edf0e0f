//! migrun's runtime library: OCI containers on this host.
//!
//! This crate holds everything the `migrun` command line does on one host:
//! creating, starting, inspecting, signalling, pausing, updating and deleting
//! containers under a state root, following runc's behaviour and formats.
//! It builds on youki's `libcontainer` for the container mechanics and adds
//! what runc users expect on top (runc's state JSON, listing, `ps`, stats
//! events, resource updates, the self-protecting sealed executable).

pub mod checkpoint;
pub mod error;
pub mod events;
pub mod features;
pub mod foreground;
pub mod id;
pub mod lifecycle;
pub mod netdev;
pub mod processes;
pub mod resources;
pub mod sealed_exe;
pub mod signal;
pub mod spec;
pub mod state;
pub mod store;
pub mod workload;

pub use error::{Result, RuntimeError};
pub use store::StateRoot;
