//! Two-person approval of a wipe with two real principals: the bootstrap admin token asks,
//! an admin account (logged in with MFA through posctl) approves.

use posfleet_broker::views::{
    ApprovalDecided, ApprovalRequired, ApprovalState, CommandBody, CommandPage,
};
use posfleet_tests::{BrokerOptions, Posctl};

use super::{create_user, first_admin_login, ok, principal, run};
use crate::support::{agent, broker_with, online};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_wipe_needs_a_second_admin() {
    let broker = broker_with(BrokerOptions {
        extra_args: vec!["--two-person-approval".into(), "on".into()],
        ..BrokerOptions::default()
    })
    .await;
    let _terminal = agent(&broker, "T-wipe-1");
    online(broker.api(), "T-wipe-1").await;
    let bootstrap = Posctl::new(&broker);
    let initial = create_user(&bootstrap, "bea", "admin").await;
    let bea = principal(&broker, &bootstrap, "bea");
    first_admin_login(&bea, "bea", &initial).await;

    // The bootstrap admin asks: 202, an approval, no command yet.
    let asked = ok(&bootstrap, &["-o", "json", "wipe", "T-wipe-1"]).await;
    let required: ApprovalRequired = asked.json().expect("an approval (202)");
    let approval = required.approval;
    assert_eq!(approval.state, ApprovalState::Pending, "{approval:?}");
    assert_eq!(
        approval.devices,
        vec!["T-wipe-1".to_owned()],
        "{approval:?}"
    );
    let commands = |posctl: Posctl| async move {
        let page: CommandPage = ok(
            &posctl,
            &["-o", "json", "commands", "list", "--device", "T-wipe-1"],
        )
        .await
        .json()
        .expect("a command page");
        page.items
    };
    assert!(
        commands(bootstrap.clone()).await.is_empty(),
        "a command exists before approval"
    );

    // The requester cannot approve its own request.
    let own = run(&bootstrap, &["approvals", "approve", &approval.id], None).await;
    assert!(
        !own.status.success(),
        "the requester approved its own wipe:\n{own}"
    );
    assert!(
        commands(bootstrap.clone()).await.is_empty(),
        "a command exists after the requester's own approval"
    );

    // The second admin approves: the wipe command is created.
    let decided: ApprovalDecided = ok(&bea, &["-o", "json", "approvals", "approve", &approval.id])
        .await
        .json()
        .expect("a decided approval");
    assert_eq!(
        decided.approval.state,
        ApprovalState::Approved,
        "{decided:?}"
    );
    assert_eq!(
        decided.approval.decided_by.as_deref(),
        Some("bea"),
        "{decided:?}"
    );
    let created = commands(bea.clone()).await;
    assert!(
        created.len() == 1
            && matches!(created[0].body, CommandBody::Wipe { .. })
            && decided.approval.commands == vec![created[0].id.clone()],
        "approved {decided:?}, commands {created:?}"
    );
}
