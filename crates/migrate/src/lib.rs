//! The live-migration engine.
//!
//! Live migration copies a running container's memory to the destination
//! while the container keeps running, then repeats the copy for the pages
//! written in the meantime until the remainder is small enough to stop the
//! container, send the rest and restore it on the other side.
//!
//! This crate is built in layers:
//!
//! - [`dirty`]: dirty-page tracking, i.e. which pages of a process were
//!   written since the previous round. Three backends with one interface
//!   ([`dirty::DirtyTracker`]): soft-dirty bits, userfaultfd write
//!   protection read back with `PAGEMAP_SCAN`, and page hashing as a last
//!   resort; [`dirty::open_best`] picks the best one the kernel offers.

pub mod dirty;
