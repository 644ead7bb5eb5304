//! Turning an image config and a `run` request into the shim's process and container specs.
//! Pure functions, Docker's semantics.

use gantry_api::RunOptions;
use gantry_proto::{ProcessSpec, Resources};
use serde::{Deserialize, Serialize};

/// `cpu.max` period used for `--cpus`.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Writable layer size when the request gives none.
pub const DEFAULT_WRITABLE_LAYER_BYTES: u64 = 256 << 20;

/// Errors in a run request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunSpecError {
    /// Nothing to run.
    #[error("the image has no Entrypoint or Cmd: give a command, e.g. `gantry-agent run IMAGE sh`")]
    NoCommand,
    /// `--cpus` out of range.
    #[error("--cpus must be between 0.01 and 1024, got {0}")]
    BadCpus(f64),
    /// `-e` without `=`.
    #[error("environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
}

/// The parts of an image config `run` uses (OCI `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
}

/// The main process of a `run`.
pub fn process_spec(image: &ImageDefaults, run: &RunOptions) -> Result<ProcessSpec, RunSpecError> {
    let args: Vec<String> = match &run.entrypoint {
        Some(entrypoint) => entrypoint.iter().chain(&run.command).cloned().collect(),
        None => {
            let cmd = if run.command.is_empty() {
                &image.cmd
            } else {
                &run.command
            };
            image.entrypoint.iter().chain(cmd).cloned().collect()
        }
    };
    if args.is_empty() || args[0].is_empty() {
        return Err(RunSpecError::NoCommand);
    }
    Ok(ProcessSpec {
        args,
        env: merge_env(&image.env, &run.env)?,
        cwd: run
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".to_owned()),
        user: run.user.clone().unwrap_or_else(|| image.user.clone()),
        stdin: run.stdin,
    })
}

/// The image's environment with the request's entries added or replacing same-named ones.
pub fn merge_env(image: &[String], overrides: &[String]) -> Result<Vec<String>, RunSpecError> {
    let mut env: Vec<String> = image.to_vec();
    for entry in overrides {
        let Some((key, _)) = entry.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(RunSpecError::BadEnv(entry.clone()));
        };
        env.retain(|e| e.split_once('=').map_or(e != key, |(k, _)| k != key));
        env.push(entry.clone());
    }
    Ok(env)
}

/// cgroup limits of a `run`.
pub fn resources(run: &RunOptions) -> Result<Resources, RunSpecError> {
    let cpu_quota_us = match run.cpus {
        None => None,
        Some(cpus) if cpus.is_finite() && (0.01..=1024.0).contains(&cpus) => {
            Some((cpus * CPU_PERIOD_US as f64).round() as u64)
        }
        Some(cpus) => return Err(RunSpecError::BadCpus(cpus)),
    };
    Ok(Resources {
        memory_max_bytes: run.memory_bytes,
        cpu_quota_us,
        cpu_period_us: cpu_quota_us.map(|_| CPU_PERIOD_US),
        pids_max: run.pids_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            working_dir: "/app".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn command_and_entrypoint_follow_docker() {
        let run = RunOptions::default();
        assert_eq!(
            process_spec(&image(), &run).unwrap().args,
            ["/entry", "--serve"]
        );
        let run = RunOptions {
            command: vec!["--debug".into()],
            ..Default::default()
        };
        assert_eq!(
            process_spec(&image(), &run).unwrap().args,
            ["/entry", "--debug"]
        );
        let run = RunOptions {
            entrypoint: Some(vec!["sh".into()]),
            ..Default::default()
        };
        assert_eq!(
            process_spec(&image(), &run).unwrap().args,
            ["sh"],
            "Cmd is dropped with a new entrypoint"
        );
        let empty = ImageDefaults::default();
        assert_eq!(
            process_spec(&empty, &RunOptions::default()),
            Err(RunSpecError::NoCommand)
        );
    }

    #[test]
    fn env_cwd_and_user_overrides_apply() {
        let run = RunOptions {
            env: vec!["MODE=test".into(), "NEW=1".into()],
            workdir: Some("/tmp".into()),
            user: Some("nobody".into()),
            ..Default::default()
        };
        let process = process_spec(&image(), &run).unwrap();
        assert_eq!(process.env, ["PATH=/bin", "MODE=test", "NEW=1"]);
        assert_eq!(process.cwd, "/tmp");
        assert_eq!(process.user, "nobody");
        let defaults = process_spec(&image(), &RunOptions::default()).unwrap();
        assert_eq!(
            (defaults.cwd.as_str(), defaults.user.as_str()),
            ("/app", "app")
        );
        assert_eq!(
            merge_env(&[], &["=x".into()]),
            Err(RunSpecError::BadEnv("=x".into()))
        );
    }

    #[test]
    fn limits_translate_to_cgroup_values() {
        let run = RunOptions {
            cpus: Some(0.5),
            memory_bytes: Some(1 << 28),
            pids_limit: Some(64),
            ..Default::default()
        };
        let resources = resources(&run).unwrap();
        assert_eq!(resources.cpu_quota_us, Some(50_000));
        assert_eq!(resources.cpu_period_us, Some(CPU_PERIOD_US));
        assert_eq!(resources.memory_max_bytes, Some(1 << 28));
        assert!(
            super::resources(&RunOptions {
                cpus: Some(0.0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            super::resources(&RunOptions {
                cpus: Some(f64::NAN),
                ..Default::default()
            })
            .is_err()
        );
    }
}
