//! The access log: the record a worker sends when a pair closes (no formatting on the worker
//! thread), the line format (HAProxy tcplog style, documented in README), and the thread that
//! writes the lines through `log` with target `access`. Never blocks a worker: the channel is
//! bounded and a full channel drops the record (counted by the worker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::AppRuntime;
use crate::error::Error;
use crate::outcome::CloseReason;

/// Records queued for the writer before workers start dropping them.
pub const QUEUE: usize = 8192;

/// One closed pair, for the access log.
pub struct AccessRecord {
    pub app: Arc<AppRuntime>,
    pub client: SocketAddr,
    /// Index of the connected target in `app.targets`; `None` when no connect succeeded.
    pub target: Option<usize>,
    pub duration: Duration,
    pub connect_time: Duration,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub reason: CloseReason,
    /// The TLS server name the client asked for (SNI-routed apps), and its length.
    pub server_name: ([u8; 255], u8),
}

/// Start the writer thread. It ends once every sender is dropped and the queue is drained.
pub fn spawn() -> Result<(SyncSender<AccessRecord>, JoinHandle<()>), Error> {
    let (tx, rx) = mpsc::sync_channel::<AccessRecord>(QUEUE);
    let t = std::thread::Builder::new()
        .name("epoxy-access-log".into())
        .spawn(move || {
            while let Ok(r) = rx.recv() {
                log::info!(target: "access", "{}", line(&r));
            }
        })
        .map_err(|e| Error::io("spawn access-log thread", e))?;
    Ok((tx, t))
}

/// One access-log line:
/// `CLIENT [START] APP TARGET CONNECT_MS/DURATION_MS BYTES_UP BYTES_DOWN REASON`, and for
/// apps with SNI routes one more field, ` SERVER_NAME` (`-` when the client sent none).
pub fn line(r: &AccessRecord) -> String {
    let start = SystemTime::now()
        .checked_sub(r.duration)
        .unwrap_or(UNIX_EPOCH);
    let target = r
        .target
        .and_then(|t| r.app.targets.get(t))
        .map_or("-", |t| t.cfg.name.as_str());
    let name = &r.server_name.0[..r.server_name.1 as usize];
    let name = match std::str::from_utf8(name) {
        Ok(n) if !n.is_empty() => n,
        _ => "-",
    };
    let sni = if r.app.routes_by_sni() { " " } else { "" };
    format!(
        "{} [{}] {} {} {}/{} {} {} {}{sni}{}",
        r.client,
        rfc3339(start),
        r.app.cfg.name,
        target,
        r.connect_time.as_millis(),
        r.duration.as_millis(),
        r.bytes_to_upstream,
        r.bytes_to_client,
        r.reason.as_str(),
        if r.app.routes_by_sni() { name } else { "" },
    )
}

/// UTC time as "2026-11-22T15:50:01.123Z" (civil-from-days, no time-zone database).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_362_601_123);
        assert_eq!(rfc3339(t), "2026-11-22T15:50:01.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }
}
