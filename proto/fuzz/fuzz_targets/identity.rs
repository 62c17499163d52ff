//! `Identity::from_cert_der` on arbitrary DER (the leaf certificate of every mTLS peer).
//!
//! Invariants, checked against an independent parse with x509-parser:
//! - an identity only comes from a certificate with exactly one CN and one OU;
//! - `Device(id)`: OU `device`, CN == id, exactly one URI SAN `urn:posfleet:device:<id>`, and
//!   the id is valid;
//! - `Controller(name)`: OU `controller`, CN == `controller:<name>`, name in the device-id
//!   alphabet;
//! - the MQTT client id is non-empty, never holds `/ + # $`, and a device's can never be taken
//!   for a controller's (`controller:` prefix);
//! - the result is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::Identity;
use posfleet_proto::pki::identity::{CONTROLLER_CN_PREFIX, DEVICE_URI_PREFIX};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fuzz_target!(|der: &[u8]| {
    let Ok(identity) = Identity::from_cert_der(der) else {
        return;
    };
    assert_eq!(Identity::from_cert_der(der).ok().as_ref(), Some(&identity));

    let (_, cert) = X509Certificate::from_der(der).expect("identity from an unparseable cert");
    let subject = cert.subject();
    let cns: Vec<_> = subject
        .iter_common_name()
        .map(|a| a.as_str().ok())
        .collect();
    let ous: Vec<_> = subject
        .iter_organizational_unit()
        .map(|a| a.as_str().ok())
        .collect();
    assert_eq!(cns.len(), 1, "identity from {} CNs", cns.len());
    assert_eq!(ous.len(), 1, "identity from {} OUs", ous.len());

    let client_id = identity.client_id();
    assert!(!client_id.is_empty() && !client_id.contains(['/', '+', '#', '$']));

    match &identity {
        Identity::Device(id) => {
            assert_eq!(ous[0], Some("device"));
            assert_eq!(cns[0], Some(id.as_str()));
            assert_eq!(DeviceId::new(id.as_str()).as_ref(), Ok(id));
            assert_eq!(client_id, id.as_str());
            assert!(!client_id.starts_with(CONTROLLER_CN_PREFIX));
            let san = cert
                .subject_alternative_name()
                .expect("SAN parses")
                .expect("device without SAN");
            let uris: Vec<&str> = san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect();
            assert_eq!(uris, [format!("{DEVICE_URI_PREFIX}{id}").as_str()]);
        }
        Identity::Controller(name) => {
            assert_eq!(ous[0], Some("controller"));
            let cn = format!("{CONTROLLER_CN_PREFIX}{name}");
            assert_eq!(cns[0], Some(cn.as_str()));
            assert!(
                DeviceId::new(name.as_str()).is_ok(),
                "controller name {name:?}"
            );
            assert_eq!(client_id, cn);
        }
    }
});
