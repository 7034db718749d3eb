//! The cloud-init NoCloud seed, built in memory (a small FAT12 image labelled CIDATA).
//!
//! The image holds `meta-data` (JSON, which is valid YAML), `user-data` and, when given,
//! `network-config`. Without `user_data` in the request, `user-data` is a generated
//! `#cloud-config` that only sets the hostname and the SSH keys: never a password, never
//! a built-in key. With it, `user-data` is the request's, byte for byte, and the agent's
//! part travels beside it where cloud-init applies it whatever that user-data says: the
//! keys as the datasource's own `public-keys` in `meta-data`, the hostname as
//! `local-hostname` there, and a `vendor-data` that keeps cloud-init from preserving the
//! image's hostname (docs/decisions/17-user-data-keys-in-meta-data.md says why not keys in vendor-data).
//! Every generated value goes through serde_json, so no hostname, key or instance-id can
//! break out of its string.

use sha2::{Digest, Sha256};

mod fat;

pub use fat::SeedError;

/// What goes into one VM's seed.
#[derive(Debug, Clone)]
pub struct SeedSpec<'a> {
    /// meta-data `instance-id`: unique per VM (and per recreate).
    pub instance_id: &'a str,
    /// meta-data `local-hostname`, and the hostname in generated user-data.
    pub hostname: &'a str,
    /// Public keys for the image's default user: in the generated user-data, or in
    /// meta-data's `public-keys` when the user-data is the request's.
    pub ssh_authorized_keys: &'a [String],
    /// Raw user-data from the request, used verbatim instead of the generated one.
    pub user_data: Option<&'a str>,
    /// Raw network-config (NoCloud v1/v2 YAML), written verbatim when given.
    pub network_config: Option<&'a str>,
}

/// The seed image's bytes, ready to be uploaded as a raw volume.
pub fn build(spec: &SeedSpec<'_>) -> Result<Vec<u8>, SeedError> {
    let meta = meta_data(spec);
    let user = match spec.user_data {
        Some(raw) => raw.as_bytes().to_vec(),
        None => generated_user_data(spec).into_bytes(),
    };
    let mut files: Vec<(&str, &[u8])> = vec![("meta-data", &meta), ("user-data", &user)];
    if spec.user_data.is_some() {
        files.push(("vendor-data", VENDOR_DATA.as_bytes()));
    }
    if let Some(net) = spec.network_config {
        files.push(("network-config", net.as_bytes()));
    }
    fat::image(&files, volume_id(spec.instance_id))
}

/// `meta-data`: `{"instance-id":"…","local-hostname":"…"}` plus a newline; with the
/// request's user-data and at least one key, also `"public-keys":["…",…]`.
///
/// `public-keys` is the datasource's own key list: cloud-init's `ssh` module adds it to
/// the keys of the merged cloud-config (`ssh_authorized_keys`) for the default user,
/// whatever the user-data says about keys, unless that user-data sets
/// `allow_public_ssh_keys: false`. Keys in vendor-data would not do: a user-data with its
/// own `ssh_authorized_keys` replaces them (docs/decisions/17-user-data-keys-in-meta-data.md).
pub fn meta_data(spec: &SeedSpec<'_>) -> Vec<u8> {
    let mut value = serde_json::json!({
        "instance-id": spec.instance_id,
        "local-hostname": spec.hostname,
    });
    if spec.user_data.is_some() && !spec.ssh_authorized_keys.is_empty() {
        value["public-keys"] = spec.ssh_authorized_keys.iter().map(|k| k.trim()).collect();
    }
    let mut out = yaml_safe_json(&value).into_bytes();
    out.push(b'\n');
    out
}

/// `vendor-data`, written only beside the request's user-data: `#cloud-config` with
/// `preserve_hostname: false`, so that the hostname of meta-data is set even on an image
/// whose own configuration preserves its hostname (as the generated user-data does).
/// cloud-init merges the user-data's cloud-config over it: a user-data that sets
/// `preserve_hostname`, `hostname` or `fqdn` itself wins.
pub const VENDOR_DATA: &str = "#cloud-config\n{\"preserve_hostname\":false}\n";

/// The generated `user-data`: `#cloud-config`, then one JSON object (valid YAML).
pub fn generated_user_data(spec: &SeedSpec<'_>) -> String {
    let mut config = serde_json::Map::new();
    config.insert("hostname".into(), spec.hostname.into());
    config.insert("preserve_hostname".into(), false.into());
    config.insert("ssh_pwauth".into(), false.into());
    config.insert("disable_root".into(), true.into());
    if !spec.ssh_authorized_keys.is_empty() {
        config.insert(
            "ssh_authorized_keys".into(),
            spec.ssh_authorized_keys.iter().map(|k| k.trim()).collect(),
        );
    }
    format!(
        "#cloud-config\n{}\n",
        yaml_safe_json(&serde_json::Value::Object(config))
    )
}

/// serde_json's compact output with the characters escaped that JSON allows raw but a
/// YAML 1.1 reader (PyYAML, which cloud-init uses) rejects as non-printable: DEL, the C1
/// controls other than NEL, and U+FFFE/U+FFFF. Non-ASCII text appears only inside JSON
/// strings, where `\uXXXX` means the same to both readers.
fn yaml_safe_json(value: &serde_json::Value) -> String {
    let raw = value.to_string();
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let n = c as u32;
        if n == 0x7f || ((0x80..=0x9f).contains(&n) && n != 0x85) || n == 0xfffe || n == 0xffff {
            out.push_str(&format!("\\u{n:04x}"));
        } else {
            out.push(c);
        }
    }
    out
}

/// A volume serial derived from the instance-id: stable for one VM, different between
/// VMs, and the same bytes for the same spec (reproducible images).
fn volume_id(instance_id: &str) -> u32 {
    let digest = Sha256::digest(instance_id.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Read};

    use super::fat::{MAX_IMAGE_BYTES, MIN_IMAGE_BYTES};
    use super::*;
    use crate::model::ssh_key::tests::{ECDSA, ED25519, RSA};

    // Real public keys, made with ssh-keygen for these tests (private halves discarded).

    fn spec<'a>(keys: &'a [String]) -> SeedSpec<'a> {
        SeedSpec {
            instance_id: "i-0123",
            hostname: "web-1",
            ssh_authorized_keys: keys,
            user_data: None,
            network_config: None,
        }
    }

    /// Every file in the image's root directory (name → bytes), and the root-dir label.
    fn read_back(image: &[u8]) -> (String, String, Vec<(String, Vec<u8>)>) {
        let fs = fatfs::FileSystem::new(Cursor::new(image.to_vec()), fatfs::FsOptions::new())
            .expect("image mounts");
        let bpb_label = fs.volume_label();
        let dir_label = fs
            .read_volume_label_from_root_dir()
            .expect("read root dir")
            .expect("a label entry in the root dir");
        let mut files = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.expect("dir entry");
            let mut data = Vec::new();
            entry.to_file().read_to_end(&mut data).expect("read file");
            files.push((entry.file_name(), data));
        }
        (bpb_label, dir_label, files)
    }

    fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
            .unwrap_or_else(|| panic!("{name} missing; have {files:?}"))
    }

    #[test]
    fn image_is_a_cidata_fat12_volume_with_the_three_files() {
        let keys = vec![ED25519.to_string()];
        let mut s = spec(&keys);
        s.network_config = Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n");
        let image = build(&s).expect("build");
        assert_eq!(image.len() as u64, MIN_IMAGE_BYTES);
        let fs = fatfs::FileSystem::new(Cursor::new(image.clone()), fatfs::FsOptions::new())
            .expect("mount");
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        drop(fs);
        let (bpb_label, dir_label, files) = read_back(&image);
        assert_eq!(bpb_label, "CIDATA");
        assert_eq!(dir_label, "CIDATA");
        let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["meta-data", "network-config", "user-data"]);
        assert_eq!(
            file(&files, "meta-data"),
            b"{\"instance-id\":\"i-0123\",\"local-hostname\":\"web-1\"}\n"
        );
        assert_eq!(
            file(&files, "network-config"),
            s.network_config.unwrap_or_default().as_bytes()
        );
        assert_eq!(
            file(&files, "user-data"),
            generated_user_data(&s).as_bytes()
        );
    }

    #[test]
    fn no_network_config_unless_given() {
        let image = build(&spec(&[])).expect("build");
        let (_, _, files) = read_back(&image);
        let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["meta-data", "user-data"]);
    }

    #[test]
    fn same_spec_same_bytes_and_instance_id_sets_the_serial() {
        let a = build(&spec(&[])).expect("build");
        let b = build(&spec(&[])).expect("build");
        assert_eq!(a, b);
        let mut other = spec(&[]);
        other.instance_id = "i-0124";
        let c = build(&other).expect("build");
        let serial = |img: &[u8]| {
            fatfs::FileSystem::new(Cursor::new(img.to_vec()), fatfs::FsOptions::new())
                .expect("mount")
                .volume_id()
        };
        assert_ne!(serial(&a), serial(&c));
    }

    #[test]
    fn hostile_values_stay_inside_their_json_strings() {
        let hostile = [
            "a\"b",
            "line1\nline2",
            "</x><script>",
            "back\\slash",
            "tab\there",
            "{\"instance-id\": \"evil\"}",
            "nul\u{0}del\u{7f}c1\u{9f}nel\u{85}",
            "ünïcødé 🦀 \u{2028}",
            "- item\n# comment\n---\nkey: value",
        ];
        for id in hostile {
            for name in hostile {
                let s = SeedSpec {
                    instance_id: id,
                    hostname: name,
                    ssh_authorized_keys: &[],
                    user_data: None,
                    network_config: None,
                };
                let image = build(&s).expect("build");
                let (_, _, files) = read_back(&image);
                let meta = file(&files, "meta-data");
                let text = std::str::from_utf8(meta).expect("utf-8");
                // One line: no raw line break (YAML and the tiny guest read it as such).
                assert_eq!(text.matches('\n').count(), 1, "{text:?}");
                assert!(!text.contains('\u{7f}') && !text.contains('\u{9f}'));
                let v: serde_json::Value = serde_json::from_slice(meta).expect("JSON");
                let obj = v.as_object().expect("object");
                assert_eq!(obj.len(), 2, "{text}");
                assert_eq!(obj["instance-id"], id);
                assert_eq!(obj["local-hostname"], name);

                let user = file(&files, "user-data");
                let user = std::str::from_utf8(user).expect("utf-8");
                let body = user.strip_prefix("#cloud-config\n").expect("header");
                let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
                assert_eq!(v["hostname"], name);
            }
        }
    }

    #[test]
    fn generated_user_data_sets_hostname_and_keys_and_no_password() {
        let keys = vec![ED25519.to_string(), format!("  {RSA}\n")];
        let s = spec(&keys);
        let image = build(&s).expect("build");
        let (_, _, files) = read_back(&image);
        let user = std::str::from_utf8(file(&files, "user-data")).expect("utf-8");
        assert!(user.starts_with("#cloud-config\n"), "{user}");
        let lower = user.to_lowercase();
        assert!(
            !lower.contains("password") && !lower.contains("passwd"),
            "{user}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&user["#cloud-config\n".len()..]).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "hostname": "web-1",
                "preserve_hostname": false,
                "ssh_pwauth": false,
                "disable_root": true,
                "ssh_authorized_keys": [ED25519, RSA],
            })
        );
    }

    #[test]
    fn generated_user_data_without_keys_has_no_key_list() {
        let user = generated_user_data(&spec(&[]));
        let v: serde_json::Value =
            serde_json::from_str(user.trim_start_matches("#cloud-config\n")).expect("JSON");
        assert!(v.get("ssh_authorized_keys").is_none(), "{user}");
        assert!(!user.to_lowercase().contains("pass"), "{user}");
        assert_eq!(v["ssh_pwauth"], false);
    }

    #[test]
    fn verbatim_user_data_is_byte_identical() {
        let raw = "#cloud-config\r\nusers: []\n# ünïcødé, no trailing newline\tend";
        let mut s = spec(&[]);
        s.user_data = Some(raw);
        let (_, _, files) = read_back(&build(&s).expect("build"));
        assert_eq!(file(&files, "user-data"), raw.as_bytes());
        // An empty one stays empty (cloud-init then does nothing).
        s.user_data = Some("");
        let (_, _, files) = read_back(&build(&s).expect("build"));
        assert_eq!(file(&files, "user-data"), b"");
    }

    /// An operator's user-data that has its own keys, user list and hostname, as a real
    /// one would (CRLF, no final newline, non-ASCII): cloud-init must get it unchanged.
    const OPERATOR_USER_DATA: &str = "#cloud-config\r\nhostname: ops-host\r\nusers:\r\n  - default\r\n  - name: ops\r\n    ssh_authorized_keys: [\"ssh-ed25519 AAAAops\"]\r\nssh_authorized_keys:\r\n  - ssh-ed25519 AAAAoperator operator@ünïcødé\r\n# no trailing newline";

    #[test]
    fn with_request_user_data_the_keys_and_hostname_travel_in_meta_data_and_vendor_data() {
        // The node's keys (what the agent uses when the request brings none) and a
        // request's own keys: each list as the service hands it over, padded as sent.
        let node = vec![ED25519.to_string()];
        // A comment may hold anything but control characters: it stays in its string.
        let hostile = format!("{ECDSA} \"x\": \\ #, \"instance-id\": \"evil\" ü");
        let request = vec![format!(" {RSA}\n"), hostile];
        for keys in [&node, &request] {
            let mut s = spec(keys);
            s.hostname = "web-1.example.org";
            s.user_data = Some(OPERATOR_USER_DATA);
            s.network_config = Some("version: 2\n");
            let (_, _, files) = read_back(&build(&s).expect("build"));
            let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
            names.sort();
            assert_eq!(
                names,
                ["meta-data", "network-config", "user-data", "vendor-data"]
            );
            // The operator's user-data, byte for byte.
            assert_eq!(file(&files, "user-data"), OPERATOR_USER_DATA.as_bytes());
            // meta-data: one line of JSON with every key, trimmed, in order.
            let meta = std::str::from_utf8(file(&files, "meta-data")).expect("utf-8");
            assert_eq!(meta.matches('\n').count(), 1, "{meta}");
            let v: serde_json::Value = serde_json::from_str(meta).expect("JSON");
            let want: Vec<&str> = keys.iter().map(|k| k.trim()).collect();
            assert_eq!(
                v,
                serde_json::json!({
                    "instance-id": "i-0123",
                    "local-hostname": "web-1.example.org",
                    "public-keys": want,
                }),
                "{meta}"
            );
            // vendor-data: a cloud-config that only unpins the image's hostname.
            let vendor = std::str::from_utf8(file(&files, "vendor-data")).expect("utf-8");
            let body = vendor.strip_prefix("#cloud-config\n").expect("header");
            let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
            assert_eq!(
                v,
                serde_json::json!({"preserve_hostname": false}),
                "{vendor}"
            );
        }
    }

    #[test]
    fn with_request_user_data_and_no_keys_meta_data_has_no_key_list() {
        let mut s = spec(&[]);
        s.user_data = Some(OPERATOR_USER_DATA);
        let (_, _, files) = read_back(&build(&s).expect("build"));
        assert_eq!(
            file(&files, "meta-data"),
            b"{\"instance-id\":\"i-0123\",\"local-hostname\":\"web-1\"}\n"
        );
        assert_eq!(file(&files, "user-data"), OPERATOR_USER_DATA.as_bytes());
        assert_eq!(file(&files, "vendor-data"), VENDOR_DATA.as_bytes());
    }

    #[test]
    fn without_request_user_data_the_seed_is_as_before() {
        // Keys go into the generated user-data only: no vendor-data, no public-keys.
        let keys = vec![ED25519.to_string(), RSA.to_string()];
        let s = spec(&keys);
        let (_, _, files) = read_back(&build(&s).expect("build"));
        let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["meta-data", "user-data"]);
        assert_eq!(
            file(&files, "meta-data"),
            b"{\"instance-id\":\"i-0123\",\"local-hostname\":\"web-1\"}\n"
        );
        assert_eq!(
            file(&files, "user-data"),
            generated_user_data(&s).as_bytes()
        );
    }

    #[test]
    fn large_content_grows_the_image() {
        let big = "#cloud-config\n".to_string() + &"# filler line\n".repeat(20_000); // ~280 KB
        let mut s = spec(&[]);
        s.user_data = Some(&big);
        let image = build(&s).expect("build");
        assert!(image.len() as u64 > MIN_IMAGE_BYTES);
        assert!(image.len() <= 1024 * 1024, "{}", image.len());
        let (_, _, files) = read_back(&image);
        assert_eq!(file(&files, "user-data"), big.as_bytes());
    }

    #[test]
    fn content_beyond_the_limit_is_refused() {
        let huge = "x".repeat((MAX_IMAGE_BYTES / 2 + 1) as usize);
        let mut s = spec(&[]);
        s.user_data = Some(&huge);
        let err = build(&s).expect_err("too large").to_string();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn fsck_fat_finds_no_errors() {
        // dosfstools comes from scripts/install-deps.sh.
        let keys = vec![ED25519.to_string(), ECDSA.to_string()];
        let mut s = spec(&keys);
        s.network_config = Some("version: 1\n");
        let big = "#cloud-config\n".to_string() + &"# filler\n".repeat(10_000);
        let mut s_big = spec(&[]);
        s_big.user_data = Some(&big);
        // The request's user-data with keys: five files (vendor-data too).
        let mut s_all = spec(&keys);
        s_all.user_data = Some(OPERATOR_USER_DATA);
        s_all.network_config = Some("version: 1\n");
        for (what, spec, files) in [("small", s, 3), ("grown", s_big, 3), ("all", s_all, 4)] {
            let image = build(&spec).expect("build");
            let tmp = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(tmp.path(), &image).expect("write image");
            let out = std::process::Command::new("fsck.fat")
                .arg("-n")
                .arg(tmp.path())
                .output()
                .expect("fsck.fat (Debian dosfstools; scripts/install-deps.sh installs it)");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{what}: fsck.fat -n: {text}");
            // fsck.fat counts the volume label entry as a file.
            let counted = format!("{} files", files + 1);
            assert!(text.contains(&counted), "{what}: {text}");
        }
    }
}
