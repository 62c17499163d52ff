//! Parsers for text values of config files and command lines: durations and broker URLs.

use std::fmt;
use std::time::Duration;

/// Default port of MQTT over TLS.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// Parses `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"30d"` (an unsigned integer and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. \"10s\", \"500ms\", \"5m\""))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Where the broker is: `mqtts://host[:port]`. Plain `mqtt://` is refused: terminals only
/// ever talk to the fleet over mutually authenticated TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (without brackets); the broker's certificate must name it.
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = match text.split_once("://") {
            Some(("mqtts", rest)) => rest,
            Some(("mqtt" | "tcp", _)) => {
                return Err(format!(
                    "{text:?} is plaintext MQTT; terminals only connect over TLS (mqtts://)"
                ));
            }
            Some((scheme, _)) => {
                return Err(format!(
                    "unsupported scheme {scheme:?}; use mqtts://host:port"
                ));
            }
            None => return Err(format!("{text:?} is not a URL; use mqtts://host:port")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{text:?} must be just mqtts://host:port (no path, query or credentials)"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{text:?} has an unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{text:?}: expected ':port' after ']'"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let port = match port {
            None => DEFAULT_MQTTS_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("{text:?} has an invalid port {p:?}")),
                Ok(port) => port,
            },
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtts://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtts://{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in [
            "",
            "10",
            "s",
            "-1s",
            "1.5s",
            "10 s",
            "3w",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::parse("mqtts://broker.example:8883").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("broker.example", 8883));
        assert_eq!(BrokerUrl::parse("mqtts://10.0.0.1").unwrap().port, 8883);
        let v6 = BrokerUrl::parse("mqtts://[::1]:9000/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(v6.to_string(), "mqtts://[::1]:9000");
        for bad in [
            "mqtt://host:1883",
            "https://host",
            "host:8883",
            "mqtts://",
            "mqtts://:8883",
            "mqtts://host:0",
            "mqtts://host:99999",
            "mqtts://host:8883/path",
            "mqtts://user@host",
            "mqtts://[::1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad:?}");
        }
    }
}
