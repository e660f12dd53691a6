//! Oversight's approval page end to end: a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/services.sh` installs) opens an approver's list, picks the
//! request, writes a reason and approves, and the agent's watch ends with that answer; plain
//! HTTP checks the one-click links (a GET changes nothing, a tampered or foreign token is 403,
//! a second confirmation is "already recorded", a decided request 409, an unknown one 404),
//! escaping of what agents write, the security headers, and the page being off without a
//! link secret.
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use creto_gateways::oversight::notify::links::{self, LinkClaims, LinkSigner};
use creto_gateways::oversight::notify::NotifyConfig;
use creto_gateways::server::Running;
use creto_replay_tests::Env;
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
use creto_schemas::oversight::v1::{Channel, Decision, Priority, State, TimeoutAction};
use fantoccini::{ClientBuilder, Locator};
use reqwest::StatusCode;
use tonic::transport::Channel as GrpcChannel;

type Client = OversightServiceClient<GrpcChannel>;

const SECRET: &[u8] = b"approval-page-test-secret";
const TTL: Duration = Duration::from_secs(3600);
/// Unauthenticated gateways act for tenant `default`.
const TENANT: &str = "default";
const SCRIPT_CONTEXT: &str =
    "Roll out v2 <script>document.title='pwned'</script> & <b>bold</b> \"quoted\"";

async fn start(env: &Env, link_secret: Option<&[u8]>) -> (Running, Client, String) {
    let auth = creto_gateways::auth::AuthArgs::disabled()
        .build(None)
        .unwrap();
    let notify = NotifyConfig {
        link_secret: link_secret.map(|s| String::from_utf8(s.to_vec()).unwrap()),
        link_ttl: TTL,
        ..Default::default()
    };
    let running = env.start_oversight_with(auth, notify).await;
    let grpc = format!("http://{}", running.grpc_addr.unwrap());
    let client = OversightServiceClient::connect(grpc).await.unwrap();
    let page = format!("http://{}", running.metrics_addr);
    (running, client, page)
}

async fn put_policy(c: &mut Client, approvers: &[&str]) {
    put_policy_for(c, "deploys", "deploy.*", approvers).await;
}

/// A policy `id` for actions matching `action`: one level of `approvers`, quorum 1.
async fn put_policy_for(c: &mut Client, id: &str, action: &str, approvers: &[&str]) {
    c.put_policy(pb::PutPolicyRequest {
        policy: Some(pb::Policy {
            policy_id: id.into(),
            action: action.into(),
            require_approval: true,
            quorum: 1,
            levels: vec![pb::Level {
                approvers: approvers.iter().map(|s| s.to_string()).collect(),
                timeout: Some(Duration::from_secs(600).try_into().unwrap()),
            }],
            on_timeout: TimeoutAction::Deny as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

async fn ask(c: &mut Client, id: &str, context: &str, priority: Priority) -> pb::ApprovalRequest {
    c.create_request(pb::CreateRequestRequest {
        request_id: id.into(),
        agent_id: "deploy-bot".into(),
        action: Some(pb::Action {
            name: "deploy.prod".into(),
            parameters_json:
                r#"{"service":"api","version":"2.0.1","note":"</pre><script>alert(1)</script>"}"#
                    .into(),
        }),
        context: context.into(),
        priority: priority as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .request
    .unwrap()
}

async fn get(c: &mut Client, id: &str) -> pb::ApprovalRequest {
    c.get_request(pb::GetRequestRequest {
        request_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn page_token(request_id: &str, approver: &str) -> String {
    links::page_token(SECRET, TENANT, request_id, approver, SystemTime::now(), TTL)
}

fn spare_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a spare port driving a headless Chromium with a fresh profile; both end
/// with the value (the session is closed, the driver killed).
struct Browser {
    client: fantoccini::Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let chromedriver =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = spare_port();
        let driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {chromedriver} ({e}): install Debian's chromium and \
                     chromium-driver (bash .ci/services.sh does)"
                )
            });
        let profile = tempfile::Builder::new()
            .prefix("oversight-page-chromium-")
            .tempdir()
            .unwrap();
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < until => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from {chromedriver} on {url}: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn stop(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}

/// An approver opens their list in Chromium, clicks the request, writes a reason and approves;
/// the agent's watch ends approved with that answer, recorded on the web channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approver_approves_in_a_browser_and_the_agent_sees_it() {
    let env = Env::new().await;
    let (running, mut c, base) = start(&env, Some(SECRET)).await;
    put_policy(&mut c, &["ann"]).await;
    ask(&mut c, "req-low", "routine", Priority::Low).await;
    let created = ask(&mut c, "req-web", SCRIPT_CONTEXT, Priority::Critical).await;
    assert_eq!(created.state, State::Pending as i32);
    let mut watch = c
        .watch_request(pb::WatchRequestRequest {
            request_id: "req-web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state, State::Pending as i32);

    let browser = Browser::start().await;
    let b = &browser.client;
    let list = format!("{base}/approvals/{TENANT}?token={}", page_token("", "ann"));
    b.goto(&list).await.unwrap();
    assert_eq!(
        b.find(Locator::Css("h1"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "Requests waiting for ann"
    );
    // Highest priority first.
    let rows = b.find_all(Locator::Css("a.request")).await.unwrap();
    let mut ids = Vec::new();
    for r in &rows {
        ids.push(r.attr("data-request-id").await.unwrap().unwrap());
    }
    assert_eq!(ids, ["req-web", "req-low"]);
    rows[0].clone().click().await.unwrap();

    // The request's page: what the agent wrote is shown as text, and ran nothing.
    let context = b.wait().for_element(Locator::Id("context")).await.unwrap();
    assert_eq!(context.text().await.unwrap(), SCRIPT_CONTEXT);
    assert_ne!(b.title().await.unwrap(), "pwned");
    let parameters = b
        .find(Locator::Id("parameters"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        parameters.contains("\"version\": \"2.0.1\"") && parameters.contains("<script>alert(1)"),
        "{parameters}"
    );
    assert!(b
        .find(Locator::Id("priority"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("critical"));

    b.find(Locator::Id("reason-approve"))
        .await
        .unwrap()
        .send_keys("Checked the rollout plan: ship it")
        .await
        .unwrap();
    b.find(Locator::Id("approve"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let outcome = b
        .wait()
        .for_element(Locator::Id("outcome"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(outcome, "Approved — recorded for ann");
    let state = b
        .find(Locator::Id("state"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(state.contains("approved"), "{state}");
    // Back to the request: answered. On the list, it is gone.
    b.find(Locator::LinkText("Back"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let notice = b
        .wait()
        .for_element(Locator::Id("notice"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(notice.contains("You (ann) answered approve"), "{notice}");
    assert!(b.find(Locator::Id("approve")).await.is_err());
    b.goto(&list).await.unwrap();
    let left = b.find_all(Locator::Css("a.request")).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].attr("data-request-id").await.unwrap().as_deref(),
        Some("req-low")
    );
    browser.stop().await;

    let mut last = first;
    while let Some(update) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch ends with the decision")
        .unwrap()
    {
        last = update;
    }
    assert_eq!(last.state, State::Approved as i32);
    assert_eq!(last.responses.len(), 1);
    let r = &last.responses[0];
    assert_eq!(
        r.recorded_by,
        creto_gateways::oversight::page::RECORDED_BY_PAGE
    );
    assert_eq!(
        (
            r.approver.as_str(),
            r.decision,
            r.reason.as_str(),
            r.channel
        ),
        (
            "ann",
            Decision::Approve as i32,
            "Checked the rollout plan: ship it",
            Channel::Web as i32
        )
    );
    running.stop().await;
    env.drop().await;
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn fetch(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

/// POSTs the confirmation of a one-click link (or a page form).
/// GET `url`: its status and body.
async fn get_page(url: impl reqwest::IntoUrl) -> (StatusCode, String) {
    fetch(http().get(url).send().await.unwrap()).await
}

async fn post(url: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
    fetch(http().post(url).form(form).send().await.unwrap()).await
}

/// The respond URL and token of a link.
fn split(link: &str) -> (&str, &str) {
    link.split_once("?token=").unwrap()
}

/// The token with one character of its signature changed: the first, which carries six full
/// bits (the last one's low bits must be zero, so changing it could make the base64url invalid
/// instead of the signature wrong: one token in sixteen did, and CI saw it).
fn tampered(token: &str) -> String {
    let (claims, signature) = token.split_once('.').unwrap();
    let mut rest = signature.chars();
    let first = rest.next().unwrap();
    format!(
        "{claims}.{}{}",
        if first == 'A' { 'B' } else { 'A' },
        rest.as_str()
    )
}

/// An approver's list holds their requests even when others' fill more than one answer's
/// size ahead of them: the list was cut to that size before it was filtered to the approver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_finds_an_approvers_requests_behind_large_ones_of_others() {
    let env = Env::embedded().await;
    let (running, mut c, base) = start(&env, Some(SECRET)).await;
    put_policy(&mut c, &["ann"]).await;
    put_policy_for(&mut c, "bulk", "bulk.*", &["bob"]).await;
    let parameters = format!(r#"{{"blob":"{}"}}"#, "x".repeat(60 * 1024));
    // About 4 MiB of critical requests for bob, ahead of ann's low one.
    for i in 0..52 {
        c.create_request(pb::CreateRequestRequest {
            request_id: format!("req-bulk-{i}"),
            agent_id: "bulk-bot".into(),
            action: Some(pb::Action {
                name: "bulk.export".into(),
                parameters_json: parameters.clone(),
            }),
            context: "y".repeat(16 * 1024),
            priority: Priority::Critical as i32,
        })
        .await
        .unwrap();
    }
    ask(&mut c, "req-for-ann", "routine", Priority::Low).await;
    let token = page_token("", "ann");
    let (status, body) = get_page(format!("{base}/approvals/{TENANT}?token={token}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("req-for-ann"), "{body}");
    assert!(!body.contains("req-bulk-"), "bob's requests are not ann's");
    running.stop().await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_links_confirm_before_changing_anything() {
    let env = Env::new().await;
    let (running, mut c, base) = start(&env, Some(SECRET)).await;
    put_policy(&mut c, &["ann", "bob"]).await;
    ask(&mut c, "req-click", SCRIPT_CONTEXT, Priority::High).await;
    let signer = LinkSigner::new(&base, SECRET, TTL);
    let ann = signer.links(TENANT, "req-click", "ann");
    assert!(
        ann.page
            .starts_with(&format!("{base}/approvals/{TENANT}/req-click?token=")),
        "{}",
        ann.page
    );
    // The page link in a notification opens the request for its approver.
    let page = http().get(&ann.page).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("req-click"));

    // Opening the link (as a mail scanner would, twice) only shows the confirmation.
    for _ in 0..2 {
        let resp = http().get(&ann.approve).send().await.unwrap();
        let h = resp.headers().clone();
        assert_eq!(
            h["content-security-policy"],
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
        );
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        let (status, body) = fetch(resp).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("Approve this request?"), "{body}");
        assert!(body.contains("id=\"confirm\""), "{body}");
        // What the agent wrote is escaped, in the context and in the parameters.
        assert!(!body.contains("<script>"), "{body}");
        assert!(
            body.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot;"),
            "{body}"
        );
        assert!(
            body.contains("&lt;/pre&gt;&lt;script&gt;alert(1)"),
            "{body}"
        );
    }
    let r = get(&mut c, "req-click").await;
    assert_eq!((r.state, r.responses.len()), (State::Pending as i32, 0));

    // Tampered, altered, foreign, expired or misplaced tokens: 403, nothing recorded.
    let (respond_url, token) = split(&ann.approve);
    let bad = tampered(token);
    let (status, body) = get_page(format!("{respond_url}?token={bad}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("altered"), "{body}");
    let (status, _) = post(respond_url, &[("token", &bad), ("reason", "x")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Claims rewritten to another approver under the old signature.
    let signature = token.split_once('.').unwrap().1;
    let bobs = links::sign(
        b"whatever",
        &LinkClaims::new(
            TENANT,
            "req-click",
            "bob",
            Decision::Approve,
            SystemTime::now(),
            TTL,
        ),
    );
    let forged = format!("{}.{signature}", bobs.split_once('.').unwrap().0);
    let (status, _) = post(respond_url, &[("token", &forged), ("reason", "x")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let other_secret = links::sign(
        b"another secret",
        &LinkClaims::new(
            TENANT,
            "req-click",
            "ann",
            Decision::Approve,
            SystemTime::now(),
            TTL,
        ),
    );
    let (status, _) = post(respond_url, &[("token", &other_secret)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let expired = links::sign(
        SECRET,
        &LinkClaims::new(
            TENANT,
            "req-click",
            "ann",
            Decision::Approve,
            SystemTime::now() - Duration::from_secs(7200),
            TTL,
        ),
    );
    let (status, body) = post(respond_url, &[("token", &expired)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("expired"), "{body}");
    // ann's link of req-click posted at another request, or another tenant.
    let (status, _) = post(
        &format!("{base}/approvals/{TENANT}/req-other/respond"),
        &[("token", token)],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        &format!("{base}/approvals/acme/req-click/respond"),
        &[("token", token)],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Someone who is not an approver, with a genuine link.
    let cy = signer.links(TENANT, "req-click", "cy");
    let (url, cy_token) = split(&cy.approve);
    let (status, body) = post(url, &[("token", cy_token)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("not an approver"), "{body}");
    // A one-click link is no page token: not for the list.
    let (status, _) = get_page(format!("{base}/approvals/{TENANT}?token={token}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let r = get(&mut c, "req-click").await;
    assert_eq!((r.state, r.responses.len()), (State::Pending as i32, 0));

    // Confirmed: recorded as ann on the web channel with the reason.
    let (status, body) = post(respond_url, &[("token", token), ("reason", "fine by me")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("Approved — recorded for ann"), "{body}");
    let r = get(&mut c, "req-click").await;
    assert_eq!(r.state, State::Approved as i32);
    assert_eq!(
        (
            r.responses[0].approver.as_str(),
            r.responses[0].reason.as_str(),
            r.responses[0].channel
        ),
        ("ann", "fine by me", Channel::Web as i32)
    );
    // The same link again: already recorded, nothing changes.
    let (status, body) = post(respond_url, &[("token", token), ("reason", "again")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("Already recorded"), "{body}");
    assert_eq!(get(&mut c, "req-click").await.version, r.version);
    // Her deny link afterwards: the same page, her approval standing (the gateway refuses a
    // changed answer; the page shows the one given).
    let (deny_url, deny_token) = split(&ann.deny);
    let (status, body) = post(deny_url, &[("token", deny_token)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("Already recorded") && body.contains("answered approve"),
        "{body}"
    );
    assert_eq!(get(&mut c, "req-click").await.version, r.version);
    // The confirmation page of a decided request offers nothing to confirm.
    let (status, body) = get_page(&ann.deny).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("id=\"confirm\""), "{body}");
    // Another approver, too late: 409.
    let bob = signer.links(TENANT, "req-click", "bob");
    let (url, bob_token) = split(&bob.deny);
    let (status, body) = post(url, &[("token", bob_token)]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // An unknown request: 404.
    let nope = signer.links(TENANT, "req-nope", "ann");
    let (url, nope_token) = split(&nope.approve);
    let (status, _) = post(url, &[("token", nope_token)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get_page(&nope.approve).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A page token of one request: the forms post the decision; without one, 400.
    ask(&mut c, "req-deny", "deny me", Priority::Normal).await;
    let t = page_token("req-deny", "bob");
    let (status, body) = get_page(format!("{base}/approvals/{TENANT}/req-deny?token={t}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("id=\"approve\"") && body.contains("id=\"deny\""));
    // ... and not of another request, nor the list.
    for url in [
        format!("{base}/approvals/{TENANT}/req-click?token={t}"),
        format!("{base}/approvals/{TENANT}?token={t}"),
    ] {
        let (status, _) = get_page(url).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let url = format!("{base}/approvals/{TENANT}/req-deny/respond");
    let (status, _) = post(&url, &[("token", &t), ("reason", "no")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = post(
        &url,
        &[("token", &t), ("decision", "deny"), ("reason", "not today")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("Denied — recorded for bob"), "{body}");
    let r = get(&mut c, "req-deny").await;
    assert_eq!(r.state, State::Denied as i32);
    assert_eq!(r.responses[0].reason, "not today");

    // No token at all: 403.
    let (status, _) = get_page(format!("{base}/approvals/{TENANT}/req-deny")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    running.stop().await;
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_link_secret_the_page_is_off() {
    let env = Env::new().await;
    let (running, _c, base) = start(&env, None).await;
    let token = page_token("", "ann");
    for url in [
        format!("{base}/approvals/{TENANT}?token={token}"),
        format!("{base}/approvals/{TENANT}/req-1"),
        format!("{base}/approvals/{TENANT}/req-1/respond?token={token}"),
    ] {
        let (status, body) = get_page(url).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body.contains("OVERSIGHT_LINK_SECRET") && body.contains("OVERSIGHT_PUBLIC_URL"),
            "{body}"
        );
    }
    // Metrics and health are still served on the same port.
    let (status, _) = get_page(format!("{base}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    running.stop().await;
    env.drop().await;
}
