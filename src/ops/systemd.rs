//! `sd_notify` for `Type=notify` units: `READY=1` once the node is Online
//! and listening, `STOPPING=1` and a `STATUS=` line while it drains, and
//! `MAINPID=` so that systemd follows a zero-downtime upgrade to the new
//! process (the unit sets `NotifyAccess=all`). Without `$NOTIFY_SOCKET`
//! (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Send one notification to `$NOTIFY_SOCKET`; returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let path = path.to_string_lossy().into_owned();
    match notify_to(&path, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, socket = %path, "cannot notify systemd");
            false
        }
    }
}

/// Send `state` to the socket at `path` (`@name` = an abstract socket).
pub fn notify_to(path: &str, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// What `READY=1` says: this process (the unit's main process from now on).
pub fn ready_message() -> String {
    format!("READY=1\nMAINPID={}\nSTATUS=online", std::process::id())
}

/// The node is Online and listening.
pub fn ready() {
    notify(&ready_message());
}

/// The node is stopping; `status` says how.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={status}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), &ready_message()).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!("READY=1\nMAINPID={}\nSTATUS=online", std::process::id())
        );

        use std::os::linux::net::SocketAddrExt;
        let name = format!("sessionlb-test-{}", std::process::id());
        let abstract_addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to(dir.path().join("absent").to_str().unwrap(), "READY=1").is_err());
    }
}
