//! Which of an agent's keys a client trusts: the ones its pinned signing key vouched for,
//! directly or through a chain of endorsements, each checked here rather than taken on the
//! server's word.
//!
//! A client meets other agents' keys through the directory, which the server keeps. Taken as
//! shown, whoever runs the server (or holds an operator token) could list a key of their own
//! under an agent's name and read what is sealed to it. So the first time a client looks at an
//! agent that has a signing key, it pins the root of the agent's current chain (trust on first
//! use, as SSH does), and from then on trusts only keys endorsed, one after the other, from
//! that root ([`super::keys::SigningKeyPair::endorse`]). An agent that lost its keys starts a
//! new chain, which a pinned client refuses until it is told to pin again.
use std::collections::HashSet;

use creto_schemas::messaging::v1::{AgentKey, KeyPurpose};

use super::keys::verify_endorsement;

/// The signing key a first look pins: the root of the agent's newest chain, the last signing
/// key registered without an endorsement. `None` when the agent has no signing key.
pub fn chain_root(keys: &[AgentKey]) -> Option<Vec<u8>> {
    keys.iter()
        .rev()
        .find(|k| k.purpose == KeyPurpose::Signing as i32 && k.endorsed_by.is_empty())
        .map(|k| k.public_key.clone())
}

/// The ids of `keys` that descend from `root`: the signing key with `root`'s material, and each
/// key endorsed by a signing key trusted before it. `keys` are one agent's in registration
/// order, retired and revoked ones included, so that a chain can pass through them.
pub fn trusted(tenant: &str, agent_id: &str, root: &[u8], keys: &[AgentKey]) -> HashSet<String> {
    let mut signers: Vec<(&str, &[u8])> = Vec::new();
    let mut out = HashSet::new();
    for k in keys.iter().filter(|k| k.agent_id == agent_id) {
        let purpose = KeyPurpose::try_from(k.purpose).unwrap_or(KeyPurpose::Unspecified);
        let signing = purpose == KeyPurpose::Signing;
        let is_root = signing && k.endorsed_by.is_empty() && k.public_key == root;
        let endorsed = !k.endorsed_by.is_empty()
            && signers.iter().any(|(id, endorser)| {
                *id == k.endorsed_by
                    && verify_endorsement(
                        endorser,
                        tenant,
                        agent_id,
                        &k.key_id,
                        purpose,
                        &k.public_key,
                        &k.endorsement,
                    )
                    .is_ok()
            });
        if is_root || endorsed {
            out.insert(k.key_id.clone());
            if signing {
                signers.push((&k.key_id, &k.public_key));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::{EncryptionKeyPair, SigningKeyPair};

    fn listed(purpose: KeyPurpose, id: &str, public: [u8; 32]) -> AgentKey {
        AgentKey {
            agent_id: "bob".into(),
            key_id: id.into(),
            purpose: purpose as i32,
            public_key: public.to_vec(),
            ..Default::default()
        }
    }

    fn endorsed(by: &SigningKeyPair, mut key: AgentKey) -> AgentKey {
        let purpose = KeyPurpose::try_from(key.purpose).unwrap();
        key.endorsement = by.endorse("t", "bob", &key.key_id, purpose, &key.public_key);
        key.endorsed_by = by.key_id.clone();
        key
    }

    #[test]
    fn keys_are_trusted_along_endorsements_from_the_pinned_root() {
        let (sig1, sig2) = (
            SigningKeyPair::generate("s1"),
            SigningKeyPair::generate("s2"),
        );
        let (enc1, enc2) = (
            EncryptionKeyPair::generate("e1"),
            EncryptionKeyPair::generate("e2"),
        );
        let chain = vec![
            listed(KeyPurpose::Signing, "s1", sig1.public()),
            endorsed(&sig1, listed(KeyPurpose::Encryption, "e1", enc1.public())),
            endorsed(&sig1, listed(KeyPurpose::Signing, "s2", sig2.public())),
            endorsed(&sig2, listed(KeyPurpose::Encryption, "e2", enc2.public())),
        ];
        let root = chain_root(&chain).unwrap();
        assert_eq!(root, sig1.public());
        let all: HashSet<String> = ["s1", "e1", "s2", "e2"].map(String::from).into();
        assert_eq!(trusted("t", "bob", &root, &chain), all);

        // A key slipped in by whoever keeps the directory: unendorsed, endorsed by a key of
        // its own, or carrying another key's endorsement.
        let mallory = SigningKeyPair::generate("m1");
        let evil = EncryptionKeyPair::generate("e3").public();
        let mut forged = chain.clone();
        forged.push(listed(KeyPurpose::Encryption, "e3", evil));
        forged.push(endorsed(
            &mallory,
            listed(KeyPurpose::Encryption, "e4", evil),
        ));
        let mut copied = listed(KeyPurpose::Encryption, "e2", evil);
        copied.endorsed_by = "s2".into();
        copied.endorsement = chain[3].endorsement.clone();
        forged.push(copied);
        assert_eq!(trusted("t", "bob", &root, &forged), all);
        // Another tenant's agent of the same name cannot lend its endorsements.
        assert!(trusted("other", "bob", &root, &chain).len() == 1);

        // A new chain (the agent, or someone in its name, started over): the old pin trusts
        // none of it, a first look pins the new root.
        let fresh = SigningKeyPair::generate("s9");
        let mut reset = chain.clone();
        reset.push(listed(KeyPurpose::Signing, "s9", fresh.public()));
        reset.push(endorsed(&fresh, listed(KeyPurpose::Encryption, "e9", evil)));
        assert!(!trusted("t", "bob", &root, &reset).contains("e9"));
        assert_eq!(chain_root(&reset).unwrap(), fresh.public());
        assert!(
            chain_root(&chain[1..2]).is_none(),
            "no signing key, no root"
        );
    }
}
