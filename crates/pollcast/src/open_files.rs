//! The open-files limit: every WebSocket is a file descriptor, and so is every
//! REST request, database connection and the NATS link. A node that lets
//! WebSockets take every descriptor stops answering `/healthz` and REST with
//! nothing logged; this module makes the limit explicit at start-up instead.

/// Descriptors kept for everything but WebSockets: the listener, REST requests in
/// flight, the database pool, NATS, log and data files.
pub const RESERVED: u64 = 256;

/// Raises the soft open-files limit to the hard one and returns how many
/// WebSocket connections fit under it: `wanted`, or fewer (with a warning) when
/// the limit is too low. On platforms without limits, `wanted` as it is.
pub fn websocket_budget(wanted: usize, database_connections: u32) -> usize {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(err) => {
            tracing::warn!(error = %err, "could not raise the open-files limit");
            match rlimit::getrlimit(rlimit::Resource::NOFILE) {
                Ok((soft, _)) => soft,
                Err(_) => return wanted,
            }
        }
    };
    let reserved = RESERVED + u64::from(database_connections);
    let fits = usize::try_from(soft.saturating_sub(reserved)).unwrap_or(usize::MAX);
    if fits < wanted {
        tracing::warn!(
            open_files_limit = soft,
            reserved,
            max_connections = wanted,
            capped_to = fits,
            "--max-connections does not fit under the open-files limit (ulimit -n); \
             WebSocket connections are capped so REST and the database keep descriptors. \
             Raise the limit (LimitNOFILE=, ulimit -n) or lower --max-connections"
        );
        return fits;
    }
    tracing::info!(
        open_files_limit = soft,
        max_connections = wanted,
        "open-files limit"
    );
    wanted
}
