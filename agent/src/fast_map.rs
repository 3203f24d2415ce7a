//! The hash map of the tables looked up on every request: the service
//! table, the request series cache, the `waymark stat` edges and the HTTP
//! connection pool.
//!
//! Why not `std`'s default: SipHash-1-3 is built to resist hash flooding
//! at any table size, and costs accordingly — it was about 1 % of the
//! agent's CPU on the one-hop HTTP path (five lookups per request, keys of
//! socket addresses and short strings). foldhash is several times faster
//! on such keys and is what `hashbrown` (std's map underneath) uses by
//! default. Its `fast::RandomState` is seeded per map from a per-process
//! random seed, so collisions cannot be precomputed offline; and none of
//! these tables can be grown by a pod beyond a bound (the series and edge
//! tables are capped, the service table and the pool are keyed by what
//! the agent's own configuration or discovery admitted), so flooding one
//! would cost at most a bounded table's worth of probing.

use std::collections::HashMap;

/// A `HashMap` with foldhash's randomly seeded hasher.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
