//! Key files: creation, permissions, malformed content.

#![allow(missing_docs)]

use std::os::unix::fs::PermissionsExt;

use migrun_wire::{generate_key_file, load_key, pair, Message, WireError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn generated_key_file_is_private_hex_and_loads() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("migration.key");
    let key = generate_key_file(&path)?;
    let meta = std::fs::metadata(&path)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path)?;
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    assert!(text.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
    let loaded = load_key(&path)?;
    assert_eq!(loaded.as_bytes(), key.as_bytes());
    // Two keys are different.
    let other = generate_key_file(dir.path().join("other.key"))?;
    assert_ne!(other.as_bytes(), key.as_bytes());
    Ok(())
}

#[test]
fn existing_key_file_is_not_overwritten() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("k");
    let first = generate_key_file(&path)?;
    match generate_key_file(&path) {
        Err(e @ WireError::KeyExists(_)) => {
            assert!(e.to_string().contains("already exists"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(load_key(&path)?.as_bytes(), first.as_bytes());
    Ok(())
}

#[test]
fn key_readable_by_others_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("k");
    generate_key_file(&path)?;
    for mode in [0o644, 0o640, 0o604, 0o620] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        match load_key(&path) {
            Err(e @ WireError::KeyPermissions { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("accessible by group or others"), "{msg}");
                assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
                assert!(msg.contains("chmod 600"), "{msg}");
            }
            other => panic!("mode {mode:o}: {other:?}"),
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
    load_key(&path)?;
    Ok(())
}

#[test]
fn malformed_key_files_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cases: [(&str, &[u8]); 5] = [
        ("empty", b""),
        ("short", b"abcd\n"),
        ("not hex", &[b'g'; 64]),
        ("too long", &[b'a'; 66]),
        ("binary", &[0xff; 64]),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        match load_key(&path) {
            Err(e @ WireError::KeyMalformed { .. }) => {
                assert!(e.to_string().starts_with("key file "), "{e}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // A directory is not a key file.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub)?;
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700))?;
    assert!(matches!(
        load_key(&sub),
        Err(WireError::KeyMalformed { .. })
    ));
    // A missing file names the path.
    match load_key(dir.path().join("missing")) {
        Err(e @ WireError::KeyIo { .. }) => assert!(e.to_string().contains("missing"), "{e}"),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn upper_case_and_surrounding_space_are_accepted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("k");
    std::fs::write(&path, format!("  {}\r\n", "AB".repeat(32)))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    assert_eq!(load_key(&path)?.as_bytes(), &[0xab; 32]);
    Ok(())
}

#[tokio::test]
async fn keys_from_files_connect() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("k");
    generate_key_file(&path)?;
    let key = load_key(&path)?;
    let (mut a, mut b) = pair(&key).await?;
    a.send(&Message::Ack).await?;
    assert_eq!(b.recv().await?, Message::Ack);
    Ok(())
}
