//! `POST /vms`: validate, claim the name, plan (`plan.rs`: SQLite and the request decide
//! everything), choose the address (`pinning.rs`: from what the agent knows) — all
//! before the answer of `wait=false`, none of it waiting for libvirt once the agent has
//! seen the network. Then, with the rest of the work: the host's checks and the address's
//! DHCP host entry, the build in libvirt (`provision.rs`), the row (persist); a failure
//! takes back what the create made.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::claims::Claim;
use super::plan::Plan;
use super::{Created, Pending, Vms};
use crate::vm::driver::HostEntry;
use crate::vm::spec::VmSpec;
use crate::vm::{Operation, Unavailable, VmError};

impl Vms {
    /// `POST /vms`: the VM is defined and started when this answers 200. A create that
    /// outlives `LIBVIRT_TIMEOUT` answers 504 and goes on; its row appears when it ends.
    pub async fn create(self: &Arc<Self>, req: VmSpec, by: &str) -> Result<Created, VmError> {
        let name = req.name.clone();
        let (claim, _ip, work) = self.begin_create(req, by).await?;
        let operation = Operation::Create {
            name: name.clone(),
            wait: true,
        };
        let result = self
            .to_the_end(claim, operation, self.driver.timeout(), work)
            .await;
        if let Err(e) = &result
            && !matches!(e, VmError::Stalled(_))
        {
            // The client hears of the failure: nothing is left to show.
            self.set_pending(&name, None);
        }
        result
    }

    /// `POST /vms?wait=false`: checked, planned and given its address now (a bad request
    /// is refused as usual); built in the background, shown as `creating`, then running,
    /// or `failed` with its error (and an audit row) if it cannot be made. Returns the
    /// VM's address, which libvirt did not have to answer for.
    pub async fn create_in_background(
        self: &Arc<Self>,
        req: VmSpec,
        by: &str,
    ) -> Result<IpAddr, VmError> {
        let name = req.name.clone();
        let (claim, ip, work) = self.begin_create(req, by).await?;
        let operation = Operation::Create { name, wait: false };
        self.in_background(claim, operation, work);
        Ok(IpAddr::V4(ip))
    }

    /// Validates, claims the name, plans and chooses the address; returns the claim, the
    /// address and the rest of the create, which marks the name `creating` until it ends.
    async fn begin_create(
        self: &Arc<Self>,
        req: VmSpec,
        by: &str,
    ) -> Result<
        (
            Claim,
            Ipv4Addr,
            impl std::future::Future<Output = Result<Created, VmError>> + Send + 'static,
        ),
        VmError,
    > {
        let name = req.validate(&self.cfg.limits)?;
        let claim = self.claim(&name).await?;
        // What an earlier create of this name left when libvirt cut it off: removed
        // first; while libvirt may still carry out what that one sent, this one would
        // race it.
        self.clean_abandoned(&name).await?;
        if self.abandoned.contains(&name) {
            return Err(Unavailable::CutOff {
                name: name.to_string(),
                settle: super::attempts::SETTLE,
            }
            .into());
        }
        let mut plan = self.plan(&name, &req, by).await?;
        let ip = self
            .choose_address(&plan.row, plan.requested_ip, plan.preferred_ip)
            .await?;
        plan.row.pinned_ip = Some(IpAddr::V4(ip));
        self.set_pending(&name, Some(Pending::Creating));
        let this = Arc::clone(self);
        let work = async move {
            let result = this.build_and_persist(plan, ip).await;
            this.addresses.release(&name);
            match &result {
                Ok(_) => this.set_pending(&name, None),
                Err(e) => this.set_pending(&name, Some(Pending::Failed(e.to_string()))),
            }
            this.observe_one(&name).await;
            result
        };
        Ok((claim, ip, work))
    }

    /// The create's work after the answer's part: the host's checks and the host entry,
    /// the build, the row. Nothing of a failed create stays behind, its entry neither.
    async fn build_and_persist(&self, plan: Plan, ip: Ipv4Addr) -> Result<Created, VmError> {
        let needs = super::provision::Needs::of(&plan.row);
        let pin = super::pinning::Pin {
            network: plan.row.network_name.clone(),
            entry: HostEntry {
                mac: plan.row.mac.clone(),
                name: plan.row.name.clone(),
                ip,
            },
            known_macs: plan.known_macs.clone(),
        };
        let previous = self.pin(pin, move |hv, call| needs.check(hv, call)).await?;
        let (row, moved) = (plan.row.clone(), plan.moved_from.clone());
        let result = match self.provision(&plan).await {
            Ok(recreated) => self.persist(plan, recreated, IpAddr::V4(ip)).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                if let Some((old, old_ip)) = &moved {
                    self.unpin_from(old, &row, *old_ip).await;
                }
            }
            Err(_) => self.unpin(&row, ip, previous).await,
        }
        result
    }
}
