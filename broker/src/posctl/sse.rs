//! A small, bounded parser for `text/event-stream` (the HTML "server-sent events" format).
//!
//! It handles what the spec allows and a server may send: `\n`, `\r\n` or `\r` line ends
//! (also split across chunks), multi-line `data:`, `:` comments (keep-alives), a leading
//! byte-order mark, and fields without a value. `id:` and `retry:` are accepted and ignored:
//! `posctl watch` does not reconnect on its own. One event (its pending line plus its data) is
//! capped, so a broken or hostile server cannot make the client buffer without limit.

/// Largest event accepted by default: the pending line plus the accumulated data.
pub(crate) const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, `"message"` when the server sent none.
    pub(crate) event: String,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: String,
}

/// Why the stream cannot be parsed further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SseError {
    #[error("the server sent an event larger than {limit} bytes; refusing to buffer it")]
    EventTooLarge { limit: usize },
}

/// Incremental parser: feed it chunks as they arrive, collect complete events.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// `data` of the event being assembled (each line followed by `\n`).
    data: String,
    /// `event` of the event being assembled.
    event: String,
    /// The previous chunk ended in `\r`: a `\n` at the start of the next one belongs to it.
    after_cr: bool,
    /// Still at the very start of the stream, where a byte-order mark may appear.
    at_start: bool,
    /// Cap on `line.len() + data.len() + event.len()`.
    max_event_bytes: usize,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub(crate) fn with_limit(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            data: String::new(),
            event: String::new(),
            after_cr: false,
            at_start: true,
            max_event_bytes,
        }
    }

    /// Consumes one chunk of the body; returns the events it completed, in order.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let events = Vec::new();
        if self.at_start {
            // The BOM may itself be split across chunks; wait until we can tell.
            self.line.extend_from_slice(chunk);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Ok(events);
            }
            self.at_start = false;
            let buffered = std::mem::take(&mut self.line);
            let rest = buffered.strip_prefix(BOM).unwrap_or(&buffered);
            return self.feed_lines(rest, events);
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        self.feed_lines(chunk, events)
    }

    fn feed_lines(
        &mut self,
        mut chunk: &[u8],
        mut events: Vec<SseEvent>,
    ) -> Result<Vec<SseEvent>, SseError> {
        while let Some(end) = chunk.iter().position(|b| matches!(b, b'\r' | b'\n')) {
            self.append(&chunk[..end])?;
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.process_line(&line) {
                events.push(event);
            }
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            chunk = &chunk[next..];
        }
        self.append(chunk)?;
        Ok(events)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        let size = self.line.len() + bytes.len() + self.data.len() + self.event.len();
        if size > self.max_event_bytes {
            return Err(SseError::EventTooLarge {
                limit: self.max_event_bytes,
            });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Applies one complete line; an empty line dispatches the event being assembled.
    fn process_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let mut data = std::mem::take(&mut self.data);
            if data.is_empty() {
                // The spec: an event without data is not dispatched.
                return None;
            }
            data.pop(); // the `\n` after the last data line
            let event = if event.is_empty() {
                "message".to_owned()
            } else {
                event
            };
            return Some(SseEvent { event, data });
        }
        if line.starts_with(b":") {
            return None; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"event" => self.event = value.into_owned(),
            _ => {} // id, retry and unknown fields
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        chunks
            .iter()
            .flat_map(|c| parser.feed(c).unwrap())
            .collect()
    }

    #[test]
    fn parses_named_events_and_skips_comments() {
        let body = b": keep-alive\n\nevent: presence\ndata: {\"a\":1}\n\n:ping\n\ndata:x\n\n";
        assert_eq!(
            parse_all(&[body]),
            vec![ev("presence", "{\"a\":1}"), ev("message", "x")]
        );
    }

    #[test]
    fn joins_multi_line_data_with_newlines() {
        let body = b"event: t\ndata: one\ndata:two\ndata\ndata:  three\n\n";
        assert_eq!(parse_all(&[body]), vec![ev("t", "one\ntwo\n\n three")]);
    }

    #[test]
    fn accepts_crlf_and_bare_cr_line_ends() {
        assert_eq!(
            parse_all(&[b"event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\r"]),
            vec![ev("a", "1"), ev("b", "2")]
        );
    }

    #[test]
    fn events_split_at_every_byte_are_the_same() {
        let body: &[u8] =
            b"\xEF\xBB\xBF: hi\r\nevent: presence\r\ndata: {\"x\":\r\ndata: 2}\r\n\r\nevent: b\rdata: 3\r\r";
        let whole = parse_all(&[body]);
        assert_eq!(
            whole,
            vec![ev("presence", "{\"x\":\n2}"), ev("b", "3")],
            "reference parse"
        );
        for split in 0..=body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(parse_all(&[a, b]), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole, "one byte at a time");
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_does_not_swallow_the_next_line() {
        // `\r` then a chunk that does not start with `\n`: the second line is kept.
        assert_eq!(parse_all(&[b"data: a\r", b"\r"]), vec![ev("message", "a")]);
        assert_eq!(
            parse_all(&[b"data: a\r", b"\ndata: b\n\n"]),
            vec![ev("message", "a\nb")]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        assert_eq!(parse_all(&[b"event: nothing\n\n\n\n"]), vec![]);
        // ... and their event name does not leak into the next one.
        assert_eq!(
            parse_all(&[b"event: x\n\ndata: d\n\n"]),
            vec![ev("message", "d")]
        );
    }

    #[test]
    fn an_oversized_event_is_refused_even_without_a_line_end() {
        let mut parser = SseParser::with_limit(64);
        let big = vec![b'a'; 65];
        assert_eq!(
            parser.feed(&big),
            Err(SseError::EventTooLarge { limit: 64 })
        );

        // Many short data lines add up too.
        let mut parser = SseParser::with_limit(64);
        let mut result = Ok(Vec::new());
        for _ in 0..20 {
            result = parser.feed(b"data: 0123456789\n");
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::EventTooLarge { limit: 64 }));
    }

    #[test]
    fn the_limit_is_per_event_not_per_stream() {
        let mut parser = SseParser::with_limit(64);
        for _ in 0..100 {
            let events = parser.feed(b"data: 0123456789\n\n").unwrap();
            assert_eq!(events, vec![ev("message", "0123456789")]);
        }
    }
}
