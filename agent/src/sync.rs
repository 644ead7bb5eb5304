//! Locking that survives a panicked holder.
//!
//! The agent's mutexes guard plain bookkeeping (tables, queues, counters) whose every update is
//! complete before the lock is released, so a panic elsewhere while holding one leaves nothing
//! half-written: taking the data over is right, and one panicked request must not wedge a VM.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking the data over if a previous holder panicked.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
