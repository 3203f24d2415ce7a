//! [`in_box!`]: a future put in a box without being built on the stack
//! first.
//!
//! Why: `Box::pin(future)` evaluates its argument before it allocates, so
//! the future is made in a temporary and then copied into the box — all
//! of its size, although only the values it captured are set yet. A
//! request's future is sized for its deepest await (~6 KiB on the
//! outbound side), so that copy was 0.9 % of the agent's CPU on one hop
//! (`perf`, bench/README.md). Allocating first and writing the future
//! into the allocation lets the compiler set the captured values in place
//! — an optimisation, not a guarantee; for the outbound request future the
//! copy's call site left the profile. It is a macro because a function
//! would take the future as an argument, built before the call: the order
//! of evaluation is the point.

/// `in_box!(future)`: `Pin<Box<_>>` of `future`, allocated before the
/// future is made.
macro_rules! in_box {
    ($future:expr $(,)?) => {
        ::std::boxed::Box::into_pin(::std::boxed::Box::write(
            ::std::boxed::Box::new_uninit(),
            $future,
        ))
    };
}

pub(crate) use in_box;

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;

    #[tokio::test]
    async fn the_boxed_future_runs_as_it_would_unboxed() {
        let captured = String::from("abc");
        let boxed = in_box!(async move {
            tokio::task::yield_now().await;
            captured.len()
        });
        // As the proxy uses it: behind a trait object.
        let boxed: Pin<Box<dyn Future<Output = usize> + Send>> = boxed;
        assert_eq!(boxed.await, 3);
    }
}
