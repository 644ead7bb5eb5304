//! Which VM a shim's tasks run in: decided from the agent's answer to `GET /v1/agent` and the
//! task's annotations, before anything is launched. Pure: the task service carries it out.

use gantry_api::AgentInfo;
use sha2::{Digest as _, Sha256};

/// Where a shim's tasks run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A VM this shim launches from the agent's `[vm_template]` and removes with its last task.
    Launch {
        /// Its name.
        vm: String,
    },
    /// A VM the agent serves already; the shim leaves it running.
    Existing {
        /// Its name.
        vm: String,
    },
}

impl Placement {
    /// The VM's name.
    pub fn vm(&self) -> &str {
        match self {
            Placement::Launch { vm } | Placement::Existing { vm } => vm,
        }
    }

    /// Whether the shim launched the VM (and so removes it).
    pub fn launched(&self) -> bool {
        matches!(self, Placement::Launch { .. })
    }
}

/// Errors placing a task.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The annotation names a VM the agent does not serve.
    #[error("no VM named {vm:?} on the card (io.gantry.vm); the agent serves {served:?}")]
    NoSuchVm {
        /// The name asked for.
        vm: String,
        /// What the agent serves.
        served: Vec<String>,
    },
    /// Nothing says which VM, and the agent cannot launch one.
    #[error(
        "the agent has no [vm_template] to launch a VM for this task and serves {0} VMs: name \
         one with the annotation io.gantry.vm=NAME"
    )]
    Ambiguous(usize),
}

/// The VM for the tasks of `grouping` (a pod's sandbox id, or a lone task's id) in containerd
/// namespace `namespace`. A VM the task names wins; else a VM is launched when the agent can;
/// else the agent's only VM.
pub fn place(
    info: &AgentInfo,
    requested: Option<&str>,
    namespace: &str,
    grouping: &str,
) -> Result<Placement, PlacementError> {
    if let Some(vm) = requested {
        if !info.vms.iter().any(|served| served == vm) {
            return Err(PlacementError::NoSuchVm {
                vm: vm.to_owned(),
                served: info.vms.clone(),
            });
        }
        return Ok(Placement::Existing { vm: vm.to_owned() });
    }
    if info.vm_template {
        return Ok(Placement::Launch {
            vm: launched_vm_name(namespace, grouping),
        });
    }
    match info.vms.as_slice() {
        [only] => Ok(Placement::Existing { vm: only.clone() }),
        vms => Err(PlacementError::Ambiguous(vms.len())),
    }
}

/// The name of the VM launched for `grouping`: the same for every task of a pod (and for the
/// shim's `delete`, which only knows the bundle), distinct across namespaces, and a valid agent
/// VM name whatever characters containerd's ids hold.
pub fn launched_vm_name(namespace: &str, grouping: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}\0{grouping}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("ctrd-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vm_template: bool, vms: &[&str]) -> AgentInfo {
        AgentInfo {
            version: "0.1.0".into(),
            vm_template,
            vms: vms.iter().map(|vm| vm.to_string()).collect(),
        }
    }

    #[test]
    fn a_named_vm_wins_and_must_exist() {
        let placed = place(&info(true, &["vm0", "vm1"]), Some("vm1"), "default", "t").unwrap();
        assert_eq!(placed, Placement::Existing { vm: "vm1".into() });
        assert!(!placed.launched());
        let error = place(&info(true, &["vm0"]), Some("nope"), "default", "t").unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
    }

    #[test]
    fn with_a_template_each_grouping_gets_its_own_vm() {
        let card = info(true, &["vm0"]);
        let a = place(&card, None, "default", "pod-a").unwrap();
        let b = place(&card, None, "default", "pod-b").unwrap();
        let a_elsewhere = place(&card, None, "k8s.io", "pod-a").unwrap();
        assert!(a.launched());
        assert_ne!(a.vm(), b.vm());
        assert_ne!(a.vm(), a_elsewhere.vm());
        assert_eq!(a, place(&card, None, "default", "pod-a").unwrap());
        gantry_proto::validate_id("VM name", a.vm()).unwrap();
        // Even ids with characters a VM name may not have.
        gantry_proto::validate_id("VM name", &launched_vm_name("ns/x", "../..")).unwrap();
    }

    #[test]
    fn without_a_template_the_only_vm_or_an_error() {
        let placed = place(&info(false, &["vm0"]), None, "default", "t").unwrap();
        assert_eq!(placed, Placement::Existing { vm: "vm0".into() });
        for vms in [&[][..], &["vm0", "vm1"][..]] {
            let error = place(&info(false, vms), None, "default", "t").unwrap_err();
            assert!(error.to_string().contains("io.gantry.vm"), "{error}");
        }
    }
}
