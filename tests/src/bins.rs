//! Where the binaries under test are.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Paths of the three wrapper binaries of this crate.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `pf-broker` (= `posfleet-broker`).
    pub broker: PathBuf,
    /// `pf-agent` (= `posfleet-agent`).
    pub agent: PathBuf,
    /// `pf-posctl` (= `posctl`).
    pub posctl: PathBuf,
}

impl Binaries {
    /// The binaries in `dir` (a Cargo profile directory such as `target/release`).
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let bins = Self {
            broker: dir.join("pf-broker"),
            agent: dir.join("pf-agent"),
            posctl: dir.join("pf-posctl"),
        };
        for path in [&bins.broker, &bins.agent, &bins.posctl] {
            if !path.is_file() {
                bail!(
                    "{} is missing; build it first (cargo build --release -p posfleet-tests --bins)",
                    path.display()
                );
            }
        }
        Ok(bins)
    }

    /// The binaries next to the running program (how `fleet-bench` finds them: Cargo builds
    /// every binary of the package into the same directory).
    pub fn beside_current_exe() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the running program")?;
        let dir = exe
            .parent()
            .with_context(|| format!("{} has no parent directory", exe.display()))?;
        Self::in_dir(dir)
    }
}
