//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): what a client
//! sends after the upgrade, through the same reader a connection uses.

use fastwebsockets::{Role, WebSocket};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::reader;

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
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (read, _write) =
            WebSocket::after_handshake(server, Role::Server).split(tokio::io::split);
        let (tx, mut rx) = mpsc::channel(64);
        let reader = tokio::spawn(reader::run(read, tx));
        let send = async {
            let _ = client.write_all(bytes).await;
            drop(client);
        };
        let drain = async { while rx.recv().await.is_some() {} };
        tokio::join!(send, drain);
        if let Err(err) = reader.await
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
    });
}
