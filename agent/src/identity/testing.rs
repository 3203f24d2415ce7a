//! Test fixtures: a development CA in memory, a store, identities.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::init::DevCa;
use super::{CertStore, Issuer, SpiffeId, TrustBundle};

pub const TD: &str = "cluster.local";

pub struct Pki {
    pub issuer: Arc<Issuer>,
    pub store: Arc<CertStore>,
}

impl Pki {
    /// A fresh trust anchor (each call is a different CA).
    pub fn new() -> Self {
        let issuer = DevCa::generate(TD)
            .expect("dev CA")
            .issuer()
            .expect("issuer");
        Self {
            issuer: Arc::new(issuer),
            store: Arc::new(CertStore::new()),
        }
    }

    pub fn bundle(&self) -> &TrustBundle {
        self.issuer.bundle()
    }

    /// Mints and installs a leaf for `ns/sa`, returning its ID.
    pub fn identity(&self, ns: &str, sa: &str) -> SpiffeId {
        let id = SpiffeId::new(TD, ns, sa).expect("valid id");
        self.store.rotate(&self.issuer, &id).expect("leaf");
        id
    }

    /// Installs an already-expired leaf for `ns/sa`.
    pub fn expired_identity(&self, ns: &str, sa: &str) -> SpiffeId {
        let id = SpiffeId::new(TD, ns, sa).expect("valid id");
        let now = SystemTime::now();
        let leaf = self
            .issuer
            .issue_with_validity(
                &id,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .expect("leaf");
        self.store.insert(leaf).expect("insert");
        id
    }
}
