//! Container id validation, as runc does it.

use crate::error::{Result, RuntimeError};

/// Checks a container id against runc's rules: non-empty, at most 1024
/// bytes, only `[A-Za-z0-9_+\-.]`, and not `.` or `..`.
pub fn validate(id: &str) -> Result<()> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if id.is_empty() || id.len() > 1024 || !ok_chars || id == "." || id == ".." {
        return Err(RuntimeError::InvalidId(id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_runc_ids() {
        for id in ["a", "abc-1.2_3+x", "0123456789abcdef"] {
            assert!(validate(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_bad_ids() {
        for id in ["", ".", "..", "a/b", "a b", "../x", "é"] {
            assert!(validate(id).is_err(), "{id}");
        }
    }
}
