//! `devices list` / `devices show` and connection failures against the canned server.

use super::*;

#[tokio::test]
async fn devices_list_renders_a_table_from_the_data_dir() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "list"]).await;
    assert!(result.is_ok(), "{result:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID   STATE   ONLINE"), "{out}");
    assert!(
        lines[1].starts_with("T-1  active  offline (missed_heartbeats)  "),
        "{out}"
    );
    assert!(lines[2].starts_with("T-2  active  online"), "{out}");
    assert_eq!(lines.last(), Some(&"2 devices, 1 online"), "{out}");
}

#[tokio::test]
async fn devices_list_json_is_the_api_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "list", "--output", "json"]).await;
    assert!(result.is_ok(), "{result:?}");
    let printed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        printed["generated_at_ms"], NOW,
        "unknown fields are kept: {out}"
    );
    let printed: DeviceList = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, canned_list());
    assert!(out.contains("\n  \"devices\""), "pretty-printed: {out}");
}

#[tokio::test]
async fn devices_show_renders_the_block_and_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "show", "T-1"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.starts_with("!!! TAMPER DETECTED on T-1"), "{out}");
    assert!(
        out.contains("  memory       512 / 2048 MiB (25%)\n"),
        "{out}"
    );

    let (result, out) = fx.posctl(&["-o", "json", "devices", "show", "T-1"]).await;
    assert!(result.is_ok(), "{result:?}");
    let printed: DeviceDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, detail("T-1", true));
}

#[tokio::test]
async fn an_unknown_device_says_how_to_find_known_ones() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["devices", "show", "T-404"]).await;
    assert_eq!(
        error_text(result),
        "no device T-404; `posctl devices list` shows known devices"
    );
    assert_eq!(out, "");
}

#[tokio::test]
async fn a_server_error_shows_the_servers_message_and_hint() {
    let fx = Fixture::start().await;
    let (result, _) = fx.posctl(&["devices", "show", "T-500"]).await;
    let message = error_text(result);
    assert!(
        message.contains(
            "failed with 500 Internal Server Error: registry unavailable; retry in a minute"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_refused_token_names_the_token_file() {
    let fx = Fixture::start().await;
    let wrong = fx.data_dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let wrong_arg = wrong.display().to_string();
    let (result, _) = fx
        .posctl(&["--token-file", &wrong_arg, "devices", "list"])
        .await;
    let message = error_text(result);
    assert!(
        message.contains(&format!(
            "refused the token in {wrong_arg} (401 Unauthorized)"
        )),
        "{message}"
    );
    assert!(
        message.contains("data dir of the running server"),
        "{message}"
    );
    assert!(
        !message.contains("not-the-token"),
        "never print a token: {message}"
    );
}

#[tokio::test]
async fn explicit_flags_work_without_a_data_dir() {
    let fx = Fixture::start().await;
    let pki = fx.pki();
    let (ca, token) = (
        pki.ca_cert().display().to_string(),
        fx.data_dir.join("admin.token").display().to_string(),
    );
    let missing = fx.data_dir.join("not-a-data-dir").display().to_string();
    let (result, out) = posctl(
        &[
            "--data-dir",
            &missing,
            "--server",
            &fx.url,
            "--ca",
            &ca,
            "--token-file",
            &token,
            "devices",
            "list",
        ],
        std::future::pending(),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("2 devices, 1 online"), "{out}");
}

#[tokio::test]
async fn connection_refused_names_the_url() {
    let fx = Fixture::start().await;
    // A port that was just free: nothing listens on it now.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let (result, _) = fx.posctl(&["--server", &url, "devices", "list"]).await;
    let message = error_text(result);
    assert!(
        message.starts_with(&format!("cannot connect to {url}/")),
        "{message}"
    );
    assert!(message.contains("is running"), "{message}");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_a_clear_tls_error() {
    let fx = Fixture::start().await;
    let other = tempfile::tempdir().unwrap();
    let other_pki = PkiDir::at(other.path());
    other_pki.init(&[]).unwrap();
    let ca = other_pki.ca_cert().display().to_string();
    let (result, _) = fx.posctl(&["--ca", &ca, "devices", "list"]).await;
    let message = error_text(result);
    assert!(message.starts_with("TLS handshake with"), "{message}");
    assert!(
        message.contains(&format!("check that {ca} is the fleet CA")),
        "{message}"
    );
}
