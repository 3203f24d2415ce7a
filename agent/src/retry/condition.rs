//! Retry conditions as operators write them (`5xx`, `gateway-error`,
//! `reset`, gRPC status names — the vocabulary of Envoy, Istio and the
//! Gateway API) and which attempt outcomes each one covers.

use std::fmt;
use std::str::FromStr;

use super::RetryError;

/// gRPC status codes that have a condition name (the gRPC spec's numbering).
const GRPC_NAMES: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

/// One condition under which a failed attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `5xx`: any 5xx response, or no response at all (connect failure,
    /// reset, per-try timeout) — Envoy's meaning.
    ServerError,
    /// `gateway-error`: like `5xx` but only 502, 503 and 504 responses.
    GatewayError,
    /// `connect-failure`: the connection to the endpoint could not be made,
    /// so the request never reached it.
    ConnectFailure,
    /// `reset`: the connection or stream was reset or closed, or the per-try
    /// timeout passed, before a response came.
    Reset,
    /// A gRPC status in the response (`unavailable` = 14, …).
    GrpcStatus(u32),
}

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this HTTP status (and no gRPC status, or gRPC OK).
    Status(u16),
    /// A gRPC response whose `grpc-status` (in trailers, or in headers for a
    /// trailers-only response) was this non-zero code.
    GrpcStatus(u32),
    ConnectFailure,
    Reset,
    /// The per-try timeout passed without a response.
    Timeout,
}

impl RetryOn {
    pub fn applies_to(&self, outcome: Outcome) -> bool {
        let no_response = matches!(
            outcome,
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout
        );
        match *self {
            Self::ServerError => no_response || matches!(outcome, Outcome::Status(500..=599)),
            Self::GatewayError => no_response || matches!(outcome, Outcome::Status(502..=504)),
            Self::ConnectFailure => outcome == Outcome::ConnectFailure,
            Self::Reset => matches!(outcome, Outcome::Reset | Outcome::Timeout),
            Self::GrpcStatus(code) => outcome == Outcome::GrpcStatus(code),
        }
    }
}

impl FromStr for RetryOn {
    type Err = RetryError;

    /// Names are matched ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        let on = match name.as_str() {
            "5xx" => Self::ServerError,
            "gateway-error" => Self::GatewayError,
            "connect-failure" => Self::ConnectFailure,
            "reset" => Self::Reset,
            other => GRPC_NAMES
                .iter()
                .find(|(n, _)| *n == other)
                .map(|&(_, code)| Self::GrpcStatus(code))
                .ok_or_else(|| RetryError::UnknownCondition(s.to_owned()))?,
        };
        Ok(on)
    }
}

impl fmt::Display for RetryOn {
    /// The config name; a gRPC code without one shows as `grpc-status-N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ServerError => f.write_str("5xx"),
            Self::GatewayError => f.write_str("gateway-error"),
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
            Self::GrpcStatus(code) => match GRPC_NAMES.iter().find(|(_, c)| *c == code) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "grpc-status-{code}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_name_and_round_trips() {
        let cases = [
            ("5xx", RetryOn::ServerError),
            ("gateway-error", RetryOn::GatewayError),
            ("connect-failure", RetryOn::ConnectFailure),
            ("reset", RetryOn::Reset),
            ("cancelled", RetryOn::GrpcStatus(1)),
            ("deadline-exceeded", RetryOn::GrpcStatus(4)),
            ("resource-exhausted", RetryOn::GrpcStatus(8)),
            ("internal", RetryOn::GrpcStatus(13)),
            ("unavailable", RetryOn::GrpcStatus(14)),
        ];
        for (name, on) in cases {
            assert_eq!(name.parse::<RetryOn>().unwrap(), on, "{name}");
            assert_eq!(on.to_string(), name);
        }
        assert_eq!(
            " Unavailable ".parse::<RetryOn>().unwrap(),
            RetryOn::GrpcStatus(14)
        );
        assert_eq!(RetryOn::GrpcStatus(2).to_string(), "grpc-status-2");
    }

    #[test]
    fn unknown_names_are_reported_as_written() {
        let err = "5XX-ish".parse::<RetryOn>().unwrap_err();
        assert!(matches!(&err, RetryError::UnknownCondition(s) if s == "5XX-ish"));
        assert!(err.to_string().contains("\"5XX-ish\""));
        assert!(err.to_string().contains("gateway-error"));
        assert!("".parse::<RetryOn>().is_err());
    }

    #[test]
    fn server_and_gateway_errors_cover_missing_responses() {
        use Outcome::*;
        let no_response = [ConnectFailure, Reset, Timeout];
        for o in no_response {
            assert!(RetryOn::ServerError.applies_to(o), "{o:?}");
            assert!(RetryOn::GatewayError.applies_to(o), "{o:?}");
        }
        assert!(RetryOn::ServerError.applies_to(Status(500)));
        assert!(RetryOn::ServerError.applies_to(Status(599)));
        assert!(!RetryOn::ServerError.applies_to(Status(499)));
        assert!(!RetryOn::GatewayError.applies_to(Status(500)));
        for s in [502, 503, 504] {
            assert!(RetryOn::GatewayError.applies_to(Status(s)));
        }
        assert!(!RetryOn::ServerError.applies_to(GrpcStatus(14)));
    }

    #[test]
    fn narrow_conditions_cover_only_their_outcome() {
        use Outcome::*;
        assert!(RetryOn::ConnectFailure.applies_to(ConnectFailure));
        assert!(!RetryOn::ConnectFailure.applies_to(Reset));
        assert!(RetryOn::Reset.applies_to(Reset));
        assert!(RetryOn::Reset.applies_to(Timeout));
        assert!(!RetryOn::Reset.applies_to(ConnectFailure));
        assert!(!RetryOn::Reset.applies_to(Status(503)));
        assert!(RetryOn::GrpcStatus(14).applies_to(GrpcStatus(14)));
        assert!(!RetryOn::GrpcStatus(14).applies_to(GrpcStatus(4)));
        assert!(!RetryOn::GrpcStatus(14).applies_to(Status(503)));
    }
}
