//! Where the admin API is: `DATA_DIR/posctl.json` (written by `serve`/`demo`), or explicit
//! `--server`/`--ca`/`--token-file`, each of which overrides the file.
//!
//! The credential, in order: `--token-file`, the session `posctl login` stored for this
//! server, the token file named by `posctl.json` (the bootstrap `DATA/admin.token`).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use reqwest::Url;

use super::ConnectArgs;
use crate::datadir::{DataDir, DataDirError};

/// Where the API is and how to authenticate, after flags and `posctl.json` are combined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Base URL of the API, always `https` and ending in `/`.
    pub(crate) api_url: Url,
    /// PEM file with the CA certificate(s) to trust.
    pub(crate) ca_file: PathBuf,
    /// File with the bearer token.
    pub(crate) token_file: PathBuf,
    /// The stored login session for this server, used instead of `token_file` unless
    /// `--token-file` was given.
    pub(crate) session: Option<super::session::StoredSession>,
}

/// Combines explicit flags with `DATA_DIR/posctl.json`: every flag given overrides the file,
/// and the file is not needed (not even read) when all three are given.
pub(crate) fn resolve(args: &ConnectArgs) -> anyhow::Result<Endpoint> {
    let (server, ca, token) = (&args.server, &args.ca, &args.token_file);
    if let (Some(server), Some(ca), Some(token)) = (server, ca, token) {
        return Ok(Endpoint {
            api_url: parse_api_url(server, "--server")?,
            ca_file: ca.clone(),
            token_file: token.clone(),
            session: None,
        });
    }
    let dir = args.data_dir();
    let data = DataDir::at(&dir);
    let file = match data.read_client_file() {
        Ok(file) => file,
        Err(DataDirError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing_client_file(args, &dir));
        }
        Err(DataDirError::Io { path, source }) => {
            return Err(anyhow!(
                "cannot read {}: {source}; pass --server, --ca and --token-file instead",
                path.display()
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let in_dir = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let api_url = match server {
        Some(server) => parse_api_url(server, "--server")?,
        None => parse_api_url(
            &file.api_url,
            &format!("api_url in {}", data.client_file().display()),
        )?,
    };
    let session = match (
        token,
        super::session::config_dir(args.config_dir.as_deref()),
    ) {
        (None, Some(dir)) => super::session::load(&dir, api_url.as_str())?,
        _ => None,
    };
    Ok(Endpoint {
        api_url,
        ca_file: ca.clone().unwrap_or_else(|| in_dir(file.ca_file)),
        token_file: token.clone().unwrap_or_else(|| in_dir(file.token_file)),
        session,
    })
}

fn missing_client_file(args: &ConnectArgs, dir: &Path) -> anyhow::Error {
    let missing: Vec<&str> = [
        (args.server.is_none(), "--server"),
        (args.ca.is_none(), "--ca"),
        (args.token_file.is_none(), "--token-file"),
    ]
    .into_iter()
    .filter_map(|(absent, flag)| absent.then_some(flag))
    .collect();
    let dir = dir.display();
    if missing.len() == 3 {
        anyhow!(
            "no posctl.json in {dir}: start `posfleet-broker demo` or `serve` with --data-dir {dir}, \
             or pass --server/--ca/--token-file"
        )
    } else {
        anyhow!(
            "no posctl.json in {dir} to take {} from: pass --server, --ca and --token-file together, \
             or --data-dir with the data directory of the running server",
            missing.join(" and ")
        )
    }
}

/// An `https` URL with a host, normalised to end in `/` so API paths append to it.
pub(crate) fn parse_api_url(text: &str, what: &str) -> anyhow::Result<Url> {
    let mut url = Url::parse(text.trim()).map_err(|e| {
        anyhow!("{what} {text:?} is not a URL ({e}); use e.g. https://127.0.0.1:8443")
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            return Err(anyhow!(
                "{what} is {text:?}: refusing to send the API token over plain http; \
                 the admin API speaks HTTPS, use https://"
            ));
        }
        other => {
            return Err(anyhow!(
                "{what} {text:?} has scheme {other:?}; use an https:// URL such as https://127.0.0.1:8443"
            ));
        }
    }
    if url.host().is_none() {
        return Err(anyhow!("{what} {text:?} names no host"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data_dir: &Path) -> ConnectArgs {
        ConnectArgs {
            data_dir: Some(data_dir.to_owned()),
            // Never the real user's sessions.
            config_dir: Some(data_dir.join("no-config")),
            ..ConnectArgs::default()
        }
    }

    fn write_client_file(dir: &Path) -> crate::datadir::ClientFile {
        DataDir::at(dir)
            .write_client_file("https://127.0.0.1:8443", None, None)
            .unwrap()
    }

    #[test]
    fn the_data_dir_alone_is_enough() {
        let tmp = tempfile::tempdir().unwrap();
        let file = write_client_file(tmp.path());
        let endpoint = resolve(&args(tmp.path())).unwrap();
        assert_eq!(endpoint.api_url.as_str(), "https://127.0.0.1:8443/");
        assert_eq!(endpoint.ca_file, file.ca_file);
        assert_eq!(endpoint.token_file, file.token_file);
    }

    #[test]
    fn explicit_flags_alone_are_enough_and_never_read_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        // A broken client file proves it is not read.
        std::fs::write(tmp.path().join("posctl.json"), "not json").unwrap();
        let endpoint = resolve(&ConnectArgs {
            data_dir: Some(tmp.path().to_owned()),
            server: Some("https://fleet.example:9443/admin".into()),
            ca: Some("ca.pem".into()),
            token_file: Some("tok".into()),
            config_dir: None,
        })
        .unwrap();
        assert_eq!(
            endpoint.api_url.as_str(),
            "https://fleet.example:9443/admin/"
        );
        assert_eq!(endpoint.ca_file, PathBuf::from("ca.pem"));
        assert_eq!(endpoint.token_file, PathBuf::from("tok"));
    }

    #[test]
    fn each_flag_overrides_the_client_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = write_client_file(tmp.path());
        let endpoint = resolve(&ConnectArgs {
            server: Some("https://[::1]:1".into()),
            ..args(tmp.path())
        })
        .unwrap();
        assert_eq!(endpoint.api_url.as_str(), "https://[::1]:1/");
        assert_eq!(endpoint.ca_file, file.ca_file);

        let endpoint = resolve(&ConnectArgs {
            token_file: Some("/elsewhere/token".into()),
            ..args(tmp.path())
        })
        .unwrap();
        assert_eq!(endpoint.api_url.as_str(), "https://127.0.0.1:8443/");
        assert_eq!(endpoint.token_file, PathBuf::from("/elsewhere/token"));
    }

    #[test]
    fn relative_paths_in_the_client_file_are_relative_to_the_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("posctl.json"),
            r#"{"api_url":"https://h:1","ca_file":"pki/ca.crt","token_file":"admin.token"}"#,
        )
        .unwrap();
        let endpoint = resolve(&args(tmp.path())).unwrap();
        assert_eq!(endpoint.ca_file, tmp.path().join("pki/ca.crt"));
        assert_eq!(endpoint.token_file, tmp.path().join("admin.token"));
    }

    #[test]
    fn a_missing_client_file_says_how_to_get_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nowhere");
        let message = resolve(&args(&dir)).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "no posctl.json in {0}: start `posfleet-broker demo` or `serve` with --data-dir \
                 {0}, or pass --server/--ca/--token-file",
                dir.display()
            )
        );
        let message = resolve(&ConnectArgs {
            server: Some("https://h:1".into()),
            ..args(&dir)
        })
        .unwrap_err()
        .to_string();
        assert!(
            message.contains("to take --ca and --token-file from"),
            "{message}"
        );
    }

    #[test]
    fn a_broken_client_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("posctl.json"), "{").unwrap();
        let message = format!("{:#}", resolve(&args(tmp.path())).unwrap_err());
        assert!(
            message.contains("posctl.json is not a valid posctl client file"),
            "{message}"
        );
    }

    #[test]
    fn only_https_urls_are_accepted() {
        let flags = |server: &str| ConnectArgs {
            server: Some(server.into()),
            ca: Some("c".into()),
            token_file: Some("t".into()),
            ..ConnectArgs::default()
        };
        let err = resolve(&flags("http://127.0.0.1:8443")).unwrap_err();
        assert!(err.to_string().contains("plain http"), "{err}");
        let err = resolve(&flags("127.0.0.1:8443")).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let err = resolve(&flags("ftp://h")).unwrap_err();
        assert!(err.to_string().contains("scheme \"ftp\""), "{err}");
    }
}
