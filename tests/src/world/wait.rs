//! Waiting for conditions instead of sleeping.

use std::time::{Duration, Instant};

/// How long [`eventually`] and `assert_eventually!` wait by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(10);

/// Calls `f` until it returns `Ok`, with short growing pauses, for at most
/// `patience`; then returns the last error, with how long it waited.
///
/// ```ignore
/// let opened = eventually(DEFAULT_PATIENCE, || {
///     let (_, body) = node.admin_get("/metrics")?;
///     metric_value(&body, "tcp_open_total", &[]).ok_or_else(|| anyhow!("no tcp_open_total yet"))
/// })?;
/// ```
pub fn eventually<T>(
    patience: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= patience => {
                return Err(e.context(format!("still failing after {patience:?}")));
            }
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Polls `cond` until it returns true or `patience` runs out; says which.
pub fn wait_until(patience: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= patience {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_returns_first_success() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), || {
            n += 1;
            if n < 3 {
                anyhow::bail!("not yet {n}")
            } else {
                Ok(n)
            }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn eventually_gives_up_with_last_error() {
        let e = eventually(Duration::from_millis(50), || -> anyhow::Result<()> {
            anyhow::bail!("never")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("never"), "{e:#}");
    }

    #[test]
    fn assert_eventually_passes_and_fails() {
        let mut n = 0;
        crate::assert_eventually!(
            {
                n += 1;
                n > 2
            },
            "n was {n}"
        );
        let r = std::panic::catch_unwind(|| {
            crate::assert_eventually!(patience = Duration::from_millis(30), 1 + 1 == 3);
        });
        assert!(r.is_err());
    }
}
