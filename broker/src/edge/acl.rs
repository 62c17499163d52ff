//! The topic ACL (ADR 0003), as a match on typed topics and filters.
//!
//! | identity   | may publish                      | may subscribe                        |
//! |------------|----------------------------------|--------------------------------------|
//! | device D   | `posfleet/v1/d/D/up/<channel>`   | `posfleet/v1/d/D/down/+` or a channel |
//! | controller | `posfleet/v1/d/<any>/down/<ch>`  | uplink filters (`.../+/up/+`, ...)    |
//!
//! Anything that does not parse as a posfleet topic or filter (`#`, `$SYS/#`, extra levels,
//! unknown channels) is refused for everyone: rumqttd's router would disconnect a `$` filter
//! anyway, and no posfleet component needs more.

use posfleet_proto::pki::Identity;
use posfleet_proto::{Direction, Filter, Topic};

/// Why a PUBLISH or SUBSCRIBE was refused; `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AclDenial {
    /// Not a posfleet topic at all.
    BadTopic,
    /// Not a posfleet filter at all.
    BadFilter,
    /// A valid topic this identity may not publish to.
    PublishNotAllowed,
    /// A valid filter this identity may not subscribe to.
    SubscribeNotAllowed,
    /// Payload larger than its channel allows.
    Oversized { size: usize, limit: usize },
}

impl AclDenial {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            AclDenial::BadTopic => "bad_topic",
            AclDenial::BadFilter => "bad_filter",
            AclDenial::PublishNotAllowed => "publish_not_allowed",
            AclDenial::SubscribeNotAllowed => "subscribe_not_allowed",
            AclDenial::Oversized { .. } => "oversized_payload",
        }
    }
}

/// Checks a PUBLISH (topic and payload size) by `identity`.
pub(crate) fn check_publish(
    identity: &Identity,
    topic: &[u8],
    payload_len: usize,
) -> Result<Topic, AclDenial> {
    let topic = std::str::from_utf8(topic)
        .ok()
        .and_then(|t| Topic::parse(t).ok())
        .ok_or(AclDenial::BadTopic)?;
    let allowed = match identity {
        Identity::Device(id) => {
            topic.device() == id && topic.channel().direction() == Direction::Up
        }
        Identity::Controller(_) => topic.channel().direction() == Direction::Down,
    };
    if !allowed {
        return Err(AclDenial::PublishNotAllowed);
    }
    let limit = topic.channel().max_payload();
    if payload_len > limit {
        return Err(AclDenial::Oversized {
            size: payload_len,
            limit,
        });
    }
    Ok(topic)
}

/// Checks one SUBSCRIBE filter by `identity`.
pub(crate) fn check_subscribe(identity: &Identity, filter: &str) -> Result<Filter, AclDenial> {
    let filter = Filter::parse(filter).map_err(|_| AclDenial::BadFilter)?;
    let allowed = match identity {
        Identity::Device(id) => {
            filter.device() == Some(id) && filter.direction() == Direction::Down
        }
        Identity::Controller(_) => filter.direction() == Direction::Up,
    };
    if allowed {
        Ok(filter)
    } else {
        Err(AclDenial::SubscribeNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::{Channel, DeviceId};

    fn device(id: &str) -> Identity {
        Identity::Device(DeviceId::new(id).unwrap())
    }

    fn topic(id: &str, channel: Channel) -> String {
        Topic::for_device(&DeviceId::new(id).unwrap(), channel).to_string()
    }

    #[test]
    fn device_publishes_only_its_own_uplinks() {
        let me = device("A");
        for channel in Channel::ALL {
            let own = check_publish(&me, topic("A", channel).as_bytes(), 10);
            assert_eq!(
                own.is_ok(),
                channel.direction() == Direction::Up,
                "{channel:?}"
            );
            assert!(check_publish(&me, topic("B", channel).as_bytes(), 10).is_err());
        }
        assert_eq!(
            check_publish(&me, b"posfleet/v1/d/B/up/hb", 1),
            Err(AclDenial::PublishNotAllowed)
        );
        assert_eq!(check_publish(&me, b"#", 1), Err(AclDenial::BadTopic));
        assert_eq!(
            check_publish(&me, b"posfleet/v1/d/A/up/\xff", 1),
            Err(AclDenial::BadTopic)
        );
    }

    #[test]
    fn payload_limits_are_per_channel() {
        let me = device("A");
        let hb = topic("A", Channel::Heartbeat);
        let limit = Channel::Heartbeat.max_payload();
        assert!(check_publish(&me, hb.as_bytes(), limit).is_ok());
        assert_eq!(
            check_publish(&me, hb.as_bytes(), limit + 1),
            Err(AclDenial::Oversized {
                size: limit + 1,
                limit
            })
        );
    }

    #[test]
    fn device_subscribes_only_its_own_downlink() {
        let me = device("A");
        assert!(check_subscribe(&me, "posfleet/v1/d/A/down/+").is_ok());
        assert!(check_subscribe(&me, "posfleet/v1/d/A/down/cmd").is_ok());
        for bad in [
            "#",
            "$SYS/#",
            "posfleet/v1/d/B/down/+",
            "posfleet/v1/d/+/down/+",
            "posfleet/v1/d/A/up/+",
            "posfleet/v1/d/+/up/+",
            "posfleet/#",
        ] {
            assert!(check_subscribe(&me, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn controller_reads_uplinks_and_writes_downlinks() {
        let ctl = Identity::Controller("main".into());
        assert!(check_subscribe(&ctl, "posfleet/v1/d/+/up/+").is_ok());
        assert!(check_subscribe(&ctl, "posfleet/v1/d/A/up/tx").is_ok());
        assert!(check_subscribe(&ctl, "posfleet/v1/d/+/down/+").is_err());
        assert!(check_subscribe(&ctl, "#").is_err());
        assert!(check_publish(&ctl, topic("A", Channel::Command).as_bytes(), 10).is_ok());
        assert!(check_publish(&ctl, topic("A", Channel::Heartbeat).as_bytes(), 10).is_err());
    }
}
