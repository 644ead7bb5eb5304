//! Validation of what the agent asks for, before anything is mounted or started.

use gantry_proto::{ContainerSpec, ProcessSpec};

/// The most layers one container may stack: overlayfs's own limit on lower layers (Docker stops
/// images at 127). The shim names layers so that path lengths do not cap it: see
/// `storage::LowerDirs`.
pub const MAX_LAYERS: usize = crate::storage::OVERLAY_MAX_LOWER_LAYERS;
/// The smallest writable layer worth creating.
pub const MIN_WRITABLE_BYTES: u64 = 1 << 20;

/// Why a request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// An id that cannot name a container or exec.
    #[error(
        "invalid {what} {value:?}: use 1-128 characters from [A-Za-z0-9_.-], starting with a letter or digit"
    )]
    BadId {
        /// Which id.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Something else in the request is unusable.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Checks a container or exec id (the rule the agent applies too: `gantry_proto::validate_id`).
pub fn validate_id(what: &'static str, value: &str) -> Result<(), SpecError> {
    gantry_proto::validate_id(what, value).map_err(|err| SpecError::BadId {
        what,
        value: err.shown,
    })
}

/// Checks a process.
pub fn validate_process(process: &ProcessSpec) -> Result<(), SpecError> {
    if process.args.is_empty() || process.args[0].is_empty() {
        return Err(SpecError::Invalid(
            "no command to run: the image has no Entrypoint or Cmd and the request gave none"
                .into(),
        ));
    }
    let has_nul = |s: &String| s.contains('\0');
    if process.args.iter().any(has_nul)
        || process.env.iter().any(has_nul)
        || process.cwd.contains('\0')
    {
        return Err(SpecError::Invalid(
            "NUL byte in the command, environment or working directory".into(),
        ));
    }
    if let Some(bad) = process
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(SpecError::Invalid(format!(
            "environment entry {bad:?} is not KEY=VALUE"
        )));
    }
    if !process.cwd.starts_with('/') {
        return Err(SpecError::Invalid(format!(
            "working directory {:?} is not absolute",
            process.cwd
        )));
    }
    Ok(())
}

/// Checks a whole container request.
pub fn validate(spec: &ContainerSpec) -> Result<(), SpecError> {
    validate_id("container id", &spec.container_id)?;
    validate_process(&spec.process)?;
    if spec.layers.is_empty() || spec.layers.len() > MAX_LAYERS {
        return Err(SpecError::Invalid(format!(
            "a container needs 1 to {MAX_LAYERS} layers, got {}",
            spec.layers.len()
        )));
    }
    if spec.hostname.is_empty()
        || spec.hostname.len() > 64
        || !spec
            .hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(SpecError::Invalid(format!(
            "host name {:?} is not a valid host name",
            spec.hostname
        )));
    }
    if spec.writable_layer_bytes < MIN_WRITABLE_BYTES {
        return Err(SpecError::Invalid(format!(
            "writable layer of {} bytes is below the minimum of {MIN_WRITABLE_BYTES}",
            spec.writable_layer_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::{LayerExtent, Resources};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            container_id: "web-1".into(),
            layers: vec![LayerExtent {
                digest: "sha256:aa".into(),
                offset: 1 << 20,
                length: 4096,
            }],
            process: ProcessSpec {
                args: vec!["/bin/sh".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: String::new(),
                stdin: false,
            },
            hostname: "web-1".into(),
            resources: Resources::default(),
            writable_layer_bytes: 64 << 20,
        }
    }

    #[test]
    fn a_sound_spec_passes() {
        assert_eq!(validate(&spec()), Ok(()));
    }

    #[test]
    fn overlayfs_deepest_stack_passes_and_fits_one_frame() {
        let mut deep = spec();
        deep.layers = (0..MAX_LAYERS as u64)
            .map(|i| LayerExtent {
                digest: format!("sha256:{i:064x}"),
                offset: (i + 1) << 20,
                length: 4096,
            })
            .collect();
        assert_eq!(validate(&deep), Ok(()));
        let request = gantry_proto::Message::Request(gantry_proto::Request {
            id: 1,
            op: gantry_proto::Op::CreateContainer(deep.clone()),
        });
        let frame =
            gantry_proto::encode_frame(&request, gantry_proto::DEFAULT_MAX_FRAME_LEN).unwrap();
        assert!(frame.len() < 1 << 20, "{}", frame.len());
        deep.layers.push(deep.layers[0].clone());
        assert!(validate(&deep).is_err());
    }

    #[test]
    fn hostile_ids_are_refused() {
        for id in ["", "../x", "a/b", ".hidden", "-x", "a b", &"x".repeat(129)] {
            assert!(validate_id("container id", id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn unusable_requests_are_refused() {
        type Mutation = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|s| s.process.args.clear()),
            Box::new(|s| s.process.env.push("NOEQUALS".into())),
            Box::new(|s| s.process.cwd = "relative".into()),
            Box::new(|s| s.process.args.push("a\0b".into())),
            Box::new(|s| s.layers.clear()),
            Box::new(|s| s.hostname = "bad host".into()),
            Box::new(|s| s.writable_layer_bytes = 10),
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut bad = spec();
            mutate(&mut bad);
            assert!(validate(&bad).is_err(), "case {i}");
        }
    }
}
