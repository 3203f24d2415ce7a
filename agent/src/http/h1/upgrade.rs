//! HTTP/1.1 upgrades (WebSocket): after a `101 Switching Protocols` the
//! client's connection is handed, with any bytes the client sent after its
//! request head, to whoever asked for it with [`on`].
//!
//! The same call serves a request that hyper parsed (the inbound side's
//! tunnel streams), so the forwarding code has one way to ask.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::transport::rewind::Rewind;

/// Any byte stream a connection can be upgraded from.
pub trait UpgradeIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpgradeIo for T {}

/// The client's connection after a `101`: the bytes it sent after its
/// request head (read already) come first, then the connection.
pub type Upgraded = Rewind<Box<dyn UpgradeIo>>;

/// A request's way to its connection once upgraded (a request extension
/// the HTTP/1 server adds to a request asking for an upgrade; extensions
/// must be `Clone`, hence the shared slot).
#[derive(Clone)]
pub(super) struct OnUpgrade(pub(super) Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

/// Why a connection was not upgraded.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the request cannot be upgraded")]
    NotUpgradable,
    #[error("the connection closed before the upgrade")]
    Closed,
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// The request's connection, once the `101` answering it has been
/// written. Taken from the request at once (like `hyper::upgrade::on`),
/// so the request can go on its way.
pub fn on<B>(
    req: &mut http::Request<B>,
) -> impl std::future::Future<Output = Result<Upgraded, UpgradeError>> + Send + use<B> {
    let own = take_own(req.extensions_mut());
    let theirs = own.is_none().then(|| hyper::upgrade::on(req));
    async move {
        match (own, theirs) {
            (Some(rx), _) => rx
                .ok_or(UpgradeError::NotUpgradable)?
                .await
                .map_err(|_| UpgradeError::Closed),
            (None, Some(on)) => {
                let upgraded = on.await?;
                let io: Box<dyn UpgradeIo> = Box::new(TokioIo::new(upgraded));
                Ok(Rewind::new(Bytes::new(), io))
            }
            (None, None) => Err(UpgradeError::NotUpgradable),
        }
    }
}

/// The receiver of a connection the proxy's own codec upgrades, when the
/// message is one of its own (`Some(None)`: taken already).
fn take_own(ext: &mut http::Extensions) -> Option<Option<oneshot::Receiver<Upgraded>>> {
    ext.remove::<OnUpgrade>()
        .map(|own| own.0.lock().unwrap_or_else(|e| e.into_inner()).take())
}

/// The upstream connection of a `101` response the proxy's HTTP/1
/// client read.
pub fn on_response<B>(
    resp: &mut http::Response<B>,
) -> impl std::future::Future<Output = Result<Upgraded, UpgradeError>> + Send + use<B> {
    let own = take_own(resp.extensions_mut());
    async move {
        own.flatten()
            .ok_or(UpgradeError::NotUpgradable)?
            .await
            .map_err(|_| UpgradeError::Closed)
    }
}
