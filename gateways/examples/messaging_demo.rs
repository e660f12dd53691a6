//! The README's messaging walkthrough, runnable: Alice seals a message for Bob and sends it
//! through the messaging gateway; Bob receives it, verifies and opens it, and acknowledges it.
//!
//! ```sh
//! ALICE_TOKEN=… BOB_TOKEN=… cargo run -p creto-gateways --example messaging_demo
//! ```
//!
//! Each token is an `agent` token whose subject is the agent's name (`ALICE`, `BOB`: `alice`
//! and `bob` unless set). `MESSAGING_URL` (http://127.0.0.1:50054) and `TENANT` (`default`)
//! when elsewhere. Each run registers fresh keys under the library's first key ids
//! (`<agent>-sig-1`, `<agent>-enc-1`): run it again with other agents (`ALICE=alice2 BOB=bob2`
//! and their tokens), or the registration is refused (`ALREADY_EXISTS`).
use creto_gateways::messaging::client::AgentClient;

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn token(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| {
        format!("set {name}: enablement token issue --tenant … --subject … --roles agent")
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = var("MESSAGING_URL", "http://127.0.0.1:50054");
    let tenant = var("TENANT", "default");
    let (alice_id, bob_id) = (var("ALICE", "alice"), var("BOB", "bob"));

    // A recipient registers its keys before anyone can seal for it.
    let mut bob = AgentClient::connect(&url, &token("BOB_TOKEN")?, &tenant, &bob_id).await?;
    bob.register().await?;
    let mut alice = AgentClient::connect(&url, &token("ALICE_TOKEN")?, &tenant, &alice_id).await?;
    alice.register().await?;
    let sent = alice.send(&bob_id, b"deploy approved").await?;
    println!(
        "{alice_id} sent a sealed message, stored at cursor {}",
        sent.cursor
    );

    // From after Bob's last acknowledged message, up to the one just sent.
    let mut inbox = bob.receive(0).await?;
    while let Some(message) = inbox.message().await? {
        let opened = bob.open(&message).await?;
        println!(
            "{bob_id} opened cursor {} from {}: {:?}",
            message.cursor,
            opened.header.sender_agent_id,
            String::from_utf8_lossy(&opened.plaintext)
        );
        bob.ack(message.cursor).await?;
        if message.cursor >= sent.cursor {
            break;
        }
    }
    Ok(())
}
