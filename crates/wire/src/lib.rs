//! The migration wire protocol.
