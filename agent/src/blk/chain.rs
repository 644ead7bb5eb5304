//! A descriptor chain read again from its head index, for a request resubmitted after a restart.
//!
//! `virtio-queue` builds chains only from the available ring, but a request in flight when the
//! previous agent stopped is found by its head in the inflight record (see `inflight`): its
//! descriptors are still in the table (the driver does not touch them until the head is used).
//! This walks them exactly as `virtio_queue::DescriptorChain` does: the same bounds, one level
//! of indirection, a time-to-live against loops, 4 GiB at most in total.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Size of one descriptor in a table.
const DESC_SIZE: u64 = 16;

/// The descriptors of the chain starting at `head` in the table at `desc_table` of a queue of
/// `queue_size`, or `None` when the guest's table does not hold a valid chain there.
pub(super) fn descriptors_at<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Option<Vec<Descriptor>> {
    let mut table = desc_table;
    let mut table_size = queue_size;
    let mut index = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut total_len: u32 = 0;
    let mut chain = Vec::new();
    loop {
        if ttl == 0 || index >= table_size {
            return None;
        }
        let at = table.checked_add(u64::from(index) * DESC_SIZE)?;
        let desc: Descriptor = mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            if indirect || !desc.len().is_multiple_of(DESC_SIZE as u32) {
                return None;
            }
            let entries = desc.len() / DESC_SIZE as u32;
            table = desc.addr();
            table_size = u16::try_from(entries).ok()?;
            index = 0;
            ttl = table_size;
            indirect = true;
            continue;
        }
        total_len = total_len.checked_add(desc.len())?;
        let has_next = desc.has_next();
        chain.push(desc);
        if !has_next {
            return Some(chain);
        }
        index = desc.next();
        ttl -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const INDIRECT: u64 = 0x2000;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, index: u16, desc: Descriptor) {
        mem.write_obj(desc, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    fn addrs(chain: &[Descriptor]) -> Vec<u64> {
        chain.iter().map(|d| d.addr().raw_value()).collect()
    }

    #[test]
    fn direct_and_indirect_chains_read_as_virtio_queue_reads_them() {
        let mem = memory();
        put(&mem, TABLE, 5, Descriptor::new(0x100, 16, N, 9));
        put(&mem, TABLE, 9, Descriptor::new(0x200, 4096, W | N, 2));
        put(&mem, TABLE, 2, Descriptor::new(0x300, 1, W, 0));
        let chain = descriptors_at(&mem, GuestAddress(TABLE), 16, 5).unwrap();
        assert_eq!(addrs(&chain), [0x100, 0x200, 0x300]);

        put(&mem, TABLE, 7, Descriptor::new(INDIRECT, 32, I, 0));
        put(&mem, INDIRECT, 0, Descriptor::new(0x400, 16, N, 1));
        put(&mem, INDIRECT, 1, Descriptor::new(0x500, 1, W, 0));
        let chain = descriptors_at(&mem, GuestAddress(TABLE), 16, 7).unwrap();
        assert_eq!(addrs(&chain), [0x400, 0x500]);
    }

    #[test]
    fn loops_bad_indexes_and_nested_indirection_are_refused() {
        let mem = memory();
        put(&mem, TABLE, 0, Descriptor::new(0x100, 16, N, 1));
        put(&mem, TABLE, 1, Descriptor::new(0x100, 16, N, 0));
        assert!(
            descriptors_at(&mem, GuestAddress(TABLE), 4, 0).is_none(),
            "a loop"
        );
        assert!(
            descriptors_at(&mem, GuestAddress(TABLE), 4, 4).is_none(),
            "head past the queue"
        );
        put(&mem, TABLE, 2, Descriptor::new(0x100, 16, N, 40));
        assert!(
            descriptors_at(&mem, GuestAddress(TABLE), 4, 2).is_none(),
            "next past the queue"
        );
        put(&mem, TABLE, 3, Descriptor::new(INDIRECT, 16, I, 0));
        put(&mem, INDIRECT, 0, Descriptor::new(INDIRECT, 16, I, 0));
        assert!(
            descriptors_at(&mem, GuestAddress(TABLE), 4, 3).is_none(),
            "nested indirect"
        );
        put(&mem, TABLE, 3, Descriptor::new(INDIRECT, 20, I, 0));
        assert!(
            descriptors_at(&mem, GuestAddress(TABLE), 4, 3).is_none(),
            "odd table length"
        );
        assert!(
            descriptors_at(&mem, GuestAddress(0xffff_0000), 4, 0).is_none(),
            "table outside memory"
        );
    }
}
