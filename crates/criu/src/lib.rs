//! CRIU over its RPC.
