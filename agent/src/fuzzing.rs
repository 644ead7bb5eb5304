//! Entry points of the agent's fuzz targets (`agent/fuzz/`), also called by the corpus
//! regression test (`agent/tests/fuzz_corpus.rs`). The properties live next to the code they
//! exercise: [`crate::blk::fuzzing`] (virtio-blk chains parsed and executed over a hostile
//! queue) and [`crate::vsock::fuzzing`] (hostile guest packets against the connection table).
//!
//! Not part of the crate's API (`#[doc(hidden)]`): only the fuzz targets and tests call it.

pub use crate::blk::fuzzing::{BlkOutcome, check_blk_input};
pub use crate::vsock::fuzzing::{VsockOutcome, check_vsock_input};
