//! Mutual TLS: a client certificate signed by the configured CA is an identity (O = tenant,
//! CN = subject, OU = roles); without one, or with one from another CA, there is no call.
use creto_gateways::auth::AuthArgs;
use creto_replay_tests::Env;
use creto_schemas::metering::v1 as pb;
use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, key PEM) signed by `ca`.
fn leaf(ca: &Ca, names: Vec<String>, dn: &[(DnType, &str)]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names).unwrap();
    for (t, v) in dn {
        params.distinguished_name.push(t.clone(), *v);
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn channel(
    addr: &str,
    ca: &Ca,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server ca");
    let client_ca = ca("client ca");
    let (cert, key) = leaf(
        &server_ca,
        vec!["localhost".into()],
        &[(DnType::CommonName, "gateway")],
    );
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let auth = AuthArgs {
        tls_cert: Some(write("server.pem", &cert)),
        tls_key: Some(write("server.key", &key)),
        tls_client_ca: Some(write("client-ca.pem", &client_ca.pem)),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let env = Env::embedded().await;
    let running = env.start_metering_with(true, auth).await;
    let addr = running.grpc_addr.unwrap().to_string();

    let producer = leaf(
        &client_ca,
        vec![],
        &[
            (DnType::OrganizationName, "acme"),
            (DnType::CommonName, "billing-agent"),
            (DnType::OrganizationalUnitName, "producer"),
        ],
    );
    let mut c =
        MeteringServiceClient::new(channel(&addr, &server_ca, Some(&producer)).await.unwrap());
    let r = c
        .ingest_events(pb::IngestEventsRequest {
            events: vec![pb::UsageEvent {
                id: "m1".into(),
                source: "mtls".into(),
                r#type: "agent.execution".into(),
                subject: "sub_m".into(),
                time: Some(creto_streams::envelope::timestamp(chrono::Utc::now())),
                data: None,
            }],
        })
        .await
        .expect("a producer certificate may ingest");
    assert_eq!(r.into_inner().accepted, 1);
    // The OU is the role: a producer may not read.
    let e = c
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // A certificate from another CA, or none at all: the handshake is refused.
    let rogue_ca = ca("rogue");
    let rogue = leaf(
        &rogue_ca,
        vec![],
        &[
            (DnType::OrganizationName, "acme"),
            (DnType::CommonName, "x"),
        ],
    );
    for client in [Some(&rogue), None] {
        let refused = match channel(&addr, &server_ca, client).await {
            Err(_) => true,
            Ok(ch) => MeteringServiceClient::new(ch)
                .list_meters(pb::ListMetersRequest::default())
                .await
                .is_err(),
        };
        assert!(
            refused,
            "a call without a trusted client certificate went through"
        );
    }
    // A certificate without a tenant (no O) is refused with the reason.
    let anonymous = leaf(&client_ca, vec![], &[(DnType::CommonName, "nobody")]);
    let e = MeteringServiceClient::new(channel(&addr, &server_ca, Some(&anonymous)).await.unwrap())
        .list_meters(pb::ListMetersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("no O"), "{e:?}");
    running.stop().await;
    env.drop().await;
}
