//! Link flags of the shim binary: compact DT_RELR relocations, as for the
//! `migrun` binary (see `crates/cli/build.rs` for the why and the figures).

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
