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

/// One key as trusted: its id, purpose and material, all three, since the directory could list
/// another key under a trusted key's id.
pub type TrustedKey = (String, i32, Vec<u8>);

/// The keys of `keys` that descend from `root`: the signing key with `root`'s material, and
/// each key endorsed by a signing key trusted before it. `keys` are one agent's in
/// registration order, retired and revoked ones included, so that a chain can pass through
/// them. A listing that names another agent or shows one key id twice is not the directory's
/// to give: refused, with why.
pub fn trusted(
    tenant: &str,
    agent_id: &str,
    root: &[u8],
    keys: &[AgentKey],
) -> Result<HashSet<TrustedKey>, String> {
    let mut ids = HashSet::new();
    for k in keys {
        if k.agent_id != agent_id {
            return Err(format!(
                "the directory listed a key of agent {:?} among {agent_id:?}'s",
                k.agent_id
            ));
        }
        if !ids.insert(k.key_id.as_str()) {
            return Err(format!(
                "the directory listed {agent_id:?}'s key id {:?} twice",
                k.key_id
            ));
        }
    }
    let mut signers: Vec<(&str, &[u8])> = Vec::new();
    let mut out = HashSet::new();
    // Until nothing more is trusted: an endorser may be listed after a key it endorsed later
    // (a key from before endorsements, endorsed by a newer signing key).
    loop {
        let before = out.len();
        for k in keys {
            let key = (k.key_id.clone(), k.purpose, k.public_key.clone());
            if out.contains(&key) {
                continue;
            }
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
                out.insert(key);
                if signing {
                    signers.push((&k.key_id, &k.public_key));
                }
            }
        }
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

/// Whether `key` is one of `trusted`, material and all.
pub fn is_trusted(trusted: &HashSet<TrustedKey>, key: &AgentKey) -> bool {
    trusted.contains(&(key.key_id.clone(), key.purpose, key.public_key.clone()))
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
        let ids = |listing: &[AgentKey]| -> Vec<String> {
            let t = trusted("t", "bob", &root, listing).unwrap();
            listing
                .iter()
                .filter(|k| is_trusted(&t, k))
                .map(|k| k.key_id.clone())
                .collect()
        };
        assert_eq!(ids(&chain), ["s1", "e1", "s2", "e2"]);

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
        let mut copied = listed(KeyPurpose::Encryption, "e5", evil);
        copied.endorsed_by = "s2".into();
        copied.endorsement = chain[3].endorsement.clone();
        forged.push(copied);
        assert_eq!(ids(&forged), ["s1", "e1", "s2", "e2"]);
        // A trusted id listed again with other material, or a key of another agent: refused.
        let mut twice = chain.clone();
        let mut impostor = chain[3].clone();
        impostor.public_key = evil.to_vec();
        twice.insert(2, impostor);
        assert!(trusted("t", "bob", &root, &twice)
            .unwrap_err()
            .contains("twice"));
        let mut foreign = chain.clone();
        foreign[3].agent_id = "carol".into();
        assert!(trusted("t", "bob", &root, &foreign).is_err());
        // Another tenant's agent of the same name cannot lend its endorsements.
        assert_eq!(trusted("other", "bob", &root, &chain).unwrap().len(), 1);

        // A new chain (the agent, or someone in its name, started over): the old pin trusts
        // none of it, a first look pins the new root.
        let fresh = SigningKeyPair::generate("s9");
        let mut reset = chain.clone();
        reset.push(listed(KeyPurpose::Signing, "s9", fresh.public()));
        reset.push(endorsed(&fresh, listed(KeyPurpose::Encryption, "e9", evil)));
        let t = trusted("t", "bob", &root, &reset).unwrap();
        assert!(!reset.iter().any(|k| k.key_id == "e9" && is_trusted(&t, k)));
        assert_eq!(chain_root(&reset).unwrap(), fresh.public());
        assert!(
            chain_root(&chain[1..2]).is_none(),
            "no signing key, no root"
        );

        // An endorser listed after the key it endorsed (a key from before endorsements,
        // endorsed later by a newer signing key) still counts.
        let late = vec![
            endorsed(&sig2, listed(KeyPurpose::Encryption, "e1", enc1.public())),
            listed(KeyPurpose::Signing, "s1", sig1.public()),
            endorsed(&sig1, listed(KeyPurpose::Signing, "s2", sig2.public())),
        ];
        let t = trusted("t", "bob", &root, &late).unwrap();
        assert!(late.iter().all(|k| is_trusted(&t, k)));
    }
}
