//! Requests in flight, recorded where the next agent finds them after a crash or an upgrade.
//!
//! When the backend goes away, QEMU 7.2's vhost-user-blk cannot ask it where the queue stood, so
//! it restarts the queue at the used index it finds in guest memory. The layer store completes
//! out of order (parked lazy reads, large reads on helper threads), so from that index on some
//! requests were completed already (they would be completed twice) and some before it were not
//! (they would be lost). vhost-user's answer is the inflight-tracking buffer
//! (`VHOST_USER_GET_INFLIGHT_FD`), but `vhost-user-backend` 0.24 refuses that message and offers
//! no hook to answer it, so the agent keeps the same record itself, in the layout vhost-user
//! describes for split rings: a file in the VM's state directory, mapped shared. A killed process
//! leaves its stores in the page cache; the next agent maps the same file, and on the queue's
//! first event after the frontend re-attaches:
//! - if the ring is the one recorded (same guest memory file, same ring addresses) and the used
//!   index agrees with the record (or is one ahead: the crash fell between publishing a
//!   completion and clearing its entry), the requests still marked are executed again, oldest
//!   first, and the queue's next available index becomes `used + in flight`;
//! - otherwise (another QEMU, a driver that reset its rings) the record starts afresh.
//!
//! A clean stop (the frontend stops the queue; the agent completes or fails everything first)
//! or the frontend leaving for good clears the record: there is nothing to resume.
//!
//! Writes are ordered as vhost-user prescribes: an entry is marked right after its head is
//! popped, and a completion sets `last_batch_head`, publishes the used element, then clears the
//! entry and records the used index. Each queue has its own mapping, locked only by the threads
//! that complete that queue's requests (they hold its vring lock too).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::{MmapMut, MmapOptions};

use super::execute::Memory;
use super::virtio_blk::MAX_QUEUE_SIZE;

/// Magic at the start of every queue's region.
const REGION_MAGIC: [u8; 8] = *b"GANTRYQ1";
/// Bytes of a queue region before its descriptor states.
const REGION_HEADER: usize = 128;
/// Bytes of one descriptor's state: `inflight` (u8) at 0, `counter` (u64) at 8, and (beyond
/// vhost-user's layout) when it was popped, in Unix microseconds, at 16: what tells how long a
/// request in flight across a restart waited.
const DESC_STATE: usize = 24;
/// One queue's region, rounded up to whole pages so each queue maps its own.
const REGION_SIZE: usize = (REGION_HEADER + MAX_QUEUE_SIZE * DESC_STATE).next_multiple_of(4096);

// Field offsets in a region header.
const AT_MAGIC: usize = 0;
const AT_ACTIVE: usize = 8;
const AT_SIZE: usize = 12;
const AT_LAST_BATCH_HEAD: usize = 14;
const AT_USED_IDX: usize = 16;
const AT_COUNTER: usize = 24;
const AT_KEY: usize = 32;
const KEY_LEN: usize = 40;

/// Errors opening the record.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The file could not be created, sized or mapped.
    #[error("inflight record {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// What identifies one ring of one guest: the guest memory's backing file and the ring's
/// addresses and size, as the frontend set them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingKey {
    /// Device and inode of the file backing the guest memory's first region (QEMU's memfd).
    pub memory: (u64, u64),
    /// Guest-physical addresses of the descriptor table, the available and the used ring.
    pub rings: (u64, u64, u64),
    /// Queue size.
    pub size: u16,
}

impl RingKey {
    fn encode(&self) -> [u8; KEY_LEN] {
        let mut bytes = [0u8; KEY_LEN];
        let words = [
            self.memory.0,
            self.memory.1,
            self.rings.0,
            self.rings.1,
            self.rings.2,
        ];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// The identity of the file behind a guest memory region.
    pub fn memory_of(file: &File) -> io::Result<(u64, u64)> {
        let meta = file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// What the record says to do with a queue that (re)starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Nothing to resume: the record now tracks this ring from its used index.
    Fresh,
    /// The ring is the recorded one: execute `heads` again (oldest first) and continue popping
    /// at `next_avail`.
    Resubmit {
        /// Heads in flight when the previous agent stopped, oldest first.
        heads: Vec<u16>,
        /// Where the previous agent had popped up to.
        next_avail: u16,
    },
}

/// The record of all queues of one device.
#[derive(Debug)]
pub struct InflightFile {
    queues: Vec<InflightQueue>,
}

impl InflightFile {
    /// Opens (creating if needed) the record at `path` for `num_queues` queues. A file of another
    /// shape (the queue count changed) is started afresh.
    pub fn open(path: &Path, num_queues: u16) -> Result<InflightFile, InflightError> {
        let fail = |source| InflightError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        let len = (REGION_SIZE * usize::from(num_queues)) as u64;
        if file.metadata().map_err(fail)?.len() != len {
            file.set_len(0).map_err(fail)?;
            file.set_len(len).map_err(fail)?;
        }
        let mut queues = Vec::with_capacity(num_queues.into());
        for index in 0..usize::from(num_queues) {
            // SAFETY: the file is the agent's own (mode 0600 in its state directory) and is never
            // truncated while mapped: only `open` resizes it, before mapping. The mapping is
            // only reached through `InflightQueue`'s mutex.
            let map = unsafe {
                MmapOptions::new()
                    .offset((index * REGION_SIZE) as u64)
                    .len(REGION_SIZE)
                    .map_mut(&file)
            }
            .map_err(fail)?;
            queues.push(InflightQueue {
                region: Mutex::new(Region {
                    map,
                    resumed: std::collections::HashMap::new(),
                }),
            });
        }
        Ok(InflightFile { queues })
    }

    /// The record of queue `index`.
    pub fn queue(&self, index: usize) -> Option<&InflightQueue> {
        self.queues.get(index)
    }
}

/// One queue's record, as the threads completing that queue's requests hold it.
#[derive(Clone, Debug)]
pub struct QueueRecord {
    file: std::sync::Arc<InflightFile>,
    index: usize,
}

impl QueueRecord {
    /// The record of queue `index` of `file`, if the file has that queue.
    pub fn new(file: std::sync::Arc<InflightFile>, index: usize) -> Option<QueueRecord> {
        file.queue(index)?;
        Some(QueueRecord { file, index })
    }

    /// The queue's record.
    pub fn get(&self) -> &InflightQueue {
        // `new` checked that the queue exists, and the file's queues never change.
        &self.file.queues[self.index]
    }
}

/// The record of one queue.
#[derive(Debug)]
pub struct InflightQueue {
    region: Mutex<Region>,
}

impl InflightQueue {
    fn region(&self) -> std::sync::MutexGuard<'_, Region> {
        crate::sync::lock(&self.region)
    }

    /// Decides what to do with a queue starting on ring `key` whose used index in guest memory
    /// is `ring_used`, and from then on tracks that ring.
    pub fn resume(&self, key: RingKey, ring_used: u16) -> Resume {
        let mut region = self.region();
        let outcome = region.resumable(&key, ring_used);
        if outcome == Resume::Fresh {
            region.reset(&key, ring_used);
        }
        outcome
    }

    /// Records that `head` was popped.
    pub fn begin(&self, head: u16) {
        self.region().begin(head);
    }

    /// Completes `head`: `publish` writes the used element (and the used index), between the
    /// record's two steps. `used_after` is the used index once published. A request that was in
    /// flight across a restart logs how long the guest waited for it.
    pub fn complete<T>(&self, head: u16, publish: impl FnOnce() -> (T, u16)) -> T {
        let mut region = self.region();
        region.put_u16(AT_LAST_BATCH_HEAD, head);
        let (result, used_after) = publish();
        region.set_inflight(head, false);
        region.put_u16(AT_USED_IDX, used_after);
        if let Some(popped_us) = region.resumed.remove(&head) {
            let stall_ms = now_unix_us().saturating_sub(popped_us) / 1000;
            tracing::info!(
                head,
                stall_ms,
                "layer store: a request in flight across the restart completed"
            );
        }
        result
    }

    /// Forgets the ring: nothing is in flight any more (a clean stop, or the frontend is gone).
    pub fn clear(&self) {
        self.region().put_u32(AT_ACTIVE, 0);
    }

    /// Heads currently marked in flight (for tests).
    pub fn in_flight(&self) -> Vec<u16> {
        self.region().marked_oldest_first()
    }
}

/// One queue's mapped region, and the heads resubmitted from it (with when they were popped)
/// that have not completed yet.
struct Region {
    map: MmapMut,
    resumed: std::collections::HashMap<u16, u64>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.map.len())
            .field("resumed", &self.resumed.len())
            .finish_non_exhaustive()
    }
}

/// The time now in Unix microseconds (0 if the clock is before 1970).
fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Region {
    fn get<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(&self.map[at..at + N]);
        bytes
    }

    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn get_u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.get(at))
    }

    fn put_u16(&mut self, at: usize, value: u16) {
        self.put(at, &value.to_le_bytes());
    }

    fn put_u32(&mut self, at: usize, value: u32) {
        self.put(at, &value.to_le_bytes());
    }

    fn get_u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.get(at))
    }

    fn put_u64(&mut self, at: usize, value: u64) {
        self.put(at, &value.to_le_bytes());
    }

    fn desc_at(head: u16) -> usize {
        REGION_HEADER + usize::from(head) * DESC_STATE
    }

    fn size(&self) -> u16 {
        self.get_u16(AT_SIZE)
    }

    fn is_inflight(&self, head: u16) -> bool {
        head < self.size() && self.map[Self::desc_at(head)] == 1
    }

    fn set_inflight(&mut self, head: u16, inflight: bool) {
        if head < self.size() {
            self.map[Self::desc_at(head)] = u8::from(inflight);
        }
    }

    fn begin(&mut self, head: u16) {
        if head >= self.size() {
            return;
        }
        let counter = self.get_u64(AT_COUNTER).wrapping_add(1);
        self.put_u64(AT_COUNTER, counter);
        self.put_u64(Self::desc_at(head) + 8, counter);
        self.put_u64(Self::desc_at(head) + 16, now_unix_us());
        self.set_inflight(head, true);
    }

    fn marked_oldest_first(&self) -> Vec<u16> {
        let mut marked: Vec<(u64, u16)> = (0..self.size())
            .filter(|head| self.is_inflight(*head))
            .map(|head| (self.get_u64(Self::desc_at(head) + 8), head))
            .collect();
        marked.sort_unstable();
        marked.into_iter().map(|(_, head)| head).collect()
    }

    fn resumable(&mut self, key: &RingKey, ring_used: u16) -> Resume {
        let recorded = self.get::<8>(AT_MAGIC) == REGION_MAGIC
            && self.get::<4>(AT_ACTIVE) == 1u32.to_le_bytes()
            && self.size() == key.size
            && usize::from(key.size) <= MAX_QUEUE_SIZE
            && self.get::<KEY_LEN>(AT_KEY) == key.encode();
        if !recorded {
            return Resume::Fresh;
        }
        let used_idx = self.get_u16(AT_USED_IDX);
        match ring_used.wrapping_sub(used_idx) {
            0 => {}
            // The last completion was published but its entry not yet cleared.
            1 => {
                let head = self.get_u16(AT_LAST_BATCH_HEAD);
                self.set_inflight(head, false);
                self.put_u16(AT_USED_IDX, ring_used);
            }
            _ => return Resume::Fresh,
        }
        let heads = self.marked_oldest_first();
        self.resumed = heads
            .iter()
            .map(|head| (*head, self.get_u64(Self::desc_at(*head) + 16)))
            .collect();
        // At most `size` heads can be marked, so this fits a u16.
        let next_avail = ring_used.wrapping_add(heads.len() as u16);
        Resume::Resubmit { heads, next_avail }
    }

    fn reset(&mut self, key: &RingKey, ring_used: u16) {
        self.map.fill(0);
        self.resumed.clear();
        self.put(AT_MAGIC, &REGION_MAGIC);
        self.put_u16(AT_SIZE, key.size.min(MAX_QUEUE_SIZE as u16));
        self.put_u16(AT_USED_IDX, ring_used);
        self.put(AT_KEY, &key.encode());
        self.put_u32(AT_ACTIVE, 1);
    }
}

/// Puts `head` on the used ring, recording it in `record` (if any) around the publication as
/// vhost-user prescribes, so a crash at any point leaves a record the next agent can repair.
pub(super) fn complete(
    state: &mut vhost_user_backend::VringState<Memory>,
    record: Option<&QueueRecord>,
    head: u16,
    used_len: u32,
) -> Result<(), virtio_queue::Error> {
    let Some(record) = record else {
        return state.add_used(head, used_len);
    };
    record.get().complete(head, || {
        let result = state.add_used(head, used_len);
        (result, virtio_queue::QueueT::next_used(state.get_queue()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RingKey {
        RingKey {
            memory: (1, 42),
            rings: (0x1000, 0x3000, 0x4000),
            size: 256,
        }
    }

    #[test]
    fn a_reopened_record_resubmits_what_was_in_flight_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inflight");
        {
            let file = InflightFile::open(&path, 2).unwrap();
            let queue = file.queue(1).unwrap();
            assert_eq!(queue.resume(key(), 10), Resume::Fresh);
            for head in [7, 3, 9, 5] {
                queue.begin(head);
            }
            // 3 and 5 complete; the used index moves 10 → 12.
            queue.complete(3, || ((), 11));
            queue.complete(5, || ((), 12));
            assert_eq!(queue.in_flight(), vec![7, 9]);
        } // the agent "dies": nothing cleared
        let file = InflightFile::open(&path, 2).unwrap();
        assert_eq!(
            file.queue(1).unwrap().resume(key(), 12),
            Resume::Resubmit {
                heads: vec![7, 9],
                next_avail: 14
            }
        );
        assert_eq!(
            file.queue(0).unwrap().resume(key(), 12),
            Resume::Fresh,
            "queue 0 was never tracked"
        );
    }

    #[test]
    fn a_crash_between_publishing_and_clearing_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inflight");
        let file = InflightFile::open(&path, 1).unwrap();
        let queue = file.queue(0).unwrap();
        queue.resume(key(), 0);
        queue.begin(4);
        queue.begin(6);
        // Head 4's element and the used index are published (0 → 1), then the agent dies.
        {
            let mut region = queue.region();
            region.put_u16(AT_LAST_BATCH_HEAD, 4);
        }
        drop(file);
        let file = InflightFile::open(&path, 1).unwrap();
        assert_eq!(
            file.queue(0).unwrap().resume(key(), 1),
            Resume::Resubmit {
                heads: vec![6],
                next_avail: 2
            },
            "4 reached the guest, so only 6 runs again"
        );
    }

    #[test]
    fn another_ring_a_strange_used_index_or_a_clear_start_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inflight");
        let file = InflightFile::open(&path, 1).unwrap();
        let queue = file.queue(0).unwrap();
        let track = |used| {
            queue.resume(key(), used);
            queue.begin(1);
        };
        track(5);
        let other_qemu = RingKey {
            memory: (1, 43),
            ..key()
        };
        assert_eq!(queue.resume(other_qemu, 5), Resume::Fresh);
        assert!(queue.in_flight().is_empty(), "a fresh record marks nothing");

        track(5);
        assert_eq!(queue.resume(key(), 9), Resume::Fresh, "used index jumped");

        track(5);
        queue.clear();
        assert_eq!(
            queue.resume(key(), 5),
            Resume::Fresh,
            "cleared on a clean stop"
        );
    }

    #[test]
    fn heads_beyond_the_queue_are_ignored_and_a_resized_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inflight");
        {
            let file = InflightFile::open(&path, 1).unwrap();
            let queue = file.queue(0).unwrap();
            queue.resume(key(), 0);
            queue.begin(300); // beyond size 256: not recorded
            queue.begin(2);
            assert_eq!(queue.in_flight(), vec![2]);
        }
        let file = InflightFile::open(&path, 2).unwrap();
        assert_eq!(file.queue(0).unwrap().resume(key(), 0), Resume::Fresh);
    }
}
