//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): what a client
//! sends after the upgrade, through the same reader a connection uses.

use crate::reader::{ClientReader, Inbound};

/// Feeds `bytes` to a connection's reader as a client would send them, and reads
/// what it reports until it stops. Panics if the reader does: that is the finding.
pub fn client_bytes(bytes: &[u8]) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        // A byte slice reads to its end, then reports the end of the stream.
        let mut reader = ClientReader::new(bytes);
        while reader.next().await != Inbound::Closed {}
    });
}
