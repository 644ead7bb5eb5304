//! `containerd-shim-gantry-v2`: containerd starts it (`start`, then it serves a socket), and
//! runs it with `delete` after a shim died. See the library's documentation.

use containerd_shim_gantry::RUNTIME_ID;
use containerd_shim_gantry::service::GantryShim;

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<GantryShim>(RUNTIME_ID, None).await;
}
