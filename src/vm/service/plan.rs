//! A create's plan: the request and the database decide everything (image, keys, seed,
//! MAC, the address to prefer) before the hypervisor is asked for anything. One read of
//! SQLite; no libvirt.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::Vms;
use crate::cloudinit as seed;
use crate::model::{DesiredState, ImageState, MacAddr, VmName};
use crate::store::StoreError;
use crate::store::vms::{self, ImageRow, SeedInputs, VmRow};
use crate::vm::driver::volumes;
use crate::vm::spec::VmSpec;
use crate::vm::{BootFile, Conflict, Invalid, NotFound, Unavailable, VmError};

/// Everything a create decided before it asks the hypervisor for anything.
pub(super) struct Plan {
    pub row: VmRow,
    pub image: Option<ImageRow>,
    pub seed: Vec<u8>,
    pub inputs: SeedInputs,
    pub recreate: bool,
    pub had_row: bool,
    /// The request's `ip`: pinned exactly, or refused.
    pub requested_ip: Option<Ipv4Addr>,
    /// A recreated VM's address, kept when it is free.
    pub preferred_ip: Option<Ipv4Addr>,
    /// A recreated VM's network and address when the new network differs: its entry
    /// there goes once the create succeeded.
    pub moved_from: Option<(String, Ipv4Addr)>,
    /// The MAC of every VM of the agent (an entry of the VM's name with another MAC is
    /// a cut-off create's leftover only if no VM has that MAC).
    pub known_macs: BTreeSet<MacAddr>,
}

/// What SQLite says for a create, read at once.
struct Known {
    existing: Option<VmRow>,
    image: Option<ImageRow>,
    fresh_mac: MacAddr,
    macs: Vec<MacAddr>,
}

/// A MAC in QEMU's range.
fn random_mac() -> MacAddr {
    MacAddr::qemu(rand::random())
}

impl Vms {
    /// Decides the VM from the request and the database; touches nothing.
    pub(super) async fn plan(
        &self,
        name: &VmName,
        req: &VmSpec,
        by: &str,
    ) -> Result<Plan, VmError> {
        let image_name = match (&req.image, &req.kernel) {
            (Some(i), _) => Some(i.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(self.cfg.default_image.clone()),
        };
        let mut known = self.known(name, image_name.clone()).await?;
        if known.existing.is_some() && !req.recreate {
            return Err(Conflict::Exists(name.to_string()).into());
        }
        if self.cfg.local {
            check_boot_files(req).await?;
        }
        let image = match &image_name {
            Some(n) => Some(self.ready_image(n, known.image.take()).await?),
            None => None,
        };
        let keys = req
            .ssh_authorized_keys
            .clone()
            .unwrap_or_else(|| self.cfg.default_keys.clone());
        let row = self.row_of(name, req, &known, image_name, &keys, by);
        let seed = seed::build(&seed::SeedSpec {
            instance_id: &row.instance_id,
            hostname: &row.hostname,
            ssh_authorized_keys: &keys,
            user_data: req.user_data.as_deref(),
            network_config: req.network_config.as_deref(),
        })?;
        // ... and its address, when free.
        let (preferred_ip, moved_from) =
            super::pinning::kept(known.existing.as_ref(), &row.network_name);
        Ok(Plan {
            row,
            image,
            seed,
            inputs: SeedInputs {
                ssh_authorized_keys: keys,
                user_data: req.user_data.clone(),
                network_config: req.network_config.clone(),
            },
            recreate: req.recreate,
            had_row: known.existing.is_some(),
            requested_ip: req.ip,
            preferred_ip,
            moved_from,
            known_macs: known.macs.into_iter().collect(),
        })
    }

    /// The VM's row as the create will write it (without its address yet).
    fn row_of(
        &self,
        name: &VmName,
        req: &VmSpec,
        known: &Known,
        image: Option<String>,
        keys: &[String],
        by: &str,
    ) -> VmRow {
        let uuid = uuid::Uuid::new_v4().to_string();
        // A recreated VM keeps its MAC, so DHCP gives it its address again and the
        // port maps that point at it keep working; everything else is new.
        let mac = match known.existing.as_ref().filter(|_| req.recreate) {
            Some(r) => r.mac.clone(),
            None => known.fresh_mac.clone(),
        };
        VmRow {
            name: name.clone(),
            instance_id: format!("iid-{uuid}"),
            uuid,
            hostname: req.effective_hostname(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            disk_size_gb: req.disk_size_gb,
            network_name: req
                .network_name
                .clone()
                .unwrap_or_else(|| self.cfg.default_network.clone()),
            os_arch: req
                .os_arch
                .clone()
                .unwrap_or_else(|| self.cfg.default_arch.clone()),
            domain_type: self.cfg.domain_type.clone(),
            image,
            mac,
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            cmdline: req.cmdline.clone(),
            ssh_keys: keys.len() as u32,
            user_data: req.user_data.is_some(),
            disk_volume: volumes::disk(name),
            seed_volume: volumes::seed(name),
            desired_state: DesiredState::Running,
            last_state: None,
            last_ip: None,
            last_ip_at: None,
            pinned_ip: None,
            created_at: String::new(),
            updated_at: String::new(),
            created_by: by.to_string(),
        }
    }

    /// The VM's row, its image's row, a MAC no VM has and every VM's MAC, in one read.
    async fn known(&self, name: &VmName, image: Option<String>) -> Result<Known, VmError> {
        let name = name.to_string();
        let known = self
            .store
            .run(move |s| {
                s.with(|c| {
                    let mut fresh_mac = random_mac();
                    for _ in 0..16 {
                        if !vms::mac_in_use(c, &fresh_mac)? {
                            break;
                        }
                        fresh_mac = random_mac();
                    }
                    Ok::<_, StoreError>(Known {
                        existing: vms::get(c, &name)?,
                        image: image.map(|i| vms::image(c, &i)).transpose()?.flatten(),
                        fresh_mac,
                        macs: vms::macs(c)?,
                    })
                })
            })
            .await?;
        Ok(known)
    }

    /// The image row of `name` when it is ready, fetching the default image on first use.
    async fn ready_image(&self, name: &str, row: Option<ImageRow>) -> Result<ImageRow, VmError> {
        match row {
            Some(r) if r.state == ImageState::Ready => Ok(r),
            Some(r) if r.state == ImageState::Downloading => {
                Err(Conflict::ImageDownloading(name.to_owned()).into())
            }
            _ if name == self.cfg.default_image && !self.cfg.default_image_url.is_empty() => {
                let Some(images) = &self.images else {
                    return Err(NotFound::Image(name.to_owned()).into());
                };
                let url = &self.cfg.default_image_url;
                images
                    .download(name, url, None, "agent (first use)")
                    .await?;
                Err(Unavailable::DefaultImageFetching {
                    name: name.to_owned(),
                    url: url.clone(),
                }
                .into())
            }
            _ => Err(NotFound::Image(name.to_owned()).into()),
        }
    }
}

/// The request's `kernel` and `initrd` are regular files this host can read.
///
/// With LIBVIRT_URI on this host, libvirtd reads the same files, so a missing or
/// unreadable one is the request's fault (400), found before anything is defined. Only
/// then: a remote libvirtd's files cannot be seen from here, and its refusal stays
/// libvirt's own error (which names the file).
async fn check_boot_files(req: &VmSpec) -> Result<(), VmError> {
    let files = [("kernel", &req.kernel), ("initrd", &req.initrd)];
    for (field, path) in files {
        let Some(path) = path else { continue };
        let refused = |problem: BootFile| Invalid::BootFile {
            field,
            path: path.clone(),
            problem,
        };
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| refused(e.into()))?;
        if !meta.is_file() {
            return Err(refused(BootFile::NotAFile).into());
        }
        tokio::fs::File::open(path)
            .await
            .map_err(|e| refused(e.into()))?;
    }
    Ok(())
}
