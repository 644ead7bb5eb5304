//! A process's output as the agent keeps it: files of records, readable from the start by any
//! number of readers, which can follow them until the process has exited.
//!
//! The files hold the records of [`gantry_api::records`], the same the operator API streams, so
//! the CLI decodes what the files hold.
//!
//! A guest decides how much a process writes, and the card's disk also holds the shared image
//! cache, so every log is capped like Docker's `max-size`/`max-file`: records go to numbered
//! files `STEM.N.log`; when one would grow past [`LogLimits::max_file_bytes`] the next number is
//! started and the oldest beyond [`LogLimits::max_files`] is deleted. The oldest output is
//! dropped, writing never fails for lack of room under the cap, so the container's output credit
//! keeps flowing and it is never blocked by its own log. The exit record always goes in.
//! Readers start at the oldest file still there; a follower that falls behind a deleted file
//! goes on at the oldest one left (it misses what was dropped, as `docker logs` does).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gantry_api::records::{
    ExitRecord, KIND_EXIT, KIND_STDERR, KIND_STDOUT, LogItem, MAX_RECORD, decode_record,
    encode_record,
};
use gantry_proto::OutputStream;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::sync::lock;

/// How much of one process's output is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogLimits {
    /// Largest size of one log file (Docker's `max-size`); at least 64 KiB.
    pub max_file_bytes: u64,
    /// Files kept per process, the current one included (Docker's `max-file`); at least 1.
    pub max_files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_file_bytes: 16 << 20,
            max_files: 3,
        }
    }
}

impl LogLimits {
    /// The smallest file size accepted: a few output chunks.
    pub const MIN_FILE_BYTES: u64 = 64 << 10;

    /// Checks the limits.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_file_bytes < Self::MIN_FILE_BYTES {
            return Err(format!(
                "logs.max_file_bytes must be at least {}",
                Self::MIN_FILE_BYTES
            ));
        }
        if self.max_files == 0 {
            return Err("logs.max_files must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// The file being written.
    generation: u64,
    /// Bytes in it.
    bytes: u64,
    /// The oldest file kept.
    oldest: u64,
    ended: bool,
}

#[derive(Debug)]
struct Current {
    file: File,
    generation: u64,
    bytes: u64,
}

/// The writer side, owned by the container's record.
#[derive(Debug)]
pub struct ProcessLog {
    dir: PathBuf,
    stem: String,
    limits: LogLimits,
    current: Mutex<Current>,
    progress: watch::Sender<Progress>,
}

fn file_name(stem: &str, generation: u64) -> String {
    format!("{stem}.{generation}.log")
}

fn create_file(path: &Path) -> std::io::Result<File> {
    // A log is never reached through a symbolic link, whatever was left in the directory.
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl ProcessLog {
    /// Starts the log `stem` in `dir` (created if needed), replacing an earlier one of that stem.
    /// `stem` must be a plain file name (no `/`): callers pass validated ids.
    pub fn create(dir: &Path, stem: &str, limits: LogLimits) -> std::io::Result<Self> {
        if stem.is_empty() || stem.contains('/') || stem == "." || stem == ".." {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{stem:?} cannot name a log file"),
            ));
        }
        std::fs::create_dir_all(dir)?;
        let file = create_file(&dir.join(file_name(stem, 0)))?;
        Ok(Self {
            dir: dir.to_owned(),
            stem: stem.to_owned(),
            limits,
            current: Mutex::new(Current {
                file,
                generation: 0,
                bytes: 0,
            }),
            progress: watch::channel(Progress::default()).0,
        })
    }

    fn path(&self, generation: u64) -> PathBuf {
        self.dir.join(file_name(&self.stem, generation))
    }

    fn append(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let record = encode_record(kind, data);
        let mut current = lock(&self.current);
        let len = record.len() as u64;
        if current.bytes > 0 && current.bytes.saturating_add(len) > self.limits.max_file_bytes {
            self.rotate(&mut current)?;
        }
        current.file.write_all(&record)?;
        current.bytes += len;
        let (generation, bytes) = (current.generation, current.bytes);
        self.progress.send_modify(|p| {
            p.generation = generation;
            p.bytes = bytes;
            p.ended |= kind == KIND_EXIT;
        });
        Ok(())
    }

    /// Starts the next file and deletes the oldest beyond the limit.
    fn rotate(&self, current: &mut Current) -> std::io::Result<()> {
        let next = current.generation + 1;
        let file = create_file(&self.path(next))?;
        *current = Current {
            file,
            generation: next,
            bytes: 0,
        };
        let oldest = (next + 1).saturating_sub(u64::from(self.limits.max_files));
        let before = self.progress.borrow().oldest;
        for generation in before..oldest {
            let _ = std::fs::remove_file(self.path(generation));
        }
        self.progress.send_modify(|p| {
            p.generation = next;
            p.bytes = 0;
            p.oldest = oldest;
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

    /// Bytes in the log files kept now.
    pub fn kept_bytes(&self) -> u64 {
        let progress = *self.progress.borrow();
        (progress.oldest..=progress.generation)
            .filter_map(|generation| std::fs::metadata(self.path(generation)).ok())
            .map(|meta| meta.len())
            .sum()
    }

    /// A reader from the oldest record kept; `follow` waits for more until the end.
    pub async fn reader(&self, follow: bool) -> std::io::Result<LogReader> {
        let mut progress = self.progress.subscribe();
        let (generation, file) = open_oldest(&self.dir, &self.stem, &mut progress).await?;
        Ok(LogReader {
            dir: self.dir.clone(),
            stem: self.stem.clone(),
            file,
            generation,
            offset: 0,
            progress,
            follow,
        })
    }
}

/// Opens the oldest file kept, retrying if the writer deletes it meanwhile.
async fn open_oldest(
    dir: &Path,
    stem: &str,
    progress: &mut watch::Receiver<Progress>,
) -> std::io::Result<(u64, tokio::fs::File)> {
    loop {
        let oldest = progress.borrow_and_update().oldest;
        match tokio::fs::File::open(dir.join(file_name(stem, oldest))).await {
            Ok(file) => return Ok((oldest, file)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if progress.borrow().oldest == oldest {
                    return Err(err);
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// Reads records, as far as written (or, following, until the end record).
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    stem: String,
    file: tokio::fs::File,
    generation: u64,
    offset: u64,
    progress: watch::Receiver<Progress>,
    follow: bool,
}

impl LogReader {
    async fn read_record(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        let mut header = [0u8; 5];
        let mut got = 0;
        while got < header.len() {
            match self.file.read(&mut header[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "log record cut short",
                    ));
                }
                n => got += n,
            }
        }
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
        Ok(Some((header[0], data)))
    }

    /// Moves on to the next file kept (or the oldest, if the next one is gone already).
    async fn next_file(&mut self) -> std::io::Result<()> {
        let next = self.generation + 1;
        let file = match tokio::fs::File::open(self.dir.join(file_name(&self.stem, next))).await {
            Ok(file) => (next, file),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                open_oldest(&self.dir, &self.stem, &mut self.progress).await?
            }
            Err(err) => return Err(err),
        };
        (self.generation, self.file) = file;
        self.offset = 0;
        Ok(())
    }

    /// The next record's kind and bytes, or `None` at the end.
    pub async fn next_raw(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            let progress = *self.progress.borrow_and_update();
            if self.generation < progress.generation {
                // A finished file: read it to its end, then go on with the next.
                if let Some(record) = self.read_record().await? {
                    return Ok(Some(record));
                }
                self.next_file().await?;
                continue;
            }
            if self.offset + 5 <= progress.bytes {
                return match self.read_record().await? {
                    Some(record) => Ok(Some(record)),
                    None => Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "log file shorter than written",
                    )),
                };
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
        let log = std::sync::Arc::new(
            ProcessLog::create(&dir.path().join("c"), "out", LogLimits::default()).unwrap(),
        );
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

    #[tokio::test]
    async fn a_capped_log_drops_its_oldest_output_and_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: LogLimits::MIN_FILE_BYTES,
            max_files: 2,
        };
        let log = ProcessLog::create(dir.path(), "main", limits).unwrap();
        let mut early = log.reader(true).await.unwrap();
        // 64 chunks of 16 KiB: 1 MiB written, at most ~2 × 64 KiB kept.
        for i in 0..64u8 {
            log.output(OutputStream::Stdout, &[i; 16 << 10]).unwrap();
        }
        log.finish(ExitRecord {
            status: ExitStatus::Code(0),
            oom_killed: false,
        })
        .unwrap();
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "only max_files files are kept");
        assert!(
            log.kept_bytes() <= 2 * LogLimits::MIN_FILE_BYTES,
            "{} bytes kept",
            log.kept_bytes()
        );

        // A reader from the start sees the newest chunks in order, then the end.
        let mut reader = log.reader(false).await.unwrap();
        let mut firsts = Vec::new();
        let mut exit = None;
        while let Some(item) = reader.next().await.unwrap() {
            match item {
                LogItem::Output(_, data) => firsts.push(data[0]),
                LogItem::Exit(record) => exit = Some(record),
            }
        }
        assert!(exit.is_some(), "the exit record is never dropped");
        assert_eq!(*firsts.last().unwrap(), 63);
        assert!(firsts.len() < 64 && firsts.len() >= 4, "{firsts:?}");
        assert!(firsts.windows(2).all(|w| w[1] == w[0] + 1), "{firsts:?}");

        // A follower that was left behind goes on at the oldest file kept.
        let mut seen = Vec::new();
        while let Some(item) = early.next().await.unwrap() {
            if let LogItem::Output(_, data) = item {
                seen.push(data[0]);
            }
        }
        assert_eq!(*seen.last().unwrap(), 63);
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    }

    #[test]
    fn log_stems_cannot_leave_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
            assert!(
                ProcessLog::create(dir.path(), bad, LogLimits::default()).is_err(),
                "{bad:?}"
            );
        }
        assert!(
            LogLimits {
                max_files: 0,
                ..LogLimits::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            LogLimits {
                max_file_bytes: 1,
                ..LogLimits::default()
            }
            .validate()
            .is_err()
        );
    }
}
