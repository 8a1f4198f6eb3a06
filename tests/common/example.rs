//! Locating (and if needed building) an example binary for the process-level tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The example `name`'s binary of the same profile as the running test, built if it is missing
/// or older than the sources.
///
/// A test runs from `target/<profile>/deps/<test>-HASH`; examples live in
/// `target/<profile>/examples/`. `cargo test` builds examples, but `cargo test --test X` does
/// not (it would run a stale one), so a stale binary is built with `cargo build --example` in
/// the same profile. It is built with `needs` plus every crate feature the test was compiled
/// with, so that under `cargo test --all-features` the library built for the tests is reused
/// rather than compiled again with other features.
pub fn example_binary(name: &str, needs: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let sources = newest_mtime(&[
        manifest_dir.join("Cargo.toml"),
        manifest_dir.join("src"),
        manifest_dir.join("examples").join(format!("{name}.rs")),
        // A multi-file example (examples/broker/).
        manifest_dir.join("examples").join(name),
    ]);
    if built.is_none() || built < sources {
        let mut features: Vec<&str> = needs.to_vec();
        for (enabled, feature) in [
            (cfg!(feature = "serde"), "serde"),
            (cfg!(feature = "web"), "web"),
            (cfg!(feature = "systemd"), "systemd"),
        ] {
            if enabled && !features.contains(&feature) {
                features.push(feature);
            }
        }
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(manifest_dir).args([
            "build",
            "--example",
            name,
            "--no-default-features",
            "--features",
            &features.join(","),
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("running cargo build --example {name}: {e}"));
        assert!(status.success(), "cargo build --example {name} failed");
    }
    assert!(binary.exists(), "no example binary at {}", binary.display());
    binary
}

/// The latest modification time of these files and of every file under these directories.
fn newest_mtime(paths: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = paths.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path).into_iter().flatten().flatten();
            stack.extend(entries.map(|e| e.path()));
        } else if let Ok(modified) = meta.modified() {
            newest = newest.max(Some(modified));
        }
    }
    newest
}
