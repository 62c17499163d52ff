//! Tests of the artifact store and the device endpoint.
