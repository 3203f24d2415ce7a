//! Macros for world tests: skipping where the world cannot run, and waiting
//! for a condition instead of sleeping.

/// The path of the function this is expanded in.
#[doc(hidden)]
#[macro_export]
macro_rules! __test_name {
    () => {{
        fn here() {}
        let name = ::std::any::type_name_of_val(&here);
        name.strip_suffix("::here").unwrap_or(name)
    }};
}

/// The name of the enclosing function (closures skipped), to name a world
/// after its test: `World::builder(world_name!())`.
#[macro_export]
macro_rules! world_name {
    () => {{
        $crate::__test_name!()
            .rsplit("::")
            .find(|s| !s.starts_with('{'))
            .unwrap_or("world")
    }};
}

/// Returns early from a test that needs the test world when it cannot run
/// here (not root, no cgroup v2, no `ip`), after saying why on stderr.
///
/// When the environment variable `CI` is set (and not empty), it panics
/// instead: on the project's machines and in CI these tests must run.
///
/// `require_root_or_skip!()` is for tests returning `()`;
/// `require_root_or_skip!(Ok(()))` for tests returning a `Result`.
#[macro_export]
macro_rules! require_root_or_skip {
    () => {
        $crate::require_root_or_skip!(())
    };
    ($ret:expr) => {
        if let Some(reason) = $crate::world::skip_reason() {
            if $crate::world::in_ci() {
                panic!("this test needs the test world, which cannot run here: {reason} (CI is set, so this is a failure, not a skip)");
            }
            eprintln!("SKIPPED {}: {reason}", $crate::__test_name!());
            return $ret;
        }
    };
}

/// Like [`require_root_or_skip!`], and also returns early when the `waymark`
/// binary is missing or older than the agent's sources (build it with
/// `cargo build -p waymark-agent`; `cargo test` of the whole workspace does).
/// With `CI` set, it panics instead.
#[macro_export]
macro_rules! require_agent_or_skip {
    () => {
        $crate::require_agent_or_skip!(())
    };
    ($ret:expr) => {
        $crate::require_root_or_skip!($ret);
        if let Err(e) = $crate::world::agent::waymark_bin() {
            if $crate::world::in_ci() {
                panic!("this test needs the waymark agent: {e:#} (CI is set, so this is a failure, not a skip)");
            }
            eprintln!("SKIPPED {}: {e:#}", $crate::__test_name!());
            return $ret;
        }
    };
}

/// Polls a boolean condition until it holds, panicking after the patience
/// runs out (default [`DEFAULT_PATIENCE`](crate::DEFAULT_PATIENCE), 10 s).
///
/// ```ignore
/// assert_eventually!(node.agent_log().contains("ready"));
/// assert_eventually!(n > 3, "only {n} connections");
/// assert_eventually!(patience = Duration::from_secs(30), done(), "not done");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (patience = $patience:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(patience = $patience, $cond, "{}", stringify!($cond))
    };
    (patience = $patience:expr, $cond:expr, $($msg:tt)+) => {{
        let patience: ::std::time::Duration = $patience;
        let start = ::std::time::Instant::now();
        let mut pause = ::std::time::Duration::from_millis(20);
        loop {
            if $cond {
                break;
            }
            if start.elapsed() >= patience {
                panic!(
                    "condition did not hold within {:?}: {}",
                    patience,
                    format!($($msg)+)
                );
            }
            ::std::thread::sleep(pause);
            pause = (pause * 2).min(::std::time::Duration::from_millis(200));
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(patience = $crate::DEFAULT_PATIENCE, $cond)
    };
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(patience = $crate::DEFAULT_PATIENCE, $cond, $($msg)+)
    };
}
