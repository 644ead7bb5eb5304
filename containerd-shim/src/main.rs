//! `containerd-shim-gantry-v2`: containerd starts it (`start`, then it serves a socket), and
//! runs it with `delete` after a shim died. See the library's documentation.

use std::time::Duration;

use containerd_shim_gantry::RUNTIME_ID;
use containerd_shim_gantry::service::GantryShim;

fn main() {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{RUNTIME_ID}: starting the async runtime: {error}");
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<GantryShim>(
        RUNTIME_ID, None,
    ));
    // Once the shim is done, nothing may hold its exit: a blocking task stuck on a client
    // that never came would otherwise keep the process (and its socket) alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
}
