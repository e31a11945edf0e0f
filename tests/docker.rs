//! Docker tests (written below).
