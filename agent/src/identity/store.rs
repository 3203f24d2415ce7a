//! The certificate store: the current leaf of every workload identity on
//! this node, swapped atomically on rotation.
//!
//! Handshakes read the current leaf through [`CertStore::current`] each time
//! (the rustls resolvers in `tls.rs` do), so a rotation affects only TLS
//! handshakes that start after it; connections already established keep the
//! keys they negotiated and are not disturbed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use thiserror::Error;

use super::issuer::{Issuer, IssuerError, Leaf};
use super::spiffe::SpiffeId;

/// Rotate once this fraction of a leaf's lifetime has passed: half leaves
/// room for several failed attempts before the old leaf expires.
pub const ROTATE_AT_FRACTION: f64 = 0.5;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Issue(#[from] IssuerError),
    #[error("leaf for {id} is unusable by rustls: {source}")]
    Key {
        id: SpiffeId,
        #[source]
        source: Box<rustls::Error>,
    },
}

/// A leaf ready for handshakes.
#[derive(Debug)]
pub struct CurrentLeaf {
    pub leaf: Leaf,
    pub(crate) certified: Arc<CertifiedKey>,
}

/// Expiry facts for one identity (the `/ready` check and a metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    pub rotate_after: SystemTime,
}

#[derive(Debug, Default)]
pub struct CertStore {
    leaves: RwLock<HashMap<SpiffeId, Arc<CurrentLeaf>>>,
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs (or replaces) the leaf for its identity.
    pub fn insert(&self, leaf: Leaf) -> Result<Arc<CurrentLeaf>, StoreError> {
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(leaf.chain.clone(), leaf.private_key(), &provider)
            .map_err(|source| StoreError::Key {
            id: leaf.id.clone(),
            source: Box::new(source),
        })?;
        let current = Arc::new(CurrentLeaf {
            leaf,
            certified: Arc::new(certified),
        });
        self.write()
            .insert(current.leaf.id.clone(), current.clone());
        Ok(current)
    }

    /// Mints a fresh leaf for `id` and swaps it in.
    pub fn rotate(&self, issuer: &Issuer, id: &SpiffeId) -> Result<Arc<CurrentLeaf>, StoreError> {
        self.insert(issuer.issue(id)?)
    }

    pub fn current(&self, id: &SpiffeId) -> Option<Arc<CurrentLeaf>> {
        self.read().get(id).cloned()
    }

    /// True when `id` has no leaf or its leaf is past the rotation point.
    pub fn needs_rotation(&self, id: &SpiffeId, now: SystemTime) -> bool {
        self.current(id)
            .is_none_or(|c| now >= rotate_after(&c.leaf))
    }

    /// Expiry of every leaf, sorted by identity.
    pub fn expiries(&self) -> Vec<Expiry> {
        let mut out: Vec<Expiry> = self
            .read()
            .values()
            .map(|c| Expiry {
                id: c.leaf.id.clone(),
                serial: c.leaf.serial.clone(),
                not_after: c.leaf.not_after,
                rotate_after: rotate_after(&c.leaf),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    // A poisoned lock only means a panic elsewhere mid-insert of an Arc;
    // the map itself is still consistent, so keep serving.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<CurrentLeaf>>> {
        self.leaves.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<CurrentLeaf>>> {
        self.leaves.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// `ROTATE_AT_FRACTION` of the time between minting and expiry. Counting
/// from `not_before` instead would include the clock-skew backdating, and a
/// leaf living less than twice that (tests use seconds) would be due at once.
fn rotate_after(leaf: &Leaf) -> SystemTime {
    let usable = leaf
        .not_after
        .duration_since(leaf.issued_at)
        .unwrap_or_default();
    leaf.issued_at + Duration::from_secs_f64(usable.as_secs_f64() * ROTATE_AT_FRACTION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::init::DevCa;

    #[test]
    fn rotation_is_due_at_half_life_and_swaps_the_leaf() {
        let issuer = DevCa::generate("cluster.local")
            .unwrap()
            .issuer()
            .unwrap()
            .with_lifetime(Duration::from_secs(1000));
        let store = CertStore::new();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        assert!(store.needs_rotation(&id, SystemTime::now()));
        let first = store.rotate(&issuer, &id).unwrap();
        // Half of the time from minting to expiry (the backdated
        // clock-skew allowance before "now" does not count).
        let issued = first.leaf.issued_at;
        let half = issued + first.leaf.not_after.duration_since(issued).unwrap() / 2;
        // About 500 s after minting, not ~650 s (half of lifetime + skew).
        assert!(half.duration_since(issued).unwrap() <= Duration::from_secs(500));
        assert!(!store.needs_rotation(&id, half - Duration::from_secs(1)));
        let half = half + Duration::from_millis(1);
        assert!(store.needs_rotation(&id, half));

        assert!(!store.needs_rotation(&id, SystemTime::now()));
        store.rotate(&issuer, &id).unwrap();
        let second = store.current(&id).unwrap();
        assert_ne!(second.leaf.serial, first.leaf.serial);
        // A holder of the old Arc (an open connection) still has its leaf.
        assert_eq!(first.leaf.id, id);
        let exp = store.expiries();
        assert_eq!(exp.len(), 1);
        assert_eq!(exp[0].serial, second.leaf.serial);
        assert_eq!(exp[0].not_after, second.leaf.not_after);
    }
}
