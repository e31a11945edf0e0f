//! The pre-shared key both hosts hold, and its file.
//!
//! A key file holds 32 random bytes as 64 hex digits and a newline. It must
//! not be accessible by group or others.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroize;

use crate::error::{Result, WireError};

/// Length of the pre-shared key in bytes.
pub const KEY_LEN: usize = 32;

/// The largest key file read, so a wrong path cannot make us read a huge file.
const MAX_KEY_FILE: u64 = 4096;

/// A 32-byte pre-shared key, wiped from memory when dropped.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Key> {
        let mut bytes = [0u8; KEY_LEN];
        crate::random_fill(&mut bytes)?;
        Ok(Key(bytes))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses the hex form (surrounding white space allowed).
    pub fn from_hex(text: &str) -> Result<Key, String> {
        let text = text.trim();
        if text.len() != 2 * KEY_LEN {
            return Err(format!(
                "expected {} hex digits (a {KEY_LEN}-byte key), found {} characters",
                2 * KEY_LEN,
                text.chars().count()
            ));
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]);
            let lo = hex_value(pair[1]);
            match (hi, lo, bytes.get_mut(i)) {
                (Some(hi), Some(lo), Some(b)) => *b = (hi << 4) | lo,
                _ => {
                    bytes.zeroize();
                    return Err(format!("invalid hex digit near position {}", 2 * i + 1));
                }
            }
        }
        Ok(Key(bytes))
    }

    /// The hex form, as written to key files.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * KEY_LEN);
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Writes a fresh random key to `path` (hex, mode 0600) and returns it.
///
/// Refuses to overwrite an existing file.
pub fn generate_key_file(path: impl AsRef<Path>) -> Result<Key> {
    let path = path.as_ref();
    let key = Key::generate()?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                WireError::KeyExists(path.to_path_buf())
            } else {
                WireError::KeyIo {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    let mut text = key.to_hex();
    text.push('\n');
    let written = file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all());
    text.zeroize();
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(WireError::KeyIo {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(key)
}

/// Reads the key in `path`.
///
/// Refuses a file that group or others can access, one that is not a regular
/// file, and one that does not hold exactly 64 hex digits.
pub fn load_key(path: impl AsRef<Path>) -> Result<Key> {
    let path = path.as_ref();
    let io_err = |source| WireError::KeyIo {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(WireError::KeyMalformed {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(WireError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(WireError::KeyMalformed {
            path: path.to_path_buf(),
            reason: format!("{} bytes is far too long for a key", meta.len()),
        });
    }
    let mut raw = Vec::with_capacity(2 * KEY_LEN + 1);
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    let parsed = match std::str::from_utf8(&raw) {
        Ok(text) => Key::from_hex(text),
        Err(_) => Err("not text".to_string()),
    };
    raw.zeroize();
    parsed.map_err(|reason| WireError::KeyMalformed {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() -> Result<(), String> {
        let key = Key::from_bytes([0xa5; KEY_LEN]);
        let back = Key::from_hex(&key.to_hex())?;
        assert_eq!(back.as_bytes(), key.as_bytes());
        assert!(Key::from_hex("abc").is_err());
        assert!(Key::from_hex(&"zz".repeat(KEY_LEN)).is_err());
        assert!(Key::from_hex(&format!("  {}\n", "0F".repeat(KEY_LEN))).is_ok());
        Ok(())
    }

    #[test]
    fn debug_is_redacted() {
        let key = Key::from_bytes([0x42; KEY_LEN]);
        assert!(!format!("{key:?}").contains("42"));
    }
}
