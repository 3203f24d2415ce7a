//! The running kernel's version: which helpers the programs may call
//! depends on it, and `waymark check` reports it.

/// `bpf_set_retval` for cgroup programs (a refused `connect()` gets the
/// error the program chose, not `EPERM`).
pub const SET_RETVAL_SINCE: (u32, u32) = (5, 18);

/// `bpf_get_current_pid_tgid` and `bpf_get_current_comm` for cgroup socket
/// programs (a connect refused at a limit names its process).
pub const PROCESS_INFO_SINCE: (u32, u32) = (6, 1);

/// The release string of the running kernel (`uname -r`); empty if it
/// cannot be read.
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `major.minor` of a release string such as `6.1.0-18-amd64`.
pub fn parse(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the running kernel is `since` or later (false if its version
/// cannot be read: the older behaviour is the safe one).
pub fn at_least(since: (u32, u32)) -> bool {
    parse(&release()).is_some_and(|v| v >= since)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert_eq!(parse("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse("5.15.0"), Some((5, 15)));
        assert_eq!(parse("garbage"), None);
        assert!(parse("5.18.0").is_some_and(|v| v >= SET_RETVAL_SINCE));
        assert!(parse("5.17.9").is_some_and(|v| v < SET_RETVAL_SINCE));
        assert!(parse("6.1.0-18-amd64").is_some_and(|v| v >= PROCESS_INFO_SINCE));
        assert!(parse("5.15.0").is_some_and(|v| v < PROCESS_INFO_SINCE));
    }
}
