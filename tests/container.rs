//! The runtime image for real: scripts/container-check.sh builds the Dockerfile's runtime
//! stage with podman from the staged tree and runs it (ready at start from the baked pool
//! cache, /rank, uid 10001, the HEALTHCHECK, env-only settings, a mounted model and pool, an
//! empty cache volume, a clean stop). Where podman cannot run, the script says SKIPPED and
//! why, and this passes.
//!
//! Only the pool's first 500 candidates are staged, so that a fresh clone encodes them in
//! seconds; `make container-check` stages the whole pool. The process must be ready within 5 s
//! of its start here rather than the check's default 2 s: this tests seconds from the baked
//! cache instead of an encode, not the load of a 2-core machine that other jobs share.

use std::process::Command;

#[test]
fn the_runtime_image_builds_and_runs_under_podman() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/container-check.sh"))
        .env("POLYRANK_BIN", env!("CARGO_BIN_EXE_polyrank"))
        .env("CHECK_POOL_LINES", "500")
        .env("READY_LIMIT_S", "5")
        .output()
        .expect("running scripts/container-check.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the container check failed:\n{text}");
    assert!(text.contains("SKIPPED") || text.contains(" passed, 0 failed"), "{text}");
}
