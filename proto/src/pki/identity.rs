//! The identity a certificate proves.
//!
//! A device certificate carries its id twice, as the subject CN and as the URI SAN
//! `urn:posfleet:device:<id>`, and both must agree; its OU is `device`. A controller
//! certificate has CN `controller:<name>` and OU `controller`. Anything else from the fleet CA
//! (for example the broker's server certificate) is no client identity at all.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::PkiError;
use crate::DeviceId;

/// URI SAN prefix of a device certificate.
pub const DEVICE_URI_PREFIX: &str = "urn:posfleet:device:";
/// CN prefix of a controller certificate.
pub const CONTROLLER_CN_PREFIX: &str = "controller:";
/// OU of a device certificate.
pub const DEVICE_OU: &str = "device";
/// OU of a controller certificate.
pub const CONTROLLER_OU: &str = "controller";

/// Who a client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Device(DeviceId),
    /// A controller, by name (the part after `controller:`).
    Controller(String),
}

impl Identity {
    /// Reads the identity from a DER certificate. It does not verify the chain: callers do that
    /// first (the TLS handshake does, against the fleet CA).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let cn = single(subject.iter_common_name().map(|a| a.as_str()), "CN")?;
        let ou = single(subject.iter_organizational_unit().map(|a| a.as_str()), "OU")?;
        match ou {
            DEVICE_OU => {
                let device = DeviceId::new(cn)?;
                let san = cert
                    .subject_alternative_name()
                    .map_err(|e| PkiError::Parse(e.to_string()))?
                    .ok_or(PkiError::NoIdentity("device certificate without a URI SAN"))?;
                let uris: Vec<&str> = san
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect();
                let expected = format!("{DEVICE_URI_PREFIX}{device}");
                if uris.len() != 1 || uris[0] != expected {
                    return Err(PkiError::NoIdentity(
                        "device certificate's URI SAN does not match its CN",
                    ));
                }
                Ok(Identity::Device(device))
            }
            CONTROLLER_OU => {
                let name = cn
                    .strip_prefix(CONTROLLER_CN_PREFIX)
                    .ok_or(PkiError::NoIdentity(
                        "controller CN lacks the controller: prefix",
                    ))?;
                if !valid_controller_name(name) {
                    return Err(PkiError::ControllerName(name.to_owned()));
                }
                Ok(Identity::Controller(name.to_owned()))
            }
            _ => Err(PkiError::NoIdentity("unknown certificate role (OU)")),
        }
    }

    /// The MQTT client id this identity must connect with.
    pub fn client_id(&self) -> String {
        match self {
            Identity::Device(id) => id.to_string(),
            Identity::Controller(name) => format!("{CONTROLLER_CN_PREFIX}{name}"),
        }
    }

    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Identity::Device(id) => Some(id),
            Identity::Controller(_) => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Device(id) => write!(f, "device:{id}"),
            Identity::Controller(name) => write!(f, "{CONTROLLER_CN_PREFIX}{name}"),
        }
    }
}

/// Controller names follow the device-id alphabet, so `controller:<name>` is a safe client id.
pub(crate) fn valid_controller_name(name: &str) -> bool {
    DeviceId::new(name).is_ok()
}

fn single<'a>(
    mut values: impl Iterator<Item = Result<&'a str, x509_parser::error::X509Error>>,
    what: &'static str,
) -> Result<&'a str, PkiError> {
    let first = values
        .next()
        .ok_or(PkiError::NoIdentity(what))?
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    if values.next().is_some() {
        return Err(PkiError::NoIdentity("more than one CN or OU"));
    }
    Ok(first)
}
