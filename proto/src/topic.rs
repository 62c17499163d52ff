//! The typed MQTT topic schema: the only place that formats or parses a posfleet topic.
//!
//! ```text
//! posfleet/v1/d/{device id}/up/{hb|tm|tx|ev|res|st|presence}   device -> controller
//! posfleet/v1/d/{device id}/down/{cmd|txack}                    controller -> device
//! ```
//!
//! A topic names exactly one device and one [`Channel`]; a [`Filter`] may replace the device
//! and/or the channel with the single-level wildcard `+`. Nothing else is a posfleet topic or
//! filter: `#`, `$SYS/...`, extra levels and unknown channels fail to parse, which is what lets
//! the edge's ACL be a match on typed values instead of string patterns.
//!
//! ```
//! use posfleet_proto::{Channel, DeviceId, Filter, Topic};
//!
//! let id = DeviceId::new("T-0001").unwrap();
//! let topic = Topic::for_device(&id, Channel::Heartbeat);
//! assert_eq!(topic.to_string(), "posfleet/v1/d/T-0001/up/hb");
//! assert_eq!(Topic::parse("posfleet/v1/d/T-0001/up/hb").unwrap(), topic);
//!
//! let all = Filter::all_uplinks();
//! assert_eq!(all.to_string(), "posfleet/v1/d/+/up/+");
//! assert!(all.matches(&topic));
//! ```

use std::fmt;

use crate::device_id::{DeviceId, DeviceIdError};

/// Every topic starts with these three levels.
pub const PREFIX: &str = "posfleet/v1/d";

/// Which way a channel flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device to controller.
    Up,
    /// Controller to device.
    Down,
}

impl Direction {
    fn segment(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "up" => Some(Direction::Up),
            "down" => Some(Direction::Down),
            _ => None,
        }
    }
}

/// One row of the topic table at the top of this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Heartbeat,
    Telemetry,
    Transactions,
    Event,
    CommandResult,
    ReportedState,
    Presence,
    LogChunk,
    Command,
    TransactionAck,
}

impl Channel {
    pub const ALL: [Channel; 10] = [
        Channel::Heartbeat,
        Channel::Telemetry,
        Channel::Transactions,
        Channel::Event,
        Channel::CommandResult,
        Channel::ReportedState,
        Channel::Presence,
        Channel::LogChunk,
        Channel::Command,
        Channel::TransactionAck,
    ];

    pub fn direction(self) -> Direction {
        match self {
            Channel::Command | Channel::TransactionAck => Direction::Down,
            _ => Direction::Up,
        }
    }

    /// The last topic level.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Heartbeat => "hb",
            Channel::Telemetry => "tm",
            Channel::Transactions => "tx",
            Channel::Event => "ev",
            Channel::CommandResult => "res",
            Channel::ReportedState => "st",
            Channel::Presence => "presence",
            Channel::LogChunk => "log",
            Channel::Command => "cmd",
            Channel::TransactionAck => "txack",
        }
    }

    /// Largest payload accepted on this channel, in bytes. The edge refuses bigger packets
    /// before they reach the router, and the codec refuses to encode or decode them.
    pub fn max_payload(self) -> usize {
        match self {
            Channel::Heartbeat | Channel::Presence => 1024,
            Channel::Telemetry => 4 * 1024,
            Channel::Event | Channel::ReportedState => 16 * 1024,
            Channel::CommandResult | Channel::TransactionAck => 64 * 1024,
            Channel::LogChunk => LOG_CHUNK_MAX_DATA + 1024,
            Channel::Transactions | Channel::Command => 256 * 1024,
        }
    }

    fn parse(direction: Direction, name: &str) -> Option<Self> {
        Channel::ALL
            .into_iter()
            .find(|c| c.direction() == direction && c.name() == name)
    }
}

/// Most log bytes in one [`Channel::LogChunk`] message.
pub const LOG_CHUNK_MAX_DATA: usize = 64 * 1024;

/// Largest MQTT packet either side needs: the largest payload plus room for the topic and
/// headers. Clients and the edge use it as their packet size limit.
pub const MAX_PACKET_SIZE: usize = 256 * 1024 + 1024;

/// Why a string is not a posfleet topic or filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic does not start with {PREFIX}/")]
    WrongPrefix,
    #[error("topic has {levels} levels; posfleet topics have 6")]
    WrongShape { levels: usize },
    #[error("invalid device id in topic: {0}")]
    DeviceId(#[from] DeviceIdError),
    #[error("unknown direction {0:?}; expected \"up\" or \"down\"")]
    UnknownDirection(String),
    #[error("unknown channel {name:?} for direction {direction:?}")]
    UnknownChannel { direction: Direction, name: String },
    #[error("wildcards are not allowed in a topic name")]
    Wildcard,
}

/// A concrete topic: one device, one channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    device: DeviceId,
    channel: Channel,
}

impl Topic {
    pub fn for_device(device: &DeviceId, channel: Channel) -> Self {
        Self {
            device: device.clone(),
            channel,
        }
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// Parses a topic name (no wildcards).
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let (device, direction, channel) = split(topic)?;
        if device == "+" || channel == "+" {
            return Err(TopicError::Wildcard);
        }
        let device = DeviceId::new(device)?;
        let channel =
            Channel::parse(direction, channel).ok_or_else(|| TopicError::UnknownChannel {
                direction,
                name: channel.to_owned(),
            })?;
        Ok(Self { device, channel })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}/{}/{}/{}",
            self.device,
            self.channel.direction().segment(),
            self.channel.name()
        )
    }
}

/// A subscription filter within the schema: a device or `+`, a direction, a channel or `+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    /// `None` is the `+` wildcard.
    device: Option<DeviceId>,
    direction: Direction,
    /// `None` is the `+` wildcard.
    channel: Option<Channel>,
}

impl Filter {
    /// `posfleet/v1/d/{id}/down/+`: what a device subscribes to.
    pub fn device_downlink(device: &DeviceId) -> Self {
        Self {
            device: Some(device.clone()),
            direction: Direction::Down,
            channel: None,
        }
    }

    /// `posfleet/v1/d/+/up/+`: what the controller subscribes to.
    pub fn all_uplinks() -> Self {
        Self {
            device: None,
            direction: Direction::Up,
            channel: None,
        }
    }

    /// `posfleet/v1/d/+/down/+`: every downlink (the MQTT edge's one router subscription).
    pub fn all_downlinks() -> Self {
        Self {
            device: None,
            direction: Direction::Down,
            channel: None,
        }
    }

    /// `posfleet/v1/d/+/up/{channel}` (or `.../down/{channel}` for a downlink channel).
    pub fn all_devices(channel: Channel) -> Self {
        Self {
            device: None,
            direction: channel.direction(),
            channel: Some(channel),
        }
    }

    pub fn device(&self) -> Option<&DeviceId> {
        self.device.as_ref()
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn channel(&self) -> Option<Channel> {
        self.channel
    }

    /// Parses a filter; only the shapes this schema defines are accepted (`#`, `$SYS/..`,
    /// partial-level wildcards and extra levels are errors).
    pub fn parse(filter: &str) -> Result<Self, TopicError> {
        let (device, direction, channel) = split(filter)?;
        let device = match device {
            "+" => None,
            id => Some(DeviceId::new(id)?),
        };
        let channel =
            match channel {
                "+" => None,
                name => Some(Channel::parse(direction, name).ok_or_else(|| {
                    TopicError::UnknownChannel {
                        direction,
                        name: name.to_owned(),
                    }
                })?),
            };
        Ok(Self {
            device,
            direction,
            channel,
        })
    }

    pub fn matches(&self, topic: &Topic) -> bool {
        self.direction == topic.channel.direction()
            && self.device.as_ref().is_none_or(|d| *d == topic.device)
            && self.channel.is_none_or(|c| c == topic.channel)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device = self.device.as_ref().map_or("+", DeviceId::as_str);
        let channel = self.channel.map_or("+", Channel::name);
        write!(
            f,
            "{PREFIX}/{device}/{}/{channel}",
            self.direction.segment()
        )
    }
}

/// Splits `posfleet/v1/d/{device}/{direction}/{channel}` into its three variable levels.
fn split(s: &str) -> Result<(&str, Direction, &str), TopicError> {
    let rest = s
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(TopicError::WrongPrefix)?;
    let levels: Vec<&str> = rest.split('/').collect();
    let [device, direction, channel] = levels[..] else {
        return Err(TopicError::WrongShape {
            levels: levels.len() + 3,
        });
    };
    let direction = Direction::parse(direction)
        .ok_or_else(|| TopicError::UnknownDirection(direction.to_owned()))?;
    Ok((device, direction, channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn every_channel_round_trips() {
        for channel in Channel::ALL {
            let topic = Topic::for_device(&id("T-1"), channel);
            let text = topic.to_string();
            assert_eq!(Topic::parse(&text).unwrap(), topic, "{text}");
        }
    }

    #[test]
    fn table_matches_design() {
        let d = id("dev");
        let rows = [
            (Channel::Heartbeat, "posfleet/v1/d/dev/up/hb"),
            (Channel::Telemetry, "posfleet/v1/d/dev/up/tm"),
            (Channel::Transactions, "posfleet/v1/d/dev/up/tx"),
            (Channel::Event, "posfleet/v1/d/dev/up/ev"),
            (Channel::CommandResult, "posfleet/v1/d/dev/up/res"),
            (Channel::ReportedState, "posfleet/v1/d/dev/up/st"),
            (Channel::Presence, "posfleet/v1/d/dev/up/presence"),
            (Channel::Command, "posfleet/v1/d/dev/down/cmd"),
            (Channel::TransactionAck, "posfleet/v1/d/dev/down/txack"),
        ];
        for (channel, text) in rows {
            assert_eq!(Topic::for_device(&d, channel).to_string(), text);
        }
    }

    #[test]
    fn refuses_foreign_and_malformed_topics() {
        for bad in [
            "",
            "#",
            "$SYS/broker/uptime",
            "posfleet/v1/d",
            "posfleet/v1/d/",
            "posfleet/v1/d/dev/up",
            "posfleet/v1/d/dev/up/hb/extra",
            "posfleet/v1/d/dev/up/cmd",
            "posfleet/v1/d/dev/down/hb",
            "posfleet/v1/d/dev/sideways/hb",
            "posfleet/v1/d/+/up/hb",
            "posfleet/v1/d/dev/up/+",
            "posfleet/v1/d/de+v/up/hb",
            "posfleet/v2/d/dev/up/hb",
            "posfleet/v1/d//up/hb",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn filters_round_trip_and_match() {
        let d = id("A1");
        for f in [
            Filter::device_downlink(&d),
            Filter::all_uplinks(),
            Filter::all_devices(Channel::Telemetry),
            Filter::all_devices(Channel::Command),
        ] {
            assert_eq!(Filter::parse(&f.to_string()).unwrap(), f);
        }
        let down = Filter::device_downlink(&d);
        assert!(down.matches(&Topic::for_device(&d, Channel::Command)));
        assert!(!down.matches(&Topic::for_device(&id("B2"), Channel::Command)));
        assert!(!down.matches(&Topic::for_device(&d, Channel::Heartbeat)));
        let tm = Filter::all_devices(Channel::Telemetry);
        assert!(tm.matches(&Topic::for_device(&d, Channel::Telemetry)));
        assert!(!tm.matches(&Topic::for_device(&d, Channel::Heartbeat)));
    }

    #[test]
    fn refuses_filters_outside_the_schema() {
        for bad in [
            "#",
            "$SYS/#",
            "posfleet/#",
            "posfleet/v1/d/#",
            "posfleet/v1/d/+/#",
            "posfleet/v1/d/+/+/+",
            "posfleet/v1/d/a+/up/+",
            "+/v1/d/a/up/+",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "[a-z0-9/+#$._-]{0,60}") {
            if let Ok(t) = Topic::parse(&s) {
                prop_assert_eq!(t.to_string(), s.clone());
            }
            if let Ok(f) = Filter::parse(&s) {
                prop_assert_eq!(f.to_string(), s);
            }
        }

        #[test]
        fn generated_topics_round_trip(dev in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}", i in 0usize..9) {
            let topic = Topic::for_device(&DeviceId::new(dev).unwrap(), Channel::ALL[i]);
            prop_assert_eq!(Topic::parse(&topic.to_string()).unwrap(), topic);
        }
    }
}
