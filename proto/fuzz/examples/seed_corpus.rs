//! Writes a seed corpus for every target into `corpus/<target>/` (gitignored): one valid
//! payload per message type, every topic and filter shape, a few device ids, and real device,
//! controller, broker-server and CA certificates from a throw-away fleet CA.
//!
//! `cargo run --example seed_corpus` (from `proto/fuzz`, no fuzzing flags needed).

use std::fs;
use std::path::Path;

use posfleet_proto::pki::{Ca, parse_pem_certs};
use posfleet_proto::{Channel, ChannelMessage, DeviceId, Filter, Topic, encode, pb};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn write(target: &str, name: &str, bytes: &[u8]) -> Result {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(format!("seed-{name}")), bytes)?;
    Ok(())
}

fn message<M: ChannelMessage>(selector: u8, msg: &M) -> Result {
    let mut bytes = vec![selector];
    bytes.extend(encode(msg)?);
    write("decode", M::CHANNEL.name(), &bytes)
}

fn main() -> Result {
    let versions = Some(pb::SoftwareVersions {
        agent: "0.1.0".into(),
        firmware: "fw-2.3".into(),
        payment_app: "pay-9".into(),
    });
    message(
        0,
        &pb::Heartbeat {
            seq: 7,
            sent_at_ms: 1_700_000_000_000,
            interval_s: 10,
            uptime_s: 99,
            versions: versions.clone(),
            outbox_depth: 3,
            boot_id: u64::MAX,
            dead_letters: 1,
            ..Default::default()
        },
    )?;
    message(
        1,
        &pb::Telemetry {
            sent_at_ms: 1,
            system: Some(pb::SystemMetrics {
                cpu_percent: 12.5,
                memory_used_bytes: 1 << 20,
                memory_total_bytes: 1 << 30,
                disk_used_bytes: 5,
                disk_total_bytes: 9,
                uptime_s: 3,
                load_average_1m: 0.5,
            }),
            sensors: Some(pb::Sensors {
                battery_percent: Some(80.0),
                charging: Some(true),
                temperature_c: Some(-5.0),
                network: 3,
                signal_dbm: Some(-70),
                paper: 2,
                card_reader: 1,
                tamper: true,
            }),
            dropped_samples: 2,
        },
    )?;
    message(
        2,
        &pb::TransactionBatch {
            transactions: vec![pb::Transaction {
                seq: 1,
                txn_id: "t-1".into(),
                timestamp_ms: 5,
                amount_minor: -1250,
                currency: "EUR".into(),
                kind: 1,
                status: 1,
                masked_card: "411111******1111".into(),
                card_token: "tok".into(),
                card_brand: "VISA".into(),
                entry_mode: 2,
                auth_code: "A1".into(),
                response_code: "00".into(),
                merchant_id: "m".into(),
                store_id: "s".into(),
                operator_id: "o".into(),
                items: vec![pb::LineItem {
                    sku: "sku".into(),
                    quantity: 2,
                    unit_price_minor: 625,
                }],
            }],
        },
    )?;
    message(
        3,
        &pb::Event {
            at_ms: 1,
            kind: "tamper".into(),
            severity: 3,
            message: "case opened".into(),
            attributes: [("k".to_owned(), "v".to_owned())].into(),
        },
    )?;
    message(
        4,
        &pb::CommandResult {
            command_id: "c-1".into(),
            status: 3,
            at_ms: 2,
            progress_percent: 100,
            message: "ok".into(),
            details: [("config_version".to_owned(), "4".to_owned())].into(),
        },
    )?;
    message(
        5,
        &pb::ReportedState {
            at_ms: 1,
            config_version: 4,
            locked: true,
            lock_reason: "audit".into(),
            versions: versions.clone(),
            model: "X9".into(),
            serial: "SN1".into(),
        },
    )?;
    message(
        6,
        &pb::Presence {
            state: 2,
            at_ms: 1,
            versions,
            model: "X9".into(),
            serial: "SN1".into(),
            reason: "shutdown".into(),
        },
    )?;
    let command = pb::Command {
        id: "c-1".into(),
        target_device: "T-0001".into(),
        issued_at_ms: 1,
        not_after_ms: 2,
        body: Some(pb::command::Body::ConfigPush(pb::ConfigPush {
            version: 4,
            document_json: "{\"a\":1}".into(),
        })),
    };
    message(
        7,
        &pb::SignedCommand {
            key_id: "k1".into(),
            command: prost::Message::encode_to_vec(&command),
            signature: vec![7; 64],
        },
    )?;
    message(
        8,
        &pb::TransactionAck {
            durable_through_seq: 41,
            rejected_seqs: vec![3, 9],
            gap: true,
            retry_after_ms: 0,
        },
    )?;

    let ids = ["T-0001", "a", "store_12.lane-3", &"x".repeat(64)];
    for (i, id) in ids.iter().enumerate() {
        write("device_id", &i.to_string(), id.as_bytes())?;
    }
    let dev = DeviceId::new("T-0001")?;
    for channel in Channel::ALL {
        let topic = Topic::for_device(&dev, channel).to_string();
        write(
            "topic",
            &format!("topic-{}", channel.name()),
            topic.as_bytes(),
        )?;
        write(
            "topic",
            &format!("all-{}", channel.name()),
            Filter::all_devices(channel).to_string().as_bytes(),
        )?;
    }
    write(
        "topic",
        "uplinks",
        Filter::all_uplinks().to_string().as_bytes(),
    )?;
    write(
        "topic",
        "downlink",
        Filter::device_downlink(&dev).to_string().as_bytes(),
    )?;

    let ca = Ca::generate("posfleet fuzz CA")?;
    let certs = [
        ("ca", ca.cert_pem().to_owned()),
        ("device", ca.issue_device(&dev)?.cert_pem),
        ("controller", ca.issue_controller("main")?.cert_pem),
        (
            "server",
            ca.issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])?
                .cert_pem,
        ),
    ];
    for (name, pem) in certs {
        for der in parse_pem_certs(pem.as_bytes())? {
            write("identity", name, &der)?;
        }
    }
    println!(
        "seed corpus written under {}/corpus",
        env!("CARGO_MANIFEST_DIR")
    );
    Ok(())
}
