//! The record format of process output: what `GET …/logs` streams and what the agent's log files
//! hold, so the CLI decodes exactly what the agent stored.
//!
//! Record: one kind byte, a `u32` little-endian length, the bytes. Kinds: 1 stdout, 2 stderr,
//! 3 the end (JSON [`ExitRecord`]).

use gantry_proto::{ExitStatus, OutputStream};
use serde::{Deserialize, Serialize};

/// Record kind: standard output.
pub const KIND_STDOUT: u8 = 1;
/// Record kind: standard error.
pub const KIND_STDERR: u8 = 2;
/// Record kind: the end, with an [`ExitRecord`].
pub const KIND_EXIT: u8 = 3;
/// Largest record a reader accepts (output chunks are far smaller).
pub const MAX_RECORD: u32 = 16 << 20;

/// How a process ended, as the last record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code or signal.
    pub status: ExitStatus,
    /// Whether the container's cgroup saw an OOM kill.
    pub oom_killed: bool,
}

impl ExitRecord {
    /// The exit code a shell would show: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self.status {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogItem {
    /// Output bytes.
    Output(OutputStream, Vec<u8>),
    /// The process ended.
    Exit(ExitRecord),
}

/// Encodes a record.
pub fn encode_record(kind: u8, data: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(5 + data.len());
    record.push(kind);
    record.extend_from_slice(&(data.len() as u32).to_le_bytes());
    record.extend_from_slice(data);
    record
}

/// Decodes a record's kind and payload.
pub fn decode_record(kind: u8, data: Vec<u8>) -> std::io::Result<LogItem> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    match kind {
        KIND_STDOUT => Ok(LogItem::Output(OutputStream::Stdout, data)),
        KIND_STDERR => Ok(LogItem::Output(OutputStream::Stderr, data)),
        KIND_EXIT => serde_json::from_slice(&data)
            .map(LogItem::Exit)
            .map_err(|err| invalid(format!("bad exit record: {err}"))),
        other => Err(invalid(format!("unknown log record kind {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_unknown_kinds_are_refused() {
        let output = encode_record(KIND_STDERR, b"oops");
        assert_eq!(output[0], KIND_STDERR);
        assert_eq!(u32::from_le_bytes(output[1..5].try_into().unwrap()), 4);
        assert_eq!(
            decode_record(output[0], output[5..].to_vec()).unwrap(),
            LogItem::Output(OutputStream::Stderr, b"oops".to_vec())
        );
        let exit = ExitRecord {
            status: ExitStatus::Signal(9),
            oom_killed: true,
        };
        assert_eq!(exit.shell_code(), 137);
        let json = serde_json::to_vec(&exit).unwrap();
        assert_eq!(decode_record(KIND_EXIT, json).unwrap(), LogItem::Exit(exit));
        assert!(decode_record(KIND_EXIT, b"{".to_vec()).is_err());
        let error = decode_record(9, Vec::new()).unwrap_err();
        assert!(error.to_string().contains("kind 9"), "{error}");
    }
}
