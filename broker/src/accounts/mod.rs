//! Operator accounts and roles (issue 6). This file fixes the types every handler uses to know
//! who is asking; the account store, sessions, API tokens and MFA live beside it.

use serde::{Deserialize, Serialize};

/// What an operator may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Lock/unlock, configuration, reboot, logs, transactions.
    Operator,
    /// Users, enrolment, revocation, wipe, rollouts, keys.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// True if this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// How a request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// The bootstrap admin token in `DATA/admin.token`.
    BootstrapToken,
    /// An operator's login session.
    Session,
    /// An API token for automation.
    ApiToken,
}

/// Who is asking: put into every authenticated request's extensions by the auth middleware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The account (or token) name; recorded as the actor of changes and audit entries.
    pub name: String,
    pub role: Role,
    pub kind: PrincipalKind,
}

impl Principal {
    /// The holder of the bootstrap admin token.
    pub fn bootstrap_admin() -> Self {
        Self {
            name: "admin".to_owned(),
            role: Role::Admin,
            kind: PrincipalKind::BootstrapToken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
    }
}
