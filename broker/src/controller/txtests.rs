//! Transaction ingest tests.
