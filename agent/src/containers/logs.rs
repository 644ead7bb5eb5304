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
//!
//! The log also knows how far it holds the process's output (its *position*, both streams
//! counted), so that output the shim resends after the agent restarts is neither lost nor kept
//! twice: every file begins with a position record (the position at its first byte, written
//! before the file gets its name), so the newest file alone gives the position when a later
//! agent opens the log again ([`ProcessLog::open`]). Readers skip position records.

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

/// Record kind, only in the agent's files (never streamed): the process's output position, a
/// `u64` little-endian, at the start of every file.
const KIND_POSITION: u8 = 0x80;

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
    /// The process's output held, from its start (dropped files included).
    position: u64,
}

/// What became of output offered at an offset ([`ProcessLog::output_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written (all or the part beyond what the log held).
    Written,
    /// Held already: a chunk resent after a reconnection.
    Duplicate,
    /// Written, but output before it never arrived: `missing` bytes are lost.
    AfterGap {
        /// Bytes between the position held and the chunk's offset.
        missing: u64,
    },
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

fn position_record(position: u64) -> Vec<u8> {
    encode_record(KIND_POSITION, &position.to_le_bytes())
}

/// Creates the log file `path` beginning with the position record: written under a temporary
/// name and renamed, so a file of the log always has its position, whenever the agent dies.
fn create_file(path: &Path, position: u64) -> std::io::Result<File> {
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(".new");
    let temp = PathBuf::from(temp_name);
    // A log is never reached through a symbolic link, whatever was left in the directory.
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)?;
    file.write_all(&position_record(position))?;
    std::fs::rename(&temp, path)?;
    Ok(file)
}

/// What the newest file of a log says when it is opened again.
#[derive(Debug)]
struct Reopened {
    position: u64,
    /// Bytes of whole records (a record the agent died while writing is cut off).
    bytes: u64,
    ended: bool,
}

/// Reads the records of `file` (the newest of a log): its position at the start plus the output
/// after it, whether the exit record is there, and where the last whole record ends.
fn scan_newest(file: &mut File) -> std::io::Result<Reopened> {
    use std::io::Read;
    let mut contents = Vec::new();
    file.read_to_end(&mut contents)?;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut at = 0usize;
    let mut reopened = Reopened {
        position: 0,
        bytes: 0,
        ended: false,
    };
    let mut first = true;
    while contents.len() - at >= 5 {
        let kind = contents[at];
        let len = u32::from_le_bytes([
            contents[at + 1],
            contents[at + 2],
            contents[at + 3],
            contents[at + 4],
        ]);
        let Some(data) = contents.get(at + 5..at + 5 + len as usize) else {
            break;
        };
        match kind {
            KIND_POSITION if first => {
                let bytes: [u8; 8] = data
                    .try_into()
                    .map_err(|_| invalid("bad position record"))?;
                reopened.position = u64::from_le_bytes(bytes);
            }
            _ if first => return Err(invalid("log file without its position record")),
            KIND_STDOUT | KIND_STDERR => reopened.position += u64::from(len),
            KIND_EXIT => reopened.ended = true,
            _ => return Err(invalid("unknown record in a log file")),
        }
        first = false;
        at += 5 + len as usize;
    }
    if first {
        return Err(invalid("log file without its position record"));
    }
    reopened.bytes = at as u64;
    Ok(reopened)
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
        let file = create_file(&dir.join(file_name(stem, 0)), 0)?;
        let bytes = position_record(0).len() as u64;
        Ok(Self {
            dir: dir.to_owned(),
            stem: stem.to_owned(),
            limits,
            current: Mutex::new(Current {
                file,
                generation: 0,
                bytes,
                position: 0,
            }),
            progress: watch::channel(Progress {
                bytes,
                ..Progress::default()
            })
            .0,
        })
    }

    /// Opens the log `stem` in `dir` that an earlier agent wrote, to go on where it stopped: a
    /// record it was cut off writing is dropped (the shim sends that output again). Without
    /// any file of `stem`, it is [`ProcessLog::create`].
    pub fn open(dir: &Path, stem: &str, limits: LogLimits) -> std::io::Result<Self> {
        let generations = Self::generations(dir, stem)?;
        let (Some(&oldest), Some(&newest)) = (generations.first(), generations.last()) else {
            return Self::create(dir, stem, limits);
        };
        let path = dir.join(file_name(stem, newest));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        let reopened = scan_newest(&mut file)?;
        file.set_len(reopened.bytes)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        Ok(Self {
            dir: dir.to_owned(),
            stem: stem.to_owned(),
            limits,
            current: Mutex::new(Current {
                file,
                generation: newest,
                bytes: reopened.bytes,
                position: reopened.position,
            }),
            progress: watch::channel(Progress {
                generation: newest,
                bytes: reopened.bytes,
                oldest,
                ended: reopened.ended,
            })
            .0,
        })
    }

    /// The generations of `stem`'s files in `dir`, oldest first (unfinished `.new` files and
    /// other names ignored).
    fn generations(dir: &Path, stem: &str) -> std::io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let prefix = format!("{stem}.");
        let mut generations: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    fn path(&self, generation: u64) -> PathBuf {
        self.dir.join(file_name(&self.stem, generation))
    }

    fn append(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let mut current = lock(&self.current);
        self.append_locked(&mut current, kind, data)
    }

    fn append_locked(&self, current: &mut Current, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let record = encode_record(kind, data);
        let len = record.len() as u64;
        let header = position_record(0).len() as u64;
        if current.bytes > header && current.bytes.saturating_add(len) > self.limits.max_file_bytes
        {
            self.rotate(current)?;
        }
        current.file.write_all(&record)?;
        current.bytes += len;
        if kind != KIND_EXIT {
            current.position += data.len() as u64;
        }
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
        let file = create_file(&self.path(next), current.position)?;
        *current = Current {
            file,
            generation: next,
            bytes: position_record(0).len() as u64,
            position: current.position,
        };
        let oldest = (next + 1).saturating_sub(u64::from(self.limits.max_files));
        let before = self.progress.borrow().oldest;
        for generation in before..oldest {
            let _ = std::fs::remove_file(self.path(generation));
        }
        let bytes = current.bytes;
        self.progress.send_modify(|p| {
            p.generation = next;
            p.bytes = bytes;
            p.oldest = oldest;
        });
        Ok(())
    }

    /// Appends output (of a shim that does not say where it belongs).
    pub fn output(&self, stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
        self.append(output_kind(stream), data)
    }

    /// Appends output that begins at `offset` of the process's output: what the log holds
    /// already (a chunk resent after a reconnection) is not written again.
    pub fn output_at(
        &self,
        stream: OutputStream,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<Appended> {
        let mut current = lock(&self.current);
        let position = current.position;
        let end = offset.saturating_add(data.len() as u64);
        if end <= position {
            return Ok(Appended::Duplicate);
        }
        let (fresh, appended) = if offset >= position {
            let missing = offset - position;
            // Bytes that never came are lost, but the position must follow the shim's.
            current.position = offset;
            let appended = if missing == 0 {
                Appended::Written
            } else {
                Appended::AfterGap { missing }
            };
            (data, appended)
        } else {
            // Overlap: `position - offset < data.len()` since `end > position`.
            let skip = usize::try_from(position - offset).unwrap_or(data.len());
            (&data[skip..], Appended::Written)
        };
        self.append_locked(&mut current, output_kind(stream), fresh)?;
        Ok(appended)
    }

    /// How much of the process's output the log holds, from its start.
    pub fn position(&self) -> u64 {
        lock(&self.current).position
    }

    /// Appends the end; nothing may follow. Whether it was the end's first record (an exit the
    /// shim says again after a reconnection is not).
    pub fn finish(&self, exit: ExitRecord) -> std::io::Result<bool> {
        if self.progress.borrow().ended {
            return Ok(false);
        }
        let json = serde_json::to_vec(&exit).map_err(std::io::Error::other)?;
        self.append(KIND_EXIT, &json)?;
        Ok(true)
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

fn output_kind(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stdout => KIND_STDOUT,
        OutputStream::Stderr => KIND_STDERR,
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
            match self.next_any().await? {
                Some((KIND_POSITION, _)) => continue,
                record => return Ok(record),
            }
        }
    }

    /// The next record, position records included.
    async fn next_any(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
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

    async fn outputs(log: &ProcessLog) -> Vec<u8> {
        let mut reader = log.reader(false).await.unwrap();
        let mut bytes = Vec::new();
        while let Some(item) = reader.next().await.unwrap() {
            if let LogItem::Output(_, data) = item {
                bytes.extend(data);
            }
        }
        bytes
    }

    #[tokio::test]
    async fn a_log_opened_again_goes_on_at_its_position_and_drops_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: LogLimits::MIN_FILE_BYTES,
            max_files: 2,
        };
        let log = ProcessLog::create(dir.path(), "main", limits).unwrap();
        // 5 × 20 KiB: rotated, the oldest files deleted, the position counts everything.
        for i in 0..5u8 {
            assert_eq!(
                log.output_at(OutputStream::Stdout, u64::from(i) * 20_480, &[i; 20_480])
                    .unwrap(),
                Appended::Written
            );
        }
        assert_eq!(log.position(), 5 * 20_480);
        let kept = outputs(&log).await;
        drop(log);
        // An agent killed while writing a record leaves half of it.
        let newest = (0..10)
            .rev()
            .map(|g| dir.path().join(file_name("main", g)))
            .find(|p| p.exists())
            .unwrap();
        let mut torn = OpenOptions::new().append(true).open(&newest).unwrap();
        torn.write_all(&encode_record(KIND_STDOUT, &[9; 100])[..50])
            .unwrap();
        drop(torn);

        let log = ProcessLog::open(dir.path(), "main", limits).unwrap();
        assert_eq!(log.position(), 5 * 20_480, "the torn record is not held");
        assert!(!log.ended());
        assert_eq!(outputs(&log).await, kept, "what was kept reads as before");
        // The shim resends from the position: the torn record's bytes come whole.
        log.output_at(OutputStream::Stderr, 5 * 20_480, &[9; 100])
            .unwrap();
        log.finish(ExitRecord {
            status: ExitStatus::Code(0),
            oom_killed: false,
        })
        .unwrap();
        let mut expected = kept.clone();
        expected.extend([9; 100]);
        assert_eq!(outputs(&log).await, expected);
        drop(log);
        let log = ProcessLog::open(dir.path(), "main", limits).unwrap();
        assert!(log.ended(), "the end is read back");
        assert_eq!(log.position(), 5 * 20_480 + 100);
        assert!(
            !log.finish(ExitRecord {
                status: ExitStatus::Code(0),
                oom_killed: false,
            })
            .unwrap(),
            "an exit said again is not written twice"
        );
    }

    #[tokio::test]
    async fn output_at_an_offset_keeps_each_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = ProcessLog::create(dir.path(), "main", LogLimits::default()).unwrap();
        let out = OutputStream::Stdout;
        assert_eq!(log.output_at(out, 0, b"abcd").unwrap(), Appended::Written);
        assert_eq!(log.output_at(out, 0, b"abcd").unwrap(), Appended::Duplicate);
        assert_eq!(log.output_at(out, 2, b"cdef").unwrap(), Appended::Written);
        assert_eq!(
            log.output_at(out, 10, b"kl").unwrap(),
            Appended::AfterGap { missing: 4 }
        );
        assert_eq!(log.position(), 12);
        assert_eq!(outputs(&log).await, b"abcdefkl");
        // A log opened with no file of its stem starts empty.
        let fresh =
            ProcessLog::open(&dir.path().join("new"), "exec-e", LogLimits::default()).unwrap();
        assert_eq!(fresh.position(), 0);
        assert!(outputs(&fresh).await.is_empty());
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
