//! A process's output as the agent keeps it: an append-only file of records, readable from the
//! start by any number of readers, which can follow it until the process has exited.
//!
//! The file holds the records of [`gantry_api::records`], the same the operator API streams, so
//! the CLI decodes what the file holds.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gantry_api::records::{
    ExitRecord, KIND_EXIT, KIND_STDERR, KIND_STDOUT, LogItem, MAX_RECORD, decode_record,
    encode_record,
};
use gantry_proto::OutputStream;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::sync::lock;

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    bytes: u64,
    ended: bool,
}

/// The writer side, owned by the container's record.
#[derive(Debug)]
pub struct ProcessLog {
    path: PathBuf,
    file: Mutex<File>,
    progress: watch::Sender<Progress>,
}

impl ProcessLog {
    /// Creates (truncates) the log file.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
            progress: watch::channel(Progress::default()).0,
        })
    }

    fn append(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let record = encode_record(kind, data);
        lock(&self.file).write_all(&record)?;
        self.progress.send_modify(|p| {
            p.bytes += record.len() as u64;
            p.ended |= kind == KIND_EXIT;
        });
        Ok(())
    }

    /// Appends output.
    pub fn output(&self, stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
        let kind = match stream {
            OutputStream::Stdout => KIND_STDOUT,
            OutputStream::Stderr => KIND_STDERR,
        };
        self.append(kind, data)
    }

    /// Appends the end; nothing may follow.
    pub fn finish(&self, exit: ExitRecord) -> std::io::Result<()> {
        if self.progress.borrow().ended {
            return Ok(());
        }
        let json = serde_json::to_vec(&exit).map_err(std::io::Error::other)?;
        self.append(KIND_EXIT, &json)
    }

    /// Whether the process has ended.
    pub fn ended(&self) -> bool {
        self.progress.borrow().ended
    }

    /// A reader from the first record; `follow` waits for more until the end.
    pub async fn reader(&self, follow: bool) -> std::io::Result<LogReader> {
        Ok(LogReader {
            file: tokio::fs::File::open(&self.path).await?,
            offset: 0,
            progress: self.progress.subscribe(),
            follow,
        })
    }
}

/// Reads records, as far as written (or, following, until the end record).
#[derive(Debug)]
pub struct LogReader {
    file: tokio::fs::File,
    offset: u64,
    progress: watch::Receiver<Progress>,
    follow: bool,
}

impl LogReader {
    /// The next record's kind and bytes, or `None` at the end.
    pub async fn next_raw(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            if self.offset + 5 <= progress.bytes {
                let mut header = [0u8; 5];
                self.file.read_exact(&mut header).await?;
                let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
                if len > MAX_RECORD {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "log record too large",
                    ));
                }
                let mut data = vec![0u8; len as usize];
                self.file.read_exact(&mut data).await?;
                self.offset += 5 + u64::from(len);
                return Ok(Some((header[0], data)));
            }
            if progress.ended || !self.follow {
                return Ok(None);
            }
            if self.progress.changed().await.is_err() {
                return Ok(None);
            }
        }
    }

    /// The next decoded record, or `None` at the end.
    pub async fn next(&mut self) -> std::io::Result<Option<LogItem>> {
        match self.next_raw().await? {
            Some((kind, data)) => decode_record(kind, data).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::ExitStatus;

    #[tokio::test]
    async fn readers_see_every_record_in_order_and_followers_wait_for_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(ProcessLog::create(&dir.path().join("c/out.log")).unwrap());
        log.output(OutputStream::Stdout, b"one").unwrap();
        let mut snapshot = log.reader(false).await.unwrap();
        let mut follower = log.reader(true).await.unwrap();
        assert_eq!(
            snapshot.next().await.unwrap(),
            Some(LogItem::Output(OutputStream::Stdout, b"one".to_vec()))
        );
        assert_eq!(
            snapshot.next().await.unwrap(),
            None,
            "a snapshot ends at what was written"
        );

        let writer = tokio::spawn({
            let log = log.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                log.output(OutputStream::Stderr, b"two").unwrap();
                log.finish(ExitRecord {
                    status: ExitStatus::Code(3),
                    oom_killed: false,
                })
                .unwrap();
            }
        });
        let mut items = Vec::new();
        while let Some(item) = follower.next().await.unwrap() {
            let end = matches!(item, LogItem::Exit(_));
            items.push(item);
            if end {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(
            items,
            vec![
                LogItem::Output(OutputStream::Stdout, b"one".to_vec()),
                LogItem::Output(OutputStream::Stderr, b"two".to_vec()),
                LogItem::Exit(ExitRecord {
                    status: ExitStatus::Code(3),
                    oom_killed: false
                }),
            ]
        );
        assert!(log.ended());
    }

    #[test]
    fn shell_codes_follow_the_shell() {
        assert_eq!(
            ExitRecord {
                status: ExitStatus::Code(4),
                oom_killed: false
            }
            .shell_code(),
            4
        );
        assert_eq!(
            ExitRecord {
                status: ExitStatus::Signal(9),
                oom_killed: true
            }
            .shell_code(),
            137
        );
    }
}
