//! Records the commit the agent is built from (`node_vm_agent_build_info`, `--version`):
//! NVA_COMMIT when set (a package built outside git), else git's HEAD, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NVA_COMMIT");
    // Where git keeps HEAD: `.git/` in a clone, another directory in a worktree (whose
    // `.git` is a file). A path that does not exist would run this script, and so
    // rebuild the crate, on every build.
    for path in ["HEAD", "refs/heads"] {
        if let Some(p) = git_path(path) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let commit = std::env::var("NVA_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NVA_COMMIT={commit}");
}

/// `git rev-parse --git-path PATH`, when git answers and the path exists.
fn git_path(path: &str) -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--git-path", path])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && std::path::Path::new(&p).exists()).then_some(p)
}
