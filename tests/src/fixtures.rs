//! Shared setups for the world tests: the worlds and agent configs that
//! many test files need, written once.
//!
//! Most tests that cross nodes want the same world: two nodes with mTLS on,
//! a client in pod (0, 0) and a service whose endpoint is a pod on node 1,
//! so that node 0's agent carries the traffic through the tunnel to node
//! 1's. [`meshed_pair`] builds that world from a list of [`Service`]s; other
//! worlds (one node, three nodes, no mTLS) take the same services through
//! [`services_toml`] and [`WorldBuilder::agent_config_extra`].
//!
//! Services are values rather than TOML text because the agent config's
//! `[[services]]` is an array, and arrays *replace* when extra TOML is
//! merged: every service of a world has to be in one piece of TOML, which
//! is what [`services_toml`] (and so [`meshed_pair`]) writes. Give other
//! tables (`[limits]`, `[proxy]`, …) in an `agent_config_extra` of their own.
//!
//! ```no_run
//! use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
//! let web = Service::new("web", "10.96.0.50:80")
//!     .protocol("http1")
//!     .endpoint(Endpoint::meshed(1, 0, 8080));
//! let builder = meshed_pair("my_test", 1, &[web])
//!     .agent_config_extra("[limits]\nidle_timeout = \"2s\"\n");
//! ```

use std::fmt;

use toml::{Table, Value};

use crate::world::{World, WorldBuilder, agent, topology};

/// Two nodes with mTLS on, `pods_per_node` pods each, and `services` in
/// every agent's config: the world of the tests that send from node 0 to a
/// pod on node 1 through the tunnel. Chain more on the builder
/// (`agent_config_extra` for other tables, `agent_config`, `mtls_*`), but
/// not another `[[services]]`: it would replace these.
pub fn meshed_pair(name: &str, pods_per_node: usize, services: &[Service]) -> WorldBuilder {
    let builder = World::builder(name)
        .nodes(2)
        .pods_per_node(pods_per_node)
        .mtls(true);
    if services.is_empty() {
        builder
    } else {
        builder.agent_config_extra(services_toml(services))
    }
}

/// The TOML of `services`, one `[[services]]` entry each, for
/// [`WorldBuilder::agent_config_extra`] (all of a world's services in one
/// call: see the module's doc).
pub fn services_toml(services: &[Service]) -> String {
    services.iter().map(Service::to_string).collect()
}

/// Removes pod `j`'s identity from a node's agent config (in
/// [`WorldBuilder::agent_config`]): that pod's traffic is carried in
/// plaintext, the tests' control for what the tunnel hides.
pub fn without_identity(cfg: &mut Table, j: usize) {
    if let Some(Value::Array(pods)) = cfg.get_mut("pods")
        && let Some(Value::Table(p)) = pods.get_mut(j)
    {
        p.remove("identity");
    }
}

/// Merges `text` into an agent config (tables key by key, other values
/// replace, as [`WorldBuilder::agent_config_extra`] does), for the edits
/// of one node in [`WorldBuilder::agent_config`] or
/// [`crate::Node::update_config`], whose closures cannot return an error:
/// TOML a test wrote that does not parse is a bug in the test, so it panics.
pub fn merge_toml(cfg: &mut Table, text: &str) {
    let over: Table = text
        .parse()
        .unwrap_or_else(|e| panic!("the test's TOML does not parse: {e}\n{text}"));
    agent::merge(cfg, over);
}

/// One `[[services]]` entry of the agent config; [`fmt::Display`] writes
/// its TOML, with `endpoints = []` when it has none (the agent reads that
/// as it reads no `endpoints` at all).
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    addresses: Vec<String>,
    protocol: Option<String>,
    endpoints: Vec<Endpoint>,
    retry_budget: Option<(f64, u32)>,
    routes: Vec<String>,
}

impl Service {
    /// The service `name` at `address` (a virtual `ip:port`), with no
    /// endpoints yet and the agent's protocol detection.
    pub fn new(name: &str, address: &str) -> Self {
        Self::backend(name).address(address)
    }

    /// The service `name` with no address of its own: only reachable as
    /// a route's backend (`backends = [{ service = "<name>" }]`).
    pub fn backend(name: &str) -> Self {
        Self {
            name: name.to_string(),
            addresses: Vec::new(),
            protocol: None,
            endpoints: Vec::new(),
            retry_budget: None,
            routes: Vec::new(),
        }
    }

    /// The service answers at `address` (too).
    pub fn address(mut self, address: &str) -> Self {
        self.addresses.push(address.to_string());
        self
    }

    /// `protocol = "<protocol>"` (`opaque`, `http1`, `http2`, `grpc`)
    /// instead of detection.
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.to_string());
        self
    }

    /// One more endpoint, after those already given.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// More endpoints, in order.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = Endpoint>) -> Self {
        self.endpoints.extend(endpoints);
        self
    }

    /// `retry_budget = { ratio = <ratio>, min_per_second = <n>, ttl =
    /// "10s" }`: over the last 10 s, the retries may number `ratio` times
    /// the requests plus `min_per_second` for each second. Tests whose
    /// every request needs a retry give `(1.0, 10)`; `(0.0, 0)` allows none.
    pub fn retry_budget(mut self, ratio: f64, min_per_second: u32) -> Self {
        self.retry_budget = Some((ratio, min_per_second));
        self
    }

    /// A route `all` (it matches every request) that retries what `on`
    /// names (`5xx`, `unavailable`, `connect-failure`) up to `attempts`
    /// times, backing off from `backoff_base` to `backoff_max`: the usual
    /// retrying service of the tests.
    pub fn retry_all(self, attempts: u32, on: &str, backoff_base: &str, backoff_max: &str) -> Self {
        let route = format!(
            "name = \"all\"\nretry = {{ attempts = {attempts}, on = [{}], backoff_base = {}, backoff_max = {} }}",
            quoted(on),
            quoted(backoff_base),
            quoted(backoff_max)
        );
        self.route(&route)
    }

    /// A `[[services.routes]]` of this service, its keys as TOML lines
    /// (`name = "slow"`, `matches = …`, `retry = …`): routes are what a
    /// test is about, so they stay in the agent's own words. They keep the
    /// order they are given in, which is the order the agent matches them.
    pub fn route(mut self, toml_keys: &str) -> Self {
        self.routes.push(toml_keys.trim().to_string());
        self
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n[[services]]")?;
        writeln!(f, "name = {}", quoted(&self.name))?;
        if !self.addresses.is_empty() {
            let addresses: Vec<String> = self.addresses.iter().map(|a| quoted(a)).collect();
            writeln!(f, "addresses = [{}]", addresses.join(", "))?;
        }
        if let Some(p) = &self.protocol {
            writeln!(f, "protocol = {}", quoted(p))?;
        }
        let endpoints: Vec<String> = self.endpoints.iter().map(Endpoint::to_string).collect();
        writeln!(f, "endpoints = [{}]", endpoints.join(", "))?;
        if let Some((ratio, min_per_second)) = self.retry_budget {
            writeln!(
                f,
                "retry_budget = {{ ratio = {ratio:?}, min_per_second = {min_per_second}, ttl = \"10s\" }}"
            )?;
        }
        for route in &self.routes {
            writeln!(f, "[[services.routes]]\n{route}")?;
        }
        Ok(())
    }
}

/// One endpoint of a [`Service`]; [`fmt::Display`] writes its inline table.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addr: String,
    node: Option<usize>,
    pod: Option<String>,
    weight: Option<u32>,
}

impl Endpoint {
    /// An endpoint at `addr` (`ip:port`) that names no node: the agent
    /// that picks it connects to it directly, never through the tunnel.
    pub fn at(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            node: None,
            pod: None,
            weight: None,
        }
    }

    /// Pod `j` of node `i` on `port`, naming no node (reached directly),
    /// its address known before the world exists.
    pub fn pod(i: usize, j: usize, port: u16) -> Self {
        Self::at(&format!("{}:{port}", topology::pod_ip(i, j)))
    }

    /// Pod `j` of node `i` on `port`, naming node `i`: with mTLS an agent on
    /// another node carries its traffic through the tunnel to node `i`'s.
    pub fn meshed(i: usize, j: usize, port: u16) -> Self {
        Self::pod(i, j, port).on_node(i)
    }

    /// `node = "node<i>"`: the endpoint runs on node `i`.
    pub fn on_node(mut self, i: usize) -> Self {
        self.node = Some(i);
        self
    }

    /// `pod = "<name>"` (`default/n1p0`): the pod the endpoint belongs to.
    pub fn of_pod(mut self, name: &str) -> Self {
        self.pod = Some(name.to_string());
        self
    }

    /// `weight = <w>`: how big the balancer takes it to be (1 when unset).
    pub fn weight(mut self, w: u32) -> Self {
        self.weight = Some(w);
        self
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{ addr = {}", quoted(&self.addr))?;
        if let Some(i) = self.node {
            write!(f, ", node = {}", quoted(&format!("node{i}")))?;
        }
        if let Some(pod) = &self.pod {
            write!(f, ", pod = {}", quoted(pod))?;
        }
        if let Some(w) = self.weight {
            write!(f, ", weight = {w}")?;
        }
        write!(f, " }}")
    }
}

/// `s` as a TOML string, escaped as TOML wants.
fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(services: &[Service]) -> Table {
        services_toml(services)
            .parse()
            .expect("the services' TOML parses")
    }

    #[test]
    fn a_meshed_service_is_written_as_the_agent_reads_it() {
        let web = Service::new("web", "10.96.0.50:80")
            .protocol("http1")
            .endpoint(Endpoint::meshed(1, 0, 8080));
        let want: Table = r#"
[[services]]
name = "web"
addresses = ["10.96.0.50:80"]
protocol = "http1"
endpoints = [ { addr = "10.2.0.2:8080", node = "node1" } ]
"#
        .parse()
        .unwrap();
        assert_eq!(parsed(&[web]), want);
    }

    #[test]
    fn budgets_routes_and_endpoint_keys_stay_with_their_service() {
        let services = [
            Service::new("web", "10.96.0.40:80")
                .endpoint(Endpoint::meshed(1, 0, 8080))
                .endpoint(Endpoint::meshed(1, 1, 8080).weight(100))
                .retry_budget(1.0, 10)
                .retry_all(2, "5xx", "2ms", "10ms")
                .route("name = \"slow\"\ntimeout = \"1s\"\n"),
            Service::new("gone", "10.96.0.62:80")
                .address("10.96.0.63:80")
                .endpoint(Endpoint::at("10.2.0.250:8080").of_pod("default/gone-1")),
            Service::new("empty", "10.96.0.64:80"),
            Service::backend("v2").endpoint(Endpoint::pod(1, 1, 8080)),
        ];
        let want: Table = r#"
[[services]]
name = "web"
addresses = ["10.96.0.40:80"]
endpoints = [ { addr = "10.2.0.2:8080", node = "node1" }, { addr = "10.2.0.3:8080", node = "node1", weight = 100 } ]
retry_budget = { ratio = 1.0, min_per_second = 10, ttl = "10s" }
[[services.routes]]
name = "all"
retry = { attempts = 2, on = ["5xx"], backoff_base = "2ms", backoff_max = "10ms" }
[[services.routes]]
name = "slow"
timeout = "1s"
[[services]]
name = "gone"
addresses = ["10.96.0.62:80", "10.96.0.63:80"]
endpoints = [ { addr = "10.2.0.250:8080", pod = "default/gone-1" } ]
[[services]]
name = "empty"
addresses = ["10.96.0.64:80"]
endpoints = []
[[services]]
name = "v2"
endpoints = [ { addr = "10.2.0.3:8080" } ]
"#
        .parse()
        .unwrap();
        assert_eq!(parsed(&services), want);
    }

    #[test]
    fn without_identity_leaves_the_other_pods_theirs() {
        let mut cfg: Table = r#"
[[pods]]
name = "default/n0p0"
identity = "spiffe://cluster.local/ns/default/sa/n0p0"
[[pods]]
name = "default/n0p1"
identity = "spiffe://cluster.local/ns/default/sa/n0p1"
"#
        .parse()
        .unwrap();
        without_identity(&mut cfg, 1);
        let pods = cfg["pods"].as_array().unwrap();
        assert!(pods[0].get("identity").is_some());
        assert!(pods[1].get("identity").is_none());
    }

    #[test]
    fn merge_toml_merges_tables_and_replaces_arrays() {
        let mut cfg: Table =
            "[inbound]\nmode = \"open\"\nport = 15006\n[proxy]\nopaque_ports = [1]\n"
                .parse()
                .unwrap();
        merge_toml(
            &mut cfg,
            "[inbound]\nmode = \"strict\"\n[proxy]\nopaque_ports = [7000]\n",
        );
        assert_eq!(cfg["inbound"]["mode"].as_str(), Some("strict"));
        assert_eq!(cfg["inbound"]["port"].as_integer(), Some(15006));
        assert_eq!(
            cfg["proxy"]["opaque_ports"].as_array().map(Vec::len),
            Some(1)
        );
    }
}
