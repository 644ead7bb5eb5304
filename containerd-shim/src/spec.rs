//! What a task asks for, read from its bundle's OCI runtime spec: which image, which VM, what
//! process. Parsing only; nothing here talks to the agent.
//!
//! containerd's rootfs (the snapshot it mounted in the bundle) is ignored: the card pulls the
//! image itself and serves its layers to the VM, so the image is named by an annotation:
//! `io.kubernetes.cri.image-name` (the CRI plugin sets it) or `io.gantry.image` (`ctr run
//! --annotation io.gantry.image=REF`).

use gantry_api::RunOptions;
use oci_spec::runtime::Spec;

/// The CRI plugin's annotation saying whether a task is a pod's sandbox or one of its containers.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI plugin's annotation naming the pod (its sandbox task's id).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The CRI plugin's annotation naming a container's image.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// Gantry's annotation naming the image (for clients other than CRI, such as `ctr`).
pub const GANTRY_IMAGE: &str = "io.gantry.image";
/// Gantry's annotation naming an existing VM of the agent to run the task in.
pub const GANTRY_VM: &str = "io.gantry.vm";

/// Errors reading a task's spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A container task names no image.
    #[error(
        "task {0}: no image to run: Gantry pulls the image itself (containerd's rootfs is not \
         used); set the annotation {GANTRY_IMAGE}=REF (ctr run --annotation) or run it through \
         the CRI plugin, which sets {CRI_IMAGE_NAME}"
    )]
    NoImage(String),
    /// The spec has no process.
    #[error("task {0}: the spec has no process")]
    NoProcess(String),
    /// A value is out of range.
    #[error("task {task}: {what}")]
    Invalid {
        /// The task.
        task: String,
        /// What is wrong.
        what: String,
    },
}

/// Whether a task is a pod's sandbox (no process of its own in the guest: the pod is the VM)
/// or a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// The CRI sandbox ("pause") task.
    Sandbox,
    /// A container, run in the guest.
    Container,
}

/// What one task asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Sandbox or container.
    pub kind: TaskKind,
    /// The pod it belongs to, if CRI made it.
    pub sandbox_id: Option<String>,
    /// The VM it must run in (`io.gantry.vm`).
    pub vm: Option<String>,
    /// For a container: what the agent is asked to run (`name` and `image` filled in).
    pub run: Option<RunOptions>,
}

/// The annotations that decide where a bundle's task runs, as `start` needs them before any
/// task exists: the shim serving a pod is shared by its tasks.
pub fn grouping(spec: &Spec, task_id: &str) -> String {
    annotation(spec, CRI_SANDBOX_ID).unwrap_or_else(|| task_id.to_owned())
}

fn annotation(spec: &Spec, key: &str) -> Option<String> {
    spec.annotations()
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .filter(|value| !value.is_empty())
        .cloned()
}

/// Reads task `id`'s spec; `terminal` and `stdin` are what containerd's create request says of
/// its standard streams.
pub fn parse(spec: &Spec, id: &str, terminal: bool, stdin: bool) -> Result<TaskSpec, SpecError> {
    let kind = match annotation(spec, CRI_CONTAINER_TYPE).as_deref() {
        Some("sandbox") => TaskKind::Sandbox,
        _ => TaskKind::Container,
    };
    let sandbox_id = annotation(spec, CRI_SANDBOX_ID);
    let vm = annotation(spec, GANTRY_VM);
    if kind == TaskKind::Sandbox {
        return Ok(TaskSpec {
            kind,
            sandbox_id,
            vm,
            run: None,
        });
    }
    let image = annotation(spec, GANTRY_IMAGE)
        .or_else(|| annotation(spec, CRI_IMAGE_NAME))
        .ok_or_else(|| SpecError::NoImage(id.to_owned()))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::NoProcess(id.to_owned()))?;
    let fields = ProcessFields::of(process, terminal);
    let mut run = RunOptions {
        image,
        name: Some(id.to_owned()),
        // The spec's arguments are the whole command line (containerd and CRI have already
        // combined the image's entrypoint and command): they replace both. Without any, the
        // image's own apply.
        entrypoint: (!fields.args.is_empty()).then_some(fields.args),
        env: fields.env,
        workdir: fields.workdir,
        user: Some(fields.user),
        hostname: spec.hostname().clone().filter(|name| !name.is_empty()),
        stdin,
        tty: fields.tty,
        create_only: true,
        ..RunOptions::default()
    };
    if let Some(resources) = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.resources().as_ref())
    {
        if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit())
            && limit > 0
        {
            run.memory_bytes = Some(limit as u64);
        }
        if let Some(cpu) = resources.cpu()
            && let (Some(quota), Some(period)) = (cpu.quota(), cpu.period())
            && quota > 0
            && period > 0
        {
            run.cpus = Some(quota as f64 / period as f64);
        }
        // OCI: zero or less is no limit.
        if let Some(limit) = resources.pids().as_ref().map(|pids| pids.limit())
            && limit > 0
        {
            run.pids_limit = Some(limit as u64);
        }
    }
    Ok(TaskSpec {
        kind,
        sandbox_id,
        vm,
        run: Some(run),
    })
}

/// An exec's process, as containerd sends it (the OCI `Process` JSON).
pub fn parse_exec(
    json: &[u8],
    id: &str,
    exec_id: &str,
    terminal: bool,
    stdin: bool,
) -> Result<gantry_api::ExecRequest, SpecError> {
    let process: oci_spec::runtime::Process =
        serde_json::from_slice(json).map_err(|err| SpecError::Invalid {
            task: id.to_owned(),
            what: format!("exec {exec_id}: its process spec: {err}"),
        })?;
    let fields = ProcessFields::of(&process, terminal);
    if fields.args.is_empty() {
        return Err(SpecError::Invalid {
            task: id.to_owned(),
            what: format!("exec {exec_id}: no command"),
        });
    }
    Ok(gantry_api::ExecRequest {
        exec_id: Some(exec_id.to_owned()),
        command: fields.args,
        env: fields.env,
        workdir: fields.workdir,
        user: Some(fields.user),
        stdin,
        tty: fields.tty,
        tty_size: None,
    })
}

/// What a task's and an exec's OCI `Process` both say, as the agent's requests take it.
struct ProcessFields {
    args: Vec<String>,
    env: Vec<String>,
    /// `None` when the spec leaves it empty (the image's applies).
    workdir: Option<String>,
    /// `uid:gid`, numeric (containerd and CRI resolved names already).
    user: String,
    /// On a terminal: as the create request says, or the spec.
    tty: bool,
}

impl ProcessFields {
    fn of(process: &oci_spec::runtime::Process, terminal: bool) -> Self {
        let user = process.user();
        Self {
            args: process.args().clone().unwrap_or_default(),
            env: process.env().clone().unwrap_or_default(),
            workdir: Some(process.cwd().to_string_lossy().into_owned())
                .filter(|cwd| !cwd.is_empty()),
            user: format!("{}:{}", user.uid(), user.gid()),
            tty: terminal || process.terminal().unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("a spec")
    }

    fn container(annotations: serde_json::Value) -> Spec {
        spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "hostname": "web",
            "process": {
                "args": ["sh", "-c", "echo hi"],
                "env": ["PATH=/bin", "A=1"],
                "cwd": "/srv",
                "user": {"uid": 1000, "gid": 100},
                "terminal": false
            },
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {
                "resources": {
                    "memory": {"limit": 67108864},
                    "cpu": {"quota": 50000, "period": 100000},
                    "pids": {"limit": 64}
                }
            }
        }))
    }

    #[test]
    fn a_container_runs_the_annotated_image_with_the_specs_process_and_limits() {
        let spec = container(serde_json::json!({GANTRY_IMAGE: "127.0.0.1:5000/busybox:1"}));
        let task = parse(&spec, "t1", false, true).unwrap();
        assert_eq!(task.kind, TaskKind::Container);
        assert_eq!(grouping(&spec, "t1"), "t1");
        let run = task.run.unwrap();
        assert_eq!(run.image, "127.0.0.1:5000/busybox:1");
        assert_eq!(run.name.as_deref(), Some("t1"));
        assert_eq!(
            run.entrypoint,
            Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
        );
        assert!(run.command.is_empty());
        assert_eq!(run.env, ["PATH=/bin", "A=1"]);
        assert_eq!(run.workdir.as_deref(), Some("/srv"));
        assert_eq!(run.user.as_deref(), Some("1000:100"));
        assert_eq!(run.hostname.as_deref(), Some("web"));
        assert_eq!(run.memory_bytes, Some(64 << 20));
        assert_eq!(run.cpus, Some(0.5));
        assert_eq!(run.pids_limit, Some(64));
        assert!(run.stdin && !run.tty && run.create_only);
    }

    #[test]
    fn cri_annotations_name_the_pod_the_image_and_the_sandbox() {
        let spec = container(serde_json::json!({
            CRI_CONTAINER_TYPE: "container",
            CRI_SANDBOX_ID: "pod1",
            CRI_IMAGE_NAME: "registry.local/app:2",
        }));
        let task = parse(&spec, "c1", true, false).unwrap();
        assert_eq!(task.sandbox_id.as_deref(), Some("pod1"));
        assert_eq!(grouping(&spec, "c1"), "pod1");
        let run = task.run.unwrap();
        assert_eq!(run.image, "registry.local/app:2");
        assert!(run.tty);

        // The Gantry annotation wins over CRI's.
        let both = container(serde_json::json!({
            CRI_IMAGE_NAME: "registry.local/app:2",
            GANTRY_IMAGE: "other/app:3",
            GANTRY_VM: "vm0",
        }));
        let task = parse(&both, "c2", false, false).unwrap();
        assert_eq!(task.run.unwrap().image, "other/app:3");
        assert_eq!(task.vm.as_deref(), Some("vm0"));

        let sandbox = container(serde_json::json!({
            CRI_CONTAINER_TYPE: "sandbox",
            CRI_SANDBOX_ID: "pod1",
        }));
        let task = parse(&sandbox, "pod1", false, false).unwrap();
        assert_eq!(task.kind, TaskKind::Sandbox);
        assert!(task.run.is_none(), "a sandbox runs nothing in the guest");
    }

    #[test]
    fn a_container_without_an_image_is_refused_with_the_way_out() {
        let error = parse(&container(serde_json::json!({})), "t1", false, false).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(GANTRY_IMAGE) && message.contains("t1"),
            "{message}"
        );
        let no_process = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": {GANTRY_IMAGE: "x"}
        }));
        assert!(matches!(
            parse(&no_process, "t2", false, false),
            Err(SpecError::NoProcess(_))
        ));
    }

    #[test]
    fn exec_specs_become_exec_requests() {
        let json = serde_json::json!({
            "args": ["cat", "/etc/hostname"],
            "env": ["X=1"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "terminal": true
        });
        let exec = parse_exec(json.to_string().as_bytes(), "t1", "e1", false, true).unwrap();
        assert_eq!(exec.exec_id.as_deref(), Some("e1"));
        assert_eq!(exec.command, ["cat", "/etc/hostname"]);
        assert_eq!(exec.user.as_deref(), Some("0:0"));
        assert!(exec.tty && exec.stdin);
        let empty = serde_json::json!({"cwd": "/", "user": {"uid": 0, "gid": 0}});
        assert!(parse_exec(empty.to_string().as_bytes(), "t1", "e2", false, false).is_err());
        assert!(parse_exec(b"{", "t1", "e3", false, false).is_err());
    }
}
