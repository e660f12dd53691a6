//! Messaging end to end on a running gateway, on both adapters (JetStream and the embedded
//! log): only the recipient reads a message and the log holds no plaintext; any altered byte
//! is refused; rotation overlap and revocation; an offline recipient gets everything in order
//! and, after acks, exactly once, across a gateway restart; duplicates, replays, expiry and bad
//! input get clear statuses; tenants are kept apart; a SendBatch answers each envelope as Send
//! would and keeps each pair's order; a recipient's Receive streams are bounded.
use std::time::Duration;

use creto_domain::messaging::envelope;
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::AuthArgs;
use creto_gateways::messaging::client::{AgentClient, ClientError};
use creto_replay_tests::Env;
use creto_schemas::messaging::v1 as pb;
use creto_schemas::messaging::v1::{KeyPurpose, KeyStatus};
use creto_streams::{ReplayFrom, MESSAGING};
use futures::TryStreamExt;
use prost::Message;
use tonic::Code;

creto_replay_tests::on_both_adapters!(
    only_the_recipient_reads_and_the_log_holds_no_plaintext,
    altered_envelopes_are_refused,
    rotation_overlap_and_revocation,
    offline_recipient_in_order_and_exactly_once_after_acks,
    duplicates_replays_and_expiry,
    bad_input_gets_clear_statuses,
    a_message_sent_to_one_replica_reaches_a_recipient_on_another,
    a_batch_is_answered_per_envelope_and_stored_in_order,
    a_recipient_has_a_bounded_number_of_receive_streams,
    a_restarted_replica_refuses_a_key_revoked_before_it_started,
    only_the_agents_signing_key_puts_keys_in_its_name,
    keys_registered_before_endorsements_are_endorsed_by_register,
);

async fn agent(url: &str, id: &str) -> AgentClient {
    let mut a = AgentClient::connect(url, "", "default", id).await.unwrap();
    a.register().await.unwrap();
    a
}

fn code(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Rpc(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// The next message on the stream, or None after `wait`.
async fn next(
    inbox: &mut tonic::Streaming<pb::ReceivedMessage>,
    wait: Duration,
) -> Option<pb::ReceivedMessage> {
    tokio::time::timeout(wait, inbox.message())
        .await
        .ok()
        .map(|m| m.unwrap().expect("stream open"))
}

async fn only_the_recipient_reads_and_the_log_holds_no_plaintext(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    let mut carol = agent(&url, "carol").await;
    let secret = b"the launch code is 0000-SWORDFISH";
    let sent = alice.send("bob", secret).await.unwrap();
    assert!(!sent.duplicate);

    let mut inbox = bob.receive(0).await.unwrap();
    let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
    assert_eq!(m.cursor, sent.cursor);
    assert_eq!(m.delivery_attempt, 1);
    let opened = bob.open(&m).await.unwrap();
    assert_eq!(opened.plaintext, secret);
    assert_eq!(opened.header.sender_agent_id, "alice");

    // Carol gets nothing in her queue, and cannot open Bob's message with her keys.
    let mut carol_inbox = carol.receive(0).await.unwrap();
    assert!(next(&mut carol_inbox, Duration::from_millis(500))
        .await
        .is_none());
    assert!(carol.open(&m).await.is_err());

    // No stored byte anywhere in the stream carries the plaintext.
    let stream = env.platform.catalog.stream(MESSAGING);
    let stored: Vec<_> = env
        .platform
        .log
        .replay(&stream, ReplayFrom::Start, None, None)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(stored.len() >= 7, "6 keys and a message: {}", stored.len());
    for e in &stored {
        assert!(
            !e.payload.windows(10).any(|w| w == &secret[..10]),
            "plaintext found in {}",
            e.subject
        );
    }
    running.stop().await;
}

async fn altered_envelopes_are_refused(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let _bob = agent(&url, "bob").await;
    let keys = alice.recipient_keys("bob").await.unwrap();
    let original = alice.seal("bob", &keys, b"pay 10 EUR").unwrap();

    let mut altered = Vec::new();
    // Every byte of the header, a byte of each other part.
    for i in 0..original.header.len() {
        let mut e = original.clone();
        e.header[i] ^= 0x01;
        altered.push(e);
    }
    for f in [
        |e: &mut pb::Envelope| e.ciphertext[3] ^= 0x80,
        |e: &mut pb::Envelope| e.stanzas[0].wrapped_key[0] ^= 0x01,
        |e: &mut pb::Envelope| e.stanzas[0].encapsulated_key[31] ^= 0x01,
        |e: &mut pb::Envelope| e.signature[0] ^= 0x01,
        |e: &mut pb::Envelope| e.signature.truncate(10),
    ] {
        let mut e = original.clone();
        f(&mut e);
        altered.push(e);
    }
    for e in altered {
        let (code, message) = code(alice.send_envelope(e).await.unwrap_err());
        assert!(
            matches!(
                code,
                Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied
            ),
            "{code:?} {message}"
        );
    }
    let state = env
        .platform
        .log
        .stream_state(&env.platform.catalog.stream(MESSAGING))
        .await
        .unwrap();
    assert_eq!(
        state.messages, 4,
        "only the four key registrations are stored"
    );
    // The untouched one still goes through.
    assert!(!alice.send_envelope(original).await.unwrap().duplicate);
    running.stop().await;
}

async fn rotation_overlap_and_revocation(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    let old_keys = alice.recipient_keys("bob").await.unwrap();
    bob.rotate_encryption("bob-enc-2", Duration::from_secs(3))
        .await
        .unwrap();

    // During the overlap both keys are valid; a sender seals for both, and a message sealed
    // for the old key alone is still accepted.
    let keys = bob_keys(&mut alice).await;
    assert_eq!(
        keys,
        vec![
            ("bob-enc-1".to_string(), KeyStatus::Rotating as i32),
            ("bob-enc-2".to_string(), KeyStatus::Active as i32),
        ]
    );
    alice.send("bob", b"for both keys").await.unwrap();
    let old_only = alice.seal("bob", &old_keys, b"old key only").unwrap();
    alice.send_envelope(old_only).await.unwrap();
    let mut inbox = bob.receive(0).await.unwrap();
    for expected in [&b"for both keys"[..], b"old key only"] {
        let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(bob.open(&m).await.unwrap().plaintext, expected);
    }

    // After the overlap the old key is retired: refused, and the sender is told why.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        bob_keys(&mut alice).await,
        vec![
            ("bob-enc-1".to_string(), KeyStatus::Retired as i32),
            ("bob-enc-2".to_string(), KeyStatus::Active as i32),
        ]
    );
    let late = alice.seal("bob", &old_keys, b"too late").unwrap();
    let (c, m) = code(alice.send_envelope(late).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("retired"), "{m}");
    alice.send("bob", b"new key").await.unwrap();

    // Revoking Alice's signing key stops her at once; a new key lets her send again.
    alice
        .rpc()
        .revoke_key(pb::RevokeKeyRequest {
            agent_id: "alice".into(),
            key_id: "alice-sig-1".into(),
            reason: "laptop stolen".into(),
        })
        .await
        .unwrap();
    let (c, m) = code(alice.send("bob", b"after revocation").await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("revoked") && m.contains("laptop stolen"), "{m}");
    alice.signing = creto_domain::messaging::SigningKeyPair::generate("alice-sig-2");
    alice.register().await.unwrap();
    alice.send("bob", b"with the new key").await.unwrap();
    // Bob receives the rest in order; the last verifies with Alice's new key.
    let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"new key");
    // Stored before the revocation, it still opens once Bob's client knows of it; the same
    // envelope stored after it (as by a replica that missed the revocation) does not.
    bob.forget_sender_keys();
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"new key");
    let mut late = m.clone();
    late.stored_at = Some(creto_streams::envelope::timestamp(
        chrono::Utc::now() + chrono::Duration::seconds(60),
    ));
    let refused = bob.open(&late).await.unwrap_err().to_string();
    assert!(refused.contains("stopped signing"), "{refused}");
    // Without a storage time it cannot be told apart: refused too (it used to open).
    late.stored_at = None;
    let refused = bob.open(&late).await.unwrap_err().to_string();
    assert!(refused.contains("gave no time it was stored"), "{refused}");
    // Alice's new key starts a new chain, which Bob (who pinned her first key) refuses until
    // he is told to trust it: whoever registered it, it was not her old key.
    let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
    let refused = bob.open(&m).await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Untrusted(ref why) if why.contains("trust_anew")),
        "{refused}"
    );
    bob.trust_anew("alice");
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"with the new key");

    // A message is wrapped for at most 4 keys: rotations that would leave Bob more usable
    // encryption keys than that are refused (they used to make every Send to him fail).
    for i in 3..=5 {
        bob.rotate_encryption(&format!("bob-enc-{i}"), Duration::from_secs(3600))
            .await
            .unwrap();
    }
    let (c, m) = code(
        bob.rotate_encryption("bob-enc-6", Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("4 usable encryption keys"), "{m}");
    alice.send("bob", b"wrapped for four").await.unwrap();
    let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"wrapped for four");
    running.stop().await;
}

async fn bob_keys(alice: &mut AgentClient) -> Vec<(String, i32)> {
    alice
        .rpc()
        .lookup_keys(pb::LookupKeysRequest {
            agent_id: "bob".into(),
            include_inactive: true,
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::Encryption as i32)
        .map(|k| (k.key_id, k.status))
        .collect()
}

async fn offline_recipient_in_order_and_exactly_once_after_acks(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    // Bob is offline while Alice sends 40 messages.
    for i in 0..40 {
        alice.send("bob", format!("m{i}").as_bytes()).await.unwrap();
    }
    let mut inbox = bob.receive(0).await.unwrap();
    let mut cursors = Vec::new();
    for i in 0..40 {
        let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            bob.open(&m).await.unwrap().plaintext,
            format!("m{i}").as_bytes()
        );
        cursors.push(m.cursor);
    }
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "in order");
    bob.ack(cursors[24]).await.unwrap();
    drop(inbox);

    // A new gateway (every replica restarted): the directory and Bob's position come back
    // from the log.
    running.stop().await;
    let (running, url) = env.start_messaging().await;
    let mut bob = bob.reconnect(&url, "").await.unwrap();
    // A cursor that is not a message to Bob (here one of his own to Alice, past his
    // undelivered ones) acknowledges nothing: acks are cumulative, and it would skip them.
    let mut alice = alice.reconnect(&url, "").await.unwrap();
    let sent = bob.send("alice", b"hello").await.unwrap();
    assert!(sent.cursor > cursors[39]);
    let (c, m) = code(bob.ack(sent.cursor).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("not a message to bob"), "{m}");
    let mut inbox = bob.receive(0).await.unwrap();
    for (i, cursor) in cursors.iter().enumerate().skip(25) {
        let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(m.cursor, *cursor);
        assert_eq!(m.delivery_attempt, 1, "a new session counts afresh");
        assert_eq!(
            bob.open(&m).await.unwrap().plaintext,
            format!("m{i}").as_bytes()
        );
    }
    bob.ack(cursors[39]).await.unwrap();
    // Acks never move back.
    assert_eq!(bob.ack(cursors[3]).await.unwrap(), cursors[39]);
    drop(inbox);
    let mut inbox = bob.receive(0).await.unwrap();
    assert!(
        next(&mut inbox, Duration::from_millis(700)).await.is_none(),
        "acknowledged messages are not delivered again"
    );

    // Within a session, what is not acked within ack_wait comes again, in order.
    alice.send("bob", b"x1").await.unwrap();
    alice.send("bob", b"x2").await.unwrap();
    let mut session = bob
        .rpc()
        .receive(pb::ReceiveRequest {
            agent_id: "bob".into(),
            after_cursor: 0,
            // Long enough for an ack to arrive first on a loaded machine.
            ack_wait: Some(Duration::from_secs(2).try_into().unwrap()),
        })
        .await
        .unwrap()
        .into_inner();
    let first: Vec<_> = [
        next(&mut session, Duration::from_secs(5)).await.unwrap(),
        next(&mut session, Duration::from_secs(5)).await.unwrap(),
    ]
    .to_vec();
    bob.ack(first[0].cursor).await.unwrap();
    let again = next(&mut session, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.cursor, first[1].cursor);
    assert_eq!(again.delivery_attempt, 2);
    bob.ack(again.cursor).await.unwrap();
    // Past another ack_wait: an ack that was lost would show as a third delivery.
    assert!(next(&mut session, Duration::from_millis(2_500))
        .await
        .is_none());

    // A cursor past the end is refused.
    let (c, _) = code(bob.ack(u64::MAX / 2).await.unwrap_err());
    assert_eq!(c, Code::OutOfRange);
    running.stop().await;
}

async fn duplicates_replays_and_expiry(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    let keys = alice.recipient_keys("bob").await.unwrap();

    let older = alice.seal("bob", &keys, b"older").unwrap();
    let newer = alice.seal("bob", &keys, b"newer").unwrap();
    let first = alice.send_envelope(newer.clone()).await.unwrap();
    // The same message again: a duplicate with the same cursor, nothing stored.
    let again = alice.send_envelope(newer.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.cursor, first.cursor);
    // An older sequence after a newer one: a replay, refused.
    let (c, m) = code(alice.send_envelope(older).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("replayed"), "{m}");
    // The same message id with other content: refused.
    let mut h = envelope::header(&newer).unwrap();
    h.sequence += 1_000;
    let mut reused = newer.clone();
    reused.header = h.encode_to_vec();
    envelope::sign(&mut reused, &alice.signing);
    let (c, m) = code(alice.send_envelope(reused).await.unwrap_err());
    assert_eq!(c, Code::AlreadyExists, "{m}");

    // Expired before it is sent: refused.
    alice.ttl = Duration::from_millis(300);
    let stale = alice.seal("bob", &keys, b"stale").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (c, m) = code(alice.send_envelope(stale).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("expired"), "{m}");

    // Expired while waiting for the recipient: dropped with an event, never delivered.
    alice.ttl = Duration::from_millis(800);
    alice.send("bob", b"short-lived").await.unwrap();
    alice.ttl = Duration::from_secs(3600);
    alice.send("bob", b"long-lived").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut inbox = bob.receive(0).await.unwrap();
    let mut delivered = Vec::new();
    let mut got = Vec::new();
    while let Some(m) = next(&mut inbox, Duration::from_secs(2)).await {
        got.push(bob.open(&m).await.unwrap().plaintext);
        delivered.push(m);
    }
    assert_eq!(got, vec![b"newer".to_vec(), b"long-lived".to_vec()]);
    // Bob's client checks replays itself, whatever the server hands it: a message not yet
    // acknowledged may come again, one acknowledged may not.
    let first = &delivered[0];
    assert_eq!(bob.open(first).await.unwrap().plaintext, b"newer");
    bob.ack(delivered[1].cursor).await.unwrap();
    let replayed = bob.open(first).await.unwrap_err().to_string();
    assert!(replayed.contains("a replayed message"), "{replayed}");
    let expired: Vec<_> = env
        .platform
        .log
        .replay(
            &env.platform.catalog.stream(MESSAGING),
            ReplayFrom::Start,
            None,
            Some(&env.subject("messaging.expired.default.bob")),
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    let e = pb::Expired::decode(expired[0].payload.as_ref()).unwrap();
    assert_eq!(e.sender_agent_id, "alice");
    running.stop().await;
}

async fn a_batch_is_answered_per_envelope_and_stored_in_order(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    let mut carol = agent(&url, "carol").await;
    let to_bob = alice.recipient_keys("bob").await.unwrap();
    let to_carol = alice.recipient_keys("carol").await.unwrap();

    let older = alice.seal("bob", &to_bob, b"older").unwrap();
    let b1 = alice.seal("bob", &to_bob, b"b1").unwrap();
    let c1 = alice.seal("carol", &to_carol, b"c1").unwrap();
    let b2 = alice.seal("bob", &to_bob, b"b2").unwrap();
    let mut forged = alice.seal("carol", &to_carol, b"forged").unwrap();
    forged.ciphertext[0] ^= 1;
    let c2 = alice.seal("carol", &to_carol, b"c2").unwrap();
    let b3 = alice.seal("bob", &to_bob, b"b3").unwrap();
    let results = alice
        .send_batch(vec![b1.clone(), c1, b2, forged, c2, b1.clone(), older, b3])
        .await
        .unwrap();
    assert_eq!(results.len(), 8);
    let ok: Vec<&pb::SendResponse> = [0, 1, 2, 4, 7]
        .iter()
        .map(|i| results[*i].as_ref().unwrap())
        .collect();
    assert!(ok.iter().all(|r| !r.duplicate));
    // The same message again in the batch: a duplicate with its cursor.
    let again = results[5].as_ref().unwrap();
    assert!(again.duplicate);
    assert_eq!(again.cursor, ok[0].cursor);
    let forged = results[3].as_ref().unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument, "{}", forged.message());
    // Older than what the batch already stored for the pair: a replay, refused.
    let replayed = results[6].as_ref().unwrap_err();
    assert_eq!(
        replayed.code(),
        Code::FailedPrecondition,
        "{}",
        replayed.message()
    );
    // Each pair in the order given, whatever the order between pairs.
    assert!(ok[0].cursor < ok[2].cursor && ok[2].cursor < ok[4].cursor);
    assert!(ok[1].cursor < ok[3].cursor);
    for (who, want) in [
        (&mut bob, vec![&b"b1"[..], b"b2", b"b3"]),
        (&mut carol, vec![&b"c1"[..], b"c2"]),
    ] {
        let mut inbox = who.receive(0).await.unwrap();
        let mut got = Vec::new();
        while let Some(m) = next(&mut inbox, Duration::from_secs(2)).await {
            got.push(who.open(&m).await.unwrap().plaintext);
        }
        assert_eq!(got, want);
    }
    // A full batch of ordinary envelopes fits in one call (the service's decode limit was
    // sized for one envelope: 1,000 of 600 bytes were refused whole).
    let full: Vec<_> = (0..creto_gateways::messaging::service::MAX_BATCH)
        .map(|i| {
            alice
                .seal("carol", &to_carol, format!("{i:0>300}").as_bytes())
                .unwrap()
        })
        .collect();
    let results = alice.send_batch(full).await.unwrap();
    assert!(
        results.iter().all(|r| r.is_ok()),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    // Too many envelopes: the whole call is refused.
    let too_many = vec![pb::Envelope::default(); creto_gateways::messaging::service::MAX_BATCH + 1];
    let (c, m) = code(alice.send_batch(too_many).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // None: refused, not an empty success (a client whose envelopes field did not decode
    // would otherwise believe it sent them).
    let (c, m) = code(alice.send_batch(Vec::new()).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("empty"), "{m}");
    running.stop().await;
}

async fn bad_input_gets_clear_statuses(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let _bob = agent(&url, "bob").await;
    let keys = alice.recipient_keys("bob").await.unwrap();

    // Unknown suite, even correctly signed: refused, never guessed.
    let mut env_ = alice.seal("bob", &keys, b"x").unwrap();
    let mut h = envelope::header(&env_).unwrap();
    h.aead_id = 0x0002;
    env_.header = h.encode_to_vec();
    envelope::sign(&mut env_, &alice.signing);
    let (c, m) = code(alice.send_envelope(env_).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("unknown HPKE suite"), "{m}");

    // Oversized.
    let (c, m) = code(alice.send("bob", &vec![7u8; 300 * 1024]).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("exceeds"), "{m}");

    // A recipient or sender key the directory does not know.
    let to_nobody = alice.seal("nobody", &keys, b"x").unwrap();
    let (c, m) = code(alice.send_envelope(to_nobody).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition);
    assert!(m.contains("not registered"), "{m}");
    let mut ghost = AgentClient::connect(&url, "", "default", "ghost")
        .await
        .unwrap();
    let (c, m) = code(ghost.send("bob", b"x").await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition);
    assert!(m.contains("ghost-sig-1"), "{m}");

    // An envelope for another tenant.
    let mut other = AgentClient::connect(&url, "", "other", "alice")
        .await
        .unwrap();
    other.signing = alice.signing.clone();
    let cross_tenant = other.seal("bob", &keys, b"x").unwrap();
    let (c, _) = code(other.send_envelope(cross_tenant).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);

    // Registration: no proof, a wrong proof, a short key, a reused key id, hostile ids.
    let signing = creto_domain::messaging::SigningKeyPair::generate("alice-sig-9");
    let base = pb::RegisterKeyRequest {
        agent_id: "alice".into(),
        key_id: "alice-sig-9".into(),
        purpose: KeyPurpose::Signing as i32,
        public_key: signing.public().to_vec(),
        overlap: None,
        proof: signing.proof("default", "alice"),
        endorsed_by: "alice-sig-1".into(),
        endorsement: alice.signing.endorse(
            "default",
            "alice",
            "alice-sig-9",
            KeyPurpose::Signing,
            &signing.public(),
        ),
    };
    let rpc = alice.rpc();
    for (request, expected) in [
        (
            pb::RegisterKeyRequest {
                proof: vec![],
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RegisterKeyRequest {
                proof: signing.proof("default", "mallory"),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RegisterKeyRequest {
                public_key: vec![1; 31],
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RegisterKeyRequest {
                key_id: "alice-sig-1".into(),
                proof: creto_domain::messaging::SigningKeyPair::from_seed(
                    "alice-sig-1",
                    signing.seed(),
                )
                .proof("default", "alice"),
                ..base.clone()
            },
            Code::AlreadyExists,
        ),
        (
            pb::RegisterKeyRequest {
                agent_id: "a.>".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            pb::RegisterKeyRequest {
                purpose: 0,
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
    ] {
        let e = rpc.register_key(request).await.unwrap_err();
        assert_eq!(e.code(), expected, "{}", e.message());
    }
    // Registering the same key twice is a no-op.
    assert!(
        !rpc.register_key(base.clone())
            .await
            .unwrap()
            .into_inner()
            .already_registered
    );
    assert!(
        rpc.register_key(base)
            .await
            .unwrap()
            .into_inner()
            .already_registered
    );
    let e = rpc
        .receive(pb::ReceiveRequest {
            agent_id: "bob*".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    running.stop().await;
}

/// Tenants never see each other: the same agent names in two tenants, with real tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, keygen("k1")).unwrap();
    let auth = AuthArgs {
        auth_keys: Some(keys.clone()),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let running = env.start_messaging_with(auth).await;
    let url = format!("http://{}", running.grpc_addr.unwrap());
    let ring = KeyRing::load(&keys).unwrap();
    let token = |tenant: &str| {
        ring.issue(tenant, "agent", &["admin".into()], Duration::from_secs(300))
            .unwrap()
    };
    let connect = |tenant: &'static str, id: &'static str| {
        let t = token(tenant);
        let url = url.clone();
        async move {
            let mut a = AgentClient::connect(&url, &t, tenant, id).await.unwrap();
            a.register().await.unwrap();
            a
        }
    };
    let mut a_alice = connect("a", "alice").await;
    let mut a_bob = connect("a", "bob").await;
    let mut b_bob = connect("b", "bob").await;
    let mut b_eve = connect("b", "eve").await;
    a_alice.send("bob", b"for a/bob").await.unwrap();

    // b/bob's queue is empty; a/bob's has the message.
    let mut inbox = b_bob.receive(0).await.unwrap();
    assert!(next(&mut inbox, Duration::from_millis(600)).await.is_none());
    let mut inbox = a_bob.receive(0).await.unwrap();
    assert!(next(&mut inbox, Duration::from_secs(5)).await.is_some());
    // Tenant b cannot look up tenant a's alice, revoke her keys, or ack for a/bob.
    let e = b_eve
        .rpc()
        .lookup_keys(pb::LookupKeysRequest {
            agent_id: "alice".into(),
            include_inactive: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = b_eve
        .rpc()
        .revoke_key(pb::RevokeKeyRequest {
            agent_id: "alice".into(),
            key_id: "alice-sig-1".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // An envelope claiming tenant a, sent with a tenant-b token.
    let keys = a_alice.recipient_keys("bob").await.unwrap();
    let forged = a_alice.seal("bob", &keys, b"x").unwrap();
    let (c, _) = code(b_eve.send_envelope(forged).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    // A token with the `agent` role acts only as its own agent: Bob cannot drain Alice's
    // queue, acknowledge for her, send as her or register keys for her.
    let bob_token = ring
        .issue("a", "bob", &["agent".into()], Duration::from_secs(300))
        .unwrap();
    let mut as_bob = AgentClient::connect(&url, &bob_token, "a", "bob")
        .await
        .unwrap();
    as_bob.signing = a_bob.signing.clone();
    as_bob.send("alice", b"from bob, as bob").await.unwrap();
    let e = as_bob
        .rpc()
        .receive(pb::ReceiveRequest {
            agent_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = as_bob
        .rpc()
        .ack(pb::AckRequest {
            agent_id: "alice".into(),
            through_cursor: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut impostor = AgentClient::connect(&url, &bob_token, "a", "alice")
        .await
        .unwrap();
    impostor.signing = a_alice.signing.clone();
    let (c, m) = code(impostor.send("bob", b"as alice").await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied, "{m}");
    // Refused, it is counted under the caller: the sender an envelope claims is the client's
    // choice, and would otherwise make one new series per name it invents.
    let metrics = creto_replay_tests::metrics_text(running.metrics_addr).await;
    assert!(
        metrics.contains(r#"messaging_messages_sent_total{sender_id="a/bob",status="forbidden"}"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"sender_id="a/alice",status="forbidden""#),
        "{metrics}"
    );
    let (c, _) = code(impostor.register().await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    // In a batch too each envelope is checked: Bob's own goes through, one as Alice does not.
    let to_bob = impostor.recipient_keys("bob").await.unwrap();
    let as_alice = impostor.seal("bob", &to_bob, b"batched, as alice").unwrap();
    let to_alice = as_bob.recipient_keys("alice").await.unwrap();
    let own = as_bob.seal("alice", &to_alice, b"batched, as bob").unwrap();
    let results = as_bob.send_batch(vec![as_alice, own]).await.unwrap();
    let refused = results[0].as_ref().unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "{}",
        refused.message()
    );
    assert!(results[1].is_ok(), "{:?}", results[1]);
    assert!(as_bob.receive(0).await.is_ok());
    // A header that does not decode is invalid, not a permission Bob could ask for.
    let mut garbled = as_bob.seal("alice", &to_alice, b"garbled").unwrap();
    garbled.header = vec![0xFF; 8];
    let (c, m) = code(as_bob.send_envelope(garbled).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("header does not decode"), "{m}");

    // No token at all.
    let mut anonymous = AgentClient::connect(&url, "not-a-token", "a", "alice")
        .await
        .unwrap();
    let (c, _) = code(anonymous.send("bob", b"x").await.unwrap_err());
    assert_eq!(c, Code::Unauthenticated);
    running.stop().await;
    env.drop().await;
}

async fn a_message_sent_to_one_replica_reaches_a_recipient_on_another(env: &Env) {
    let (first, url_a) = env.start_messaging().await;
    let (second, url_b) = env.start_messaging().await;
    let mut alice = agent(&url_a, "alice").await;
    let mut bob = agent(&url_b, "bob").await;
    // Bob listens on the second replica; Alice sends through the first.
    let mut inbox = bob.receive(0).await.unwrap();
    let started = std::time::Instant::now();
    for i in 0..20 {
        alice.send("bob", format!("r{i}").as_bytes()).await.unwrap();
    }
    for i in 0..20 {
        let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            bob.open(&m).await.unwrap().plaintext,
            format!("r{i}").as_bytes()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A key revoked through one replica is refused by the other within its refresh.
    alice
        .rpc()
        .revoke_key(pb::RevokeKeyRequest {
            agent_id: "alice".into(),
            key_id: "alice-sig-1".into(),
            reason: "rotated out".into(),
        })
        .await
        .unwrap();
    let mut via_b = alice.reconnect(&url_b, "").await.unwrap();
    // The other replica follows the log: within moments, however loaded the machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (c, m) = loop {
        tokio::time::sleep(creto_gateways::messaging::directory::REFRESH).await;
        match via_b.send("bob", b"late").await {
            Err(e) => break code(e),
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "the revoked key still signs on the other replica"
            ),
        }
    };
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    first.stop().await;
    second.stop().await;
}

async fn a_recipient_has_a_bounded_number_of_receive_streams(env: &Env) {
    use creto_gateways::messaging::delivery::MAX_SESSIONS;
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    let mut open = Vec::new();
    for _ in 0..MAX_SESSIONS {
        open.push(bob.receive(0).await.unwrap());
    }
    let (c, m) = code(bob.receive(0).await.unwrap_err());
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("Receive streams open"), "{m}");
    // Another recipient is not held back, and the open streams still deliver.
    let _alices = alice.receive(0).await.unwrap();
    alice.send("bob", b"still here").await.unwrap();
    for inbox in &mut open {
        let m = next(inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(bob.open(&m).await.unwrap().plaintext, b"still here");
    }
    // A stream the client drops makes room again.
    open.pop();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match bob.receive(0).await {
            Ok(inbox) => break inbox,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(code(e).0, Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room after a stream closed: {e}"),
        }
    };
    let m = next(&mut again, Duration::from_secs(10)).await.unwrap();
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"still here");
    running.stop().await;
}

/// A replica reads the whole key directory before it serves: started on a long key history,
/// it refuses a key revoked late in it from its first call on (it used to serve while the
/// directory was still being read, and take the key for a valid one).
async fn a_restarted_replica_refuses_a_key_revoked_before_it_started(env: &Env) {
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    agent(&url, "bob").await;
    for i in 0..100 {
        agent(&url, &format!("filler-{i}")).await;
    }
    alice
        .rpc()
        .revoke_key(pb::RevokeKeyRequest {
            agent_id: "alice".into(),
            key_id: "alice-sig-1".into(),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    running.stop().await;
    let (running, url) = env.start_messaging().await;
    let mut again = AgentClient::connect(&url, "", "default", "alice")
        .await
        .unwrap();
    again.signing = alice.signing.clone();
    let (c, m) = code(again.send("bob", b"with a revoked key").await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("revoked"), "{m}");
    running.stop().await;
}

/// Whoever can call RegisterKey for an agent (an operator's token, here a client without
/// authentication) cannot put a key in its name without the agent's signing key; starting a
/// new chain takes revoking the agent's keys, which clients that pinned it refuse.
async fn only_the_agents_signing_key_puts_keys_in_its_name(env: &Env) {
    use creto_domain::messaging::{EncryptionKeyPair, SigningKeyPair};
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = agent(&url, "bob").await;
    alice.send("bob", b"first contact").await.unwrap();
    let mut operator = AgentClient::connect(&url, "", "default", "operator")
        .await
        .unwrap();
    let evil = EncryptionKeyPair::generate("bob-enc-evil");
    let evil_key = |endorsed_by: &str, endorsement: Vec<u8>| pb::RegisterKeyRequest {
        agent_id: "bob".into(),
        key_id: "bob-enc-evil".into(),
        purpose: KeyPurpose::Encryption as i32,
        public_key: evil.public().to_vec(),
        endorsed_by: endorsed_by.into(),
        endorsement,
        ..Default::default()
    };
    // Not endorsed, or endorsed by a key that is not Bob's.
    let e = operator
        .rpc()
        .register_key(evil_key("", vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("bob-sig-1") && e.message().contains("must be endorsed"),
        "{e:?}"
    );
    let mallory = SigningKeyPair::generate("bob-sig-1");
    let forged = mallory.endorse(
        "default",
        "bob",
        "bob-enc-evil",
        KeyPurpose::Encryption,
        &evil.public(),
    );
    let e = operator
        .rpc()
        .register_key(evil_key("bob-sig-1", forged))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("endorsement"), "{e:?}");

    // Bob's own rotations, endorsed by his keys, are taken and trusted along the chain.
    bob.rotate_signing("bob-sig-2", Duration::from_secs(0))
        .await
        .unwrap();
    bob.rotate_encryption("bob-enc-2", Duration::from_secs(0))
        .await
        .unwrap();
    alice.send("bob", b"after the rotations").await.unwrap();
    bob.send("alice", b"signed with bob-sig-2").await.unwrap();
    let mut inbox = bob.receive(0).await.unwrap();
    for expected in [&b"first contact"[..], b"after the rotations"] {
        let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
        assert_eq!(bob.open(&m).await.unwrap().plaintext, expected);
        bob.ack(m.cursor).await.unwrap();
    }
    let mut alice_inbox = alice.receive(0).await.unwrap();
    let m = next(&mut alice_inbox, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        alice.open(&m).await.unwrap().plaintext,
        b"signed with bob-sig-2"
    );

    // Taking Bob's name over: revoke his keys, register new ones (a new chain the server
    // cannot tell from Bob starting over). Alice, who pinned Bob's chain, refuses to seal to it.
    for key_id in ["bob-sig-2", "bob-enc-2"] {
        operator
            .rpc()
            .revoke_key(pb::RevokeKeyRequest {
                agent_id: "bob".into(),
                key_id: key_id.into(),
                reason: "taken over".into(),
            })
            .await
            .unwrap();
    }
    let mut impostor = AgentClient::with_rpc(operator.rpc().clone(), "default", "bob");
    impostor.signing = SigningKeyPair::generate("bob-sig-3");
    impostor.encryption = vec![EncryptionKeyPair::generate("bob-enc-3")];
    impostor.register().await.unwrap();
    let refused = alice.send("bob", b"for the impostor").await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Untrusted(ref why) if why.contains("encryption key")),
        "{refused}"
    );
    // A client meeting Bob for the first time pins what it finds (trust on first use), and
    // Alice does too once told to.
    alice.trust_anew("bob");
    alice.send("bob", b"confirmed out of band").await.unwrap();

    // An agent without a signing key: nothing vouches for its keys, so only a client told to
    // trust such agents seals to them.
    let dave = EncryptionKeyPair::generate("dave-enc-1");
    operator
        .rpc()
        .register_key(pb::RegisterKeyRequest {
            agent_id: "dave".into(),
            key_id: "dave-enc-1".into(),
            purpose: KeyPurpose::Encryption as i32,
            public_key: dave.public().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = alice.send("dave", b"unsigned").await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Untrusted(ref why) if why.contains("trust_unsigned_agents")),
        "{refused}"
    );
    alice.trust_unsigned_agents = true;
    alice.send("dave", b"unsigned, allowed").await.unwrap();
    running.stop().await;
}

/// An agent whose encryption key was registered before endorsements existed (so carries none)
/// is refused by clients that pinned its signing key, until its upgraded client registers
/// again: that endorses the key it holds, and no new key is needed.
async fn keys_registered_before_endorsements_are_endorsed_by_register(env: &Env) {
    use creto_streams::headers::{content_types, names};
    use creto_streams::{AppendEvent, Headers};
    let (running, url) = env.start_messaging().await;
    let mut alice = agent(&url, "alice").await;
    let mut bob = AgentClient::connect(&url, "", "default", "bob")
        .await
        .unwrap();
    let signing = pb::RegisterKeyRequest {
        agent_id: "bob".into(),
        key_id: bob.signing.key_id.clone(),
        purpose: KeyPurpose::Signing as i32,
        public_key: bob.signing.public().to_vec(),
        proof: bob.signing.proof("default", "bob"),
        ..Default::default()
    };
    bob.rpc().register_key(signing).await.unwrap();
    // What the previous version stored for Bob's encryption key: no endorsement.
    let enc = bob.encryption[0].clone();
    let legacy = pb::KeyEvent {
        event: Some(pb::key_event::Event::Registered(pb::KeyRegistered {
            agent_id: "bob".into(),
            key_id: enc.key_id.clone(),
            purpose: KeyPurpose::Encryption as i32,
            public_key: enc.public().to_vec(),
            registered_at: Some(creto_streams::envelope::timestamp(chrono::Utc::now())),
            ..Default::default()
        })),
    };
    env.platform
        .log
        .append(AppendEvent {
            subject: env.subject("messaging.keys.default.bob"),
            id: format!("key:default:bob:{}", enc.key_id),
            expected_subject_sequence: None,
            headers: Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::EVENT_TYPE, "messaging.key_registered")
                .with(names::TENANT, "default"),
            payload: prost::Message::encode_to_vec(&legacy).into(),
        })
        .await
        .unwrap();
    let mut refused = None;
    for _ in 0..50 {
        match alice.send("bob", b"before").await {
            Err(e @ ClientError::Untrusted(_)) => {
                refused = Some(e);
                break;
            }
            // The gateway has not followed the appended key yet.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(refused.is_some(), "an unendorsed key was sealed to");
    bob.register().await.unwrap();
    alice.send("bob", b"after").await.unwrap();
    let mut inbox = bob.receive(0).await.unwrap();
    let m = next(&mut inbox, Duration::from_secs(10)).await.unwrap();
    assert_eq!(bob.open(&m).await.unwrap().plaintext, b"after");
    running.stop().await;
}
