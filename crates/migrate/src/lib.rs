//! The live-migration engine.
