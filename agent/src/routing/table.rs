//! A service's routes and the choice of one per request, by the Gateway API
//! precedence across every match of every route.

use std::cmp::Reverse;

use http::request::Parts;

use super::matching::{GrpcRequest, PathMatch, RouteMatch, normalized_prefix};

/// A named route: the matches that select it and what it leads to (`T`:
/// backends, timeouts, retry policy — whatever the proxy attaches).
#[derive(Debug, Clone)]
pub struct Route<T> {
    pub name: String,
    /// Any one of these selects the route. Empty means "every request"; the
    /// table stores that as one match without conditions, so the index it
    /// reports is always valid.
    pub matches: Vec<RouteMatch>,
    pub value: T,
}

/// How specific a match is. Field order is comparison order (derived `Ord`
/// compares fields top to bottom), highest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    path: PathRank,
    method: bool,
    headers: usize,
    grpc: GrpcRank,
}

/// Variant order is rank order: exact > prefix (longer first) > regex > none.
/// Exact paths need no length: every exact path that matches a request
/// equals that request's path, so they can only tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PathRank {
    None,
    Regex,
    Prefix(usize),
    Exact,
}

/// GRPCRoute ranks by characters in the matching service, then method. Every
/// matching exact name equals the request's, so only presence can differ:
/// service and method > service only > method only > neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct GrpcRank {
    service: bool,
    method: bool,
}

impl Specificity {
    fn of(m: &RouteMatch) -> Self {
        let path = match &m.path {
            None => PathRank::None,
            Some(PathMatch::Regex(_)) => PathRank::Regex,
            Some(PathMatch::Prefix(p)) => PathRank::Prefix(normalized_prefix(p).len()),
            Some(PathMatch::Exact(_)) => PathRank::Exact,
        };
        let grpc = m.grpc.as_ref().map_or(
            GrpcRank {
                service: false,
                method: false,
            },
            |g| GrpcRank {
                service: g.service.is_some(),
                method: g.method.is_some(),
            },
        );
        Self {
            path,
            method: m.method.is_some(),
            headers: m.headers.len(),
            grpc,
        }
    }
}

/// Routes with their matches pre-sorted by precedence, so selection is a
/// walk that stops at the first match that holds.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    routes: Vec<Route<T>>,
    /// (route index, match index), most specific first; equal specificity
    /// keeps declaration order because the sort is stable.
    order: Vec<(usize, usize)>,
}

impl<T> RouteTable<T> {
    pub fn new(mut routes: Vec<Route<T>>) -> Self {
        for route in &mut routes {
            if route.matches.is_empty() {
                route.matches.push(RouteMatch::default());
            }
            for m in &mut route.matches {
                m.drop_repeated_headers();
            }
        }
        let mut ranked: Vec<(Specificity, usize, usize)> = routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| {
                route
                    .matches
                    .iter()
                    .enumerate()
                    .map(move |(m, rm)| (Specificity::of(rm), r, m))
            })
            .collect();
        ranked.sort_by_key(|&(spec, _, _)| Reverse(spec));
        let order = ranked.into_iter().map(|(_, r, m)| (r, m)).collect();
        Self { routes, order }
    }

    /// The route for a request and the index of the match that selected it,
    /// by Gateway API precedence across all routes' matches: exact path >
    /// prefix (longer prefix first) > regex > no path; then method present;
    /// then more header matches; then gRPC service+method > service only >
    /// method only; ties keep declaration order (route, then match).
    pub fn select(&self, parts: &Parts) -> Option<(&Route<T>, usize)> {
        let grpc = GrpcRequest::from_parts(parts);
        self.order.iter().find_map(|&(r, m)| {
            let route = &self.routes[r];
            route.matches[m]
                .matches_with(parts, grpc.as_ref())
                .then_some((route, m))
        })
    }

    /// The routes in declaration order.
    pub fn routes(&self) -> &[Route<T>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::matching::tests::parts;
    use crate::routing::{GrpcMatch, HeaderMatch, ValueMatch};
    use http::Method;
    use proptest::prelude::*;

    fn path(p: PathMatch) -> RouteMatch {
        RouteMatch {
            path: Some(p),
            ..Default::default()
        }
    }

    fn route(name: &str, matches: Vec<RouteMatch>) -> Route<()> {
        Route {
            name: name.to_owned(),
            matches,
            value: (),
        }
    }

    fn selected(table: &RouteTable<()>, method: &str, uri: &str, h: &[(&str, &str)]) -> String {
        match table.select(&parts(method, uri, h)) {
            Some((route, m)) => format!("{}#{m}", route.name),
            None => "none".to_owned(),
        }
    }

    #[test]
    fn exact_beats_prefix_beats_regex_beats_no_path() {
        let table = RouteTable::new(vec![
            route("none", vec![RouteMatch::default()]),
            route("regex", vec![path(PathMatch::regex("/a/.*").unwrap())]),
            route("prefix", vec![path(PathMatch::prefix("/a").unwrap())]),
            route("exact", vec![path(PathMatch::exact("/a/b").unwrap())]),
        ]);
        assert_eq!(selected(&table, "GET", "/a/b", &[]), "exact#0");
        assert_eq!(selected(&table, "GET", "/a/c", &[]), "prefix#0");
        assert_eq!(selected(&table, "GET", "/z", &[]), "none#0");
        let no_prefix = RouteTable::new(vec![
            route("none", vec![RouteMatch::default()]),
            route("regex", vec![path(PathMatch::regex("/a/.*").unwrap())]),
        ]);
        assert_eq!(selected(&no_prefix, "GET", "/a/c", &[]), "regex#0");
    }

    #[test]
    fn longer_prefix_wins_and_trailing_slash_does_not_lengthen() {
        let table = RouteTable::new(vec![
            route("short", vec![path(PathMatch::prefix("/api/").unwrap())]),
            route("long", vec![path(PathMatch::prefix("/api/v1").unwrap())]),
            route(
                "short-again",
                vec![path(PathMatch::prefix("/api").unwrap())],
            ),
        ]);
        assert_eq!(selected(&table, "GET", "/api/v1/x", &[]), "long#0");
        // "/api/" and "/api" are the same prefix: declaration order decides.
        assert_eq!(selected(&table, "GET", "/api/v2", &[]), "short#0");
        assert_eq!(selected(&table, "GET", "/apiv1", &[]), "none");
    }

    #[test]
    fn method_then_header_count_break_path_ties() {
        let h = |n: &str, v: &str| HeaderMatch::new(n, ValueMatch::exact(v)).unwrap();
        let prefix = || Some(PathMatch::prefix("/").unwrap());
        let table = RouteTable::new(vec![
            route(
                "two-headers",
                vec![RouteMatch {
                    path: prefix(),
                    headers: vec![h("x-a", "1"), h("x-b", "1")],
                    ..Default::default()
                }],
            ),
            route(
                "method",
                vec![RouteMatch {
                    path: prefix(),
                    method: Some(Method::GET),
                    ..Default::default()
                }],
            ),
            route(
                "one-header",
                vec![RouteMatch {
                    path: prefix(),
                    headers: vec![h("x-a", "1")],
                    ..Default::default()
                }],
            ),
        ]);
        let both = [("x-a", "1"), ("x-b", "1")];
        assert_eq!(selected(&table, "GET", "/", &both), "method#0");
        assert_eq!(selected(&table, "POST", "/", &both), "two-headers#0");
        assert_eq!(
            selected(&table, "POST", "/", &[("x-a", "1")]),
            "one-header#0"
        );
        assert_eq!(selected(&table, "POST", "/", &[]), "none");
    }

    #[test]
    fn grpc_service_and_method_beats_service_only() {
        let g = |s: Option<&str>, m: Option<&str>| RouteMatch {
            grpc: Some(GrpcMatch::new(s, m).unwrap()),
            ..Default::default()
        };
        let table = RouteTable::new(vec![
            route("method-only", vec![g(None, Some("Get"))]),
            route("service", vec![g(Some("pkg.Svc"), None)]),
            route("both", vec![g(Some("pkg.Svc"), Some("Get"))]),
        ]);
        let ct = [("content-type", "application/grpc")];
        assert_eq!(selected(&table, "POST", "/pkg.Svc/Get", &ct), "both#0");
        assert_eq!(selected(&table, "POST", "/pkg.Svc/Put", &ct), "service#0");
        assert_eq!(
            selected(&table, "POST", "/other.Svc/Get", &ct),
            "method-only#0"
        );
        assert_eq!(selected(&table, "POST", "/pkg.Svc/Get", &[]), "none");
    }

    #[test]
    fn reports_which_match_selected_and_keeps_declaration_order() {
        let table = RouteTable::new(vec![
            route(
                "first",
                vec![
                    path(PathMatch::exact("/x").unwrap()),
                    path(PathMatch::prefix("/b").unwrap()),
                ],
            ),
            route("second", vec![path(PathMatch::prefix("/b").unwrap())]),
        ]);
        assert_eq!(selected(&table, "GET", "/b/1", &[]), "first#1");
        assert_eq!(selected(&table, "GET", "/x", &[]), "first#0");
    }

    #[test]
    fn empty_matches_mean_every_request_at_lowest_rank() {
        let table = RouteTable::new(vec![
            route("catch-all", vec![]),
            route("api", vec![path(PathMatch::prefix("/api").unwrap())]),
        ]);
        assert_eq!(selected(&table, "GET", "/api", &[]), "api#0");
        assert_eq!(selected(&table, "PUT", "/elsewhere", &[]), "catch-all#0");
        assert_eq!(table.routes()[0].matches.len(), 1);
        assert!(
            RouteTable::<()>::new(vec![])
                .select(&parts("GET", "/", &[]))
                .is_none()
        );
    }

    /// A small vocabulary so random routes and requests often overlap.
    fn arb_match() -> impl Strategy<Value = RouteMatch> {
        let paths = prop_oneof![
            Just(None),
            Just(Some(PathMatch::exact("/a/b").unwrap())),
            Just(Some(PathMatch::prefix("/a").unwrap())),
            Just(Some(PathMatch::prefix("/a/b/").unwrap())),
            Just(Some(PathMatch::prefix("/").unwrap())),
            Just(Some(PathMatch::regex("/a/.*").unwrap())),
        ];
        let methods = prop_oneof![
            Just(None),
            Just(Some(Method::GET)),
            Just(Some(Method::POST))
        ];
        let headers = proptest::sample::subsequence(vec!["x-1", "x-2", "x-3"], 0..=3);
        (paths, methods, headers).prop_map(|(path, method, names)| RouteMatch {
            path,
            method,
            headers: names
                .into_iter()
                .map(|n| HeaderMatch::new(n, ValueMatch::exact("y")).unwrap())
                .collect(),
            grpc: None,
        })
    }

    proptest! {
        /// `select` must equal the brute force: of all matches that hold, the
        /// most specific, and among equals the first declared.
        #[test]
        fn select_is_the_most_specific_first_declared_match(
            matches in proptest::collection::vec(proptest::collection::vec(arb_match(), 0..3), 0..6),
            method in prop_oneof![Just("GET"), Just("POST")],
            uri in prop_oneof![Just("/a"), Just("/a/b"), Just("/a/b/c"), Just("/ab"), Just("/z")],
            names in proptest::sample::subsequence(vec!["x-1", "x-2", "x-3"], 0..=3),
        ) {
            let routes: Vec<Route<()>> = matches
                .into_iter()
                .enumerate()
                .map(|(i, ms)| route(&i.to_string(), ms))
                .collect();
            let table = RouteTable::new(routes);
            let headers: Vec<(&str, &str)> = names.iter().map(|n| (*n, "y")).collect();
            let req = parts(method, uri, &headers);
            let mut best: Option<(Specificity, usize, usize)> = None;
            for (r, route) in table.routes().iter().enumerate() {
                for (m, rm) in route.matches.iter().enumerate() {
                    let spec = Specificity::of(rm);
                    if rm.matches(&req) && best.is_none_or(|(b, _, _)| spec > b) {
                        best = Some((spec, r, m));
                    }
                }
            }
            let got = table.select(&req).map(|(route, m)| (route.name.clone(), m));
            prop_assert_eq!(got, best.map(|(_, r, m)| (r.to_string(), m)));
        }
    }
}
