//! `Topic::parse` and `Filter::parse` on arbitrary UTF-8 (MQTT topic names and filters are
//! UTF-8 strings; the edge parses every PUBLISH topic and SUBSCRIBE filter with these).
//!
//! Invariants:
//! - round trip: whatever parses prints back as exactly the input;
//! - a topic has 6 levels, no `+ # $`, a valid device id, and is also a filter that matches it
//!   (with the same device, direction and channel);
//! - a filter never holds `#` or `$`; `+` only as a whole level, and only in the device or
//!   channel level; a filter without wildcards is a topic, one with them is refused as a topic
//!   with `TopicError::Wildcard`;
//! - the built-in filters (`all_uplinks`, `all_devices`, `device_downlink`) match a parsed topic
//!   exactly when its direction, channel or device says they should.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posfleet_proto::{DeviceId, Direction, Filter, Topic, TopicError};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let topic = Topic::parse(s);
    let filter = Filter::parse(s);

    if let Ok(t) = &topic {
        assert_eq!(t.to_string(), s, "topic round trip");
        assert!(!s.contains(['+', '#', '$']), "metacharacter in topic {s:?}");
        assert_eq!(s.split('/').count(), 6);
        assert_eq!(DeviceId::new(t.device().as_str()).as_ref(), Ok(t.device()));
        let direction = t.channel().direction();

        let f = filter.as_ref().expect("every topic is also a filter");
        assert_eq!(f.device(), Some(t.device()));
        assert_eq!(f.channel(), Some(t.channel()));
        assert_eq!(f.direction(), direction);
        assert!(f.matches(t));

        assert!(Filter::all_devices(t.channel()).matches(t));
        assert_eq!(Filter::all_uplinks().matches(t), direction == Direction::Up);
        assert_eq!(
            Filter::device_downlink(t.device()).matches(t),
            direction == Direction::Down
        );
    }

    if let Ok(f) = &filter {
        assert_eq!(f.to_string(), s, "filter round trip");
        assert!(!s.contains(['#', '$']), "metacharacter in filter {s:?}");
        for (i, level) in s.split('/').enumerate() {
            assert!(
                level == "+" && (i == 3 || i == 5) || !level.contains('+'),
                "misplaced + in filter {s:?}"
            );
        }
        if let Some(c) = f.channel() {
            assert_eq!(c.direction(), f.direction());
        }
        if f.device().is_some() && f.channel().is_some() {
            assert!(topic.is_ok(), "wildcard-free filter {s:?} is not a topic");
        } else {
            assert_eq!(topic, Err(TopicError::Wildcard));
        }
    }
});
