//! Polling a future only after it has woken its task.
//!
//! A connection's task waits on several things at once — its sockets, the
//! agent's drain, its idle timer — and `select!` polls every branch on every
//! wake. The sockets wake it a few times per request; the drain and the
//! idle timer almost never fire, yet each poll of a cancellation token takes
//! two locks (the token's own, and its `Notify`'s to refresh the waker) and
//! each poll of a timer re-checks its entry. [`Gated`] polls the future it
//! wraps only once it woke the task itself (and on the first poll, which
//! registers it), so the wakes that are not its own cost a pointer
//! comparison and an atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

pin_project_lite::pin_project! {
    /// A future polled only when it woke its task (see the module's doc).
    pub struct Gated<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
        // The waker `inner` is polled with: wakes `gate`.
        own: Waker,
        // The task's waker that `gate` wakes, as last registered.
        task: Option<Waker>,
    }
}

/// What `inner`'s wake reaches: a flag, and the task to wake.
struct Gate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = task.as_ref() {
            t.wake_by_ref();
        }
    }
}

impl<F: Future> Gated<F> {
    pub fn new(inner: F) -> Self {
        // Woken until first polled, so that the first poll registers `inner`.
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Gated {
            inner,
            own: Waker::from(gate.clone()),
            gate,
            task: None,
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The task's waker rarely changes (the same task polls this until
        // it ends); when it does, `gate` learns it before the flag is read,
        // so a wake racing the change is seen below or wakes the new waker.
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            *this.task = Some(cx.waker().clone());
            *this.gate.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        }
        if !this.gate.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.gate.woken.store(false, Ordering::Release);
        this.inner.poll(&mut Context::from_waker(this.own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_cancellation_gets_through_the_gate() {
        let token = CancellationToken::new();
        let gated = Gated::new(token.clone().cancelled_owned());
        let cancel = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                token.cancel();
            })
        };
        tokio::time::timeout(Duration::from_secs(5), gated)
            .await
            .expect("the gated future saw its cancellation");
        cancel.await.unwrap();
    }

    #[tokio::test]
    async fn a_timer_fires_through_the_gate_beside_a_busy_branch() {
        // The other branch wakes the task over and over; the gated timer
        // is not polled on those wakes, yet fires when it is due.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let feeder = tokio::spawn(async move {
            for i in 0.. {
                if tx.send(i).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        let timer = Gated::new(tokio::time::sleep(Duration::from_millis(50)));
        tokio::pin!(timer);
        let mut received = 0u32;
        let fired = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    Some(_) = rx.recv() => received += 1,
                    () = &mut timer => break,
                }
            }
        })
        .await;
        assert!(fired.is_ok(), "the gated timer never fired");
        assert!(received > 0, "the busy branch never ran");
        drop(rx);
        feeder.await.unwrap();
    }

    #[test]
    fn not_polled_again_until_it_wakes() {
        // Counts the inner future's polls: one to register, then none for
        // wakes that are not its own, then one after its own wake.
        struct Counting {
            polls: Arc<std::sync::atomic::AtomicUsize>,
            waker: Arc<Mutex<Option<Waker>>>,
        }
        impl Future for Counting {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.polls.fetch_add(1, Ordering::Relaxed);
                *self.waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inner_waker = Arc::new(Mutex::new(None));
        let mut gated = Box::pin(Gated::new(Counting {
            polls: polls.clone(),
            waker: inner_waker.clone(),
        }));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
