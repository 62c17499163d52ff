//! Error reports for the command lines (`posfleet-agent`, `posfleet-broker`, `posctl`).

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text the message
/// before it already shows (many error types print their source in their own message).
pub fn error_report(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_report_shows_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(io)
            .context("ca.crt: disk on fire")
            .context("cannot start");
        assert_eq!(error_report(&error), "cannot start: ca.crt: disk on fire");
    }
}
