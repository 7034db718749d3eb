//! Records the commit the agent is built from (`node_vm_agent_build_info`, `--version`):
//! NVA_COMMIT when set (a package built outside git), else git's HEAD, else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NVA_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
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
