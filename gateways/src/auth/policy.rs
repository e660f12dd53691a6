//! The embedded authorizer: an ordered list of rules by tenant, role, product and method,
//! from a TOML file (`ENABLEMENT_POLICY`, re-read when it changes) or the built-in default.
//! The first rule that matches decides; nothing matching means deny.
//!
//! ```toml
//! [[rules]]
//! roles = ["producer"]              # any of; omitted = any role
//! products = ["metering"]           # omitted = every product
//! methods = ["IngestEvents"]        # omitted = every method
//! tenants = ["acme"]                # omitted = every tenant
//! subjects = ["billing-agent"]      # omitted = every subject (a token's `sub`, a certificate's CN)
//! effect = "allow"                  # or "deny"
//! ```
//!
//! A deny rule naming a tenant and a subject, first in the file, stops one leaked credential
//! at once without touching the rest of its tenant or key.
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Deserialize;

use super::{Action, Authorizer, Decision, Identity};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub products: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    pub effect: Effect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rules: Vec<Rule>,
}

fn any_or(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|x| x == "*" || x == value)
}

impl Rule {
    fn matches(&self, who: &Identity, action: &Action) -> bool {
        any_or(&self.tenants, &who.tenant)
            && any_or(&self.subjects, &who.subject)
            && (self.roles.is_empty() || self.roles.iter().any(|r| who.has_role(r)))
            && any_or(&self.products, &action.product)
            && any_or(&self.methods, &action.method)
    }
}

/// The rules when no file is configured: `admin` and `operator` may do everything in their
/// tenant, `platform-operator` may list every tenant's dead letters, `producer`
/// may send usage and check quotas, `reader` may call the read methods (`Query*`, `List*`,
/// `Get*`, `CheckQuota`), `agent`
/// may use messaging and its tenant's sandboxes, and ask for approvals (as the agent its
/// token names: the gateways check that), `approver` may answer approval requests (as itself).
pub const DEFAULT_POLICY: &str = r#"
[[rules]]
roles = ["admin", "operator"]
effect = "allow"

[[rules]]
roles = ["platform-operator"]
methods = ["ListDeadLetters"]
effect = "allow"

[[rules]]
roles = ["producer"]
methods = ["IngestEvents", "CheckQuota"]
effect = "allow"

[[rules]]
roles = ["reader"]
methods = ["QueryUsage", "ListMeters", "ListDeadLetters", "GetInvoice", "ListInvoices", "GetQuota", "CheckQuota"]
effect = "allow"

[[rules]]
roles = ["agent"]
products = ["messaging", "runtime"]
effect = "allow"

[[rules]]
roles = ["reader"]
products = ["runtime"]
methods = ["GetSandbox", "ListSandboxes", "GetAttestation"]
effect = "allow"

[[rules]]
roles = ["agent"]
products = ["oversight"]
methods = ["CreateRequest", "GetRequest", "ListRequests", "WatchRequest", "CancelRequest"]
effect = "allow"

[[rules]]
roles = ["approver"]
products = ["oversight"]
methods = ["Respond", "GetRequest", "ListRequests", "WatchRequest", "ListPolicies"]
effect = "allow"
"#;

pub fn parse(text: &str, origin: &str) -> Result<Vec<Rule>, String> {
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| format!("policy {origin} is not valid: {e}"))?;
    Ok(file.rules)
}

struct Loaded {
    rules: Vec<Rule>,
    modified: Option<SystemTime>,
}

#[derive(Clone)]
pub struct PolicyAuthorizer {
    path: Option<PathBuf>,
    loaded: Arc<RwLock<Loaded>>,
}

impl PolicyAuthorizer {
    pub fn default_policy() -> Self {
        PolicyAuthorizer {
            path: None,
            loaded: Arc::new(RwLock::new(Loaded {
                rules: parse(DEFAULT_POLICY, "built-in").expect("built-in policy parses"),
                modified: None,
            })),
        }
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy {} ({e})", path.display()))?;
        Ok(PolicyAuthorizer {
            loaded: Arc::new(RwLock::new(Loaded {
                rules: parse(&text, &path.display().to_string())?,
                modified: std::fs::metadata(path).and_then(|m| m.modified()).ok(),
            })),
            path: Some(path.to_path_buf()),
        })
    }

    /// Re-reads the file when it changed; a broken file keeps the previous rules.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let now = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if now == self.loaded.read().unwrap().modified {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy {} ({e})", path.display()))?;
        let rules = parse(&text, &path.display().to_string())?;
        *self.loaded.write().unwrap() = Loaded {
            rules,
            modified: now,
        };
        Ok(true)
    }
}

#[async_trait]
impl Authorizer for PolicyAuthorizer {
    async fn decide(&self, who: &Identity, action: &Action) -> Decision {
        let loaded = self.loaded.read().unwrap();
        match loaded.rules.iter().find(|r| r.matches(who, action)) {
            Some(r) if r.effect == Effect::Allow => Decision::Allow,
            Some(_) => Decision::Deny(format!(
                "the policy denies {}/{} to {} of tenant {}",
                action.product, action.method, who.subject, who.tenant
            )),
            None => Decision::Deny(format!(
                "no policy rule allows {}/{} for roles {:?}; ask an operator for a role that does",
                action.product, action.method, who.roles
            )),
        }
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("policy file {}", p.display()),
            None => "built-in policy (admin, operator, producer, reader)".into(),
        }
    }
}

impl PolicyAuthorizer {
    /// The refusal when the first rule matching is a deny rule; `None` when it allows or no
    /// rule matches.
    fn denies(&self, who: &Identity, action: &Action) -> Option<Decision> {
        let loaded = self.loaded.read().unwrap();
        let rule = loaded.rules.iter().find(|r| r.matches(who, action))?;
        (rule.effect == Effect::Deny).then(|| {
            Decision::Deny(format!(
                "the policy denies {}/{} to {} of tenant {}",
                action.product, action.method, who.subject, who.tenant
            ))
        })
    }
}

/// creto-authz decides, after the deny rules of a local policy: with `AUTHZ_ENDPOINT` set, a
/// deny rule in `ENABLEMENT_POLICY` still stops a leaked credential at once (the runbook's
/// "Revoke a caller now"), where it used to be ignored. Allow rules and a call no rule matches
/// are creto-authz's to decide.
pub struct DenyRulesFirst {
    pub local: PolicyAuthorizer,
    pub then: std::sync::Arc<dyn Authorizer>,
}

#[async_trait]
impl Authorizer for DenyRulesFirst {
    async fn decide(&self, who: &Identity, action: &Action) -> Decision {
        match self.local.denies(who, action) {
            Some(refused) => refused,
            None => self.then.decide(who, action).await,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}, after the deny rules of {}",
            self.then.describe(),
            self.local.describe()
        )
    }
}

impl super::reload::Reloadable for PolicyAuthorizer {
    const WHAT: &'static str = "authorization policy";
    fn reload_if_changed(&self) -> Result<bool, String> {
        PolicyAuthorizer::reload_if_changed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    /// The rules of a TOML block under `key: |` in a deployment file, as parsed.
    fn shipped_rules(path: &str, key: &str) -> String {
        let text =
            std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
        lines.next().expect("the policy block");
        let block: Vec<&str> = lines
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect();
        format!("{:?}", parse(&block.join("\n"), path).unwrap())
    }

    /// The deployments mount their own policy file, which then replaces the built-in rules: it
    /// once lacked CheckQuota for producers and the invoice and quota reads for readers, so
    /// every cluster refused what the README grants.
    #[test]
    fn the_shipped_policy_files_grant_what_the_built_in_policy_does() {
        let built_in = format!("{:?}", parse(DEFAULT_POLICY, "built-in").unwrap());
        assert_eq!(
            shipped_rules("ops/k8s/base/common/policy.yaml", "policy.toml"),
            built_in
        );
        assert_eq!(
            shipped_rules("ops/helm/creto-enablement/values.yaml", "rules"),
            built_in
        );
    }

    fn who(tenant: &str, roles: &[&str]) -> Identity {
        Identity {
            tenant: tenant.into(),
            subject: "s".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            via: AuthMethod::Bearer,
        }
    }

    fn act(method: &str) -> Action {
        Action {
            product: "metering".into(),
            method: method.into(),
        }
    }

    /// With creto-authz deciding, the local policy's deny rules still come first (the
    /// runbook's revocation); what they do not deny is creto-authz's (here the built-in
    /// policy stands in for it).
    #[tokio::test]
    async fn deny_rules_apply_before_the_delegated_authorizer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            "[[rules]]\ntenants = [\"ok\"]\nsubjects = [\"leaked\"]\neffect = \"deny\"\n\
             [[rules]]\nroles = [\"admin\"]\neffect = \"allow\"\n",
        )
        .unwrap();
        let both = DenyRulesFirst {
            local: PolicyAuthorizer::load(&path).unwrap(),
            then: std::sync::Arc::new(PolicyAuthorizer::default_policy()),
        };
        let leaked = Identity {
            subject: "leaked".into(),
            ..who("ok", &["admin"])
        };
        assert!(matches!(
            both.decide(&leaked, &act("QueryUsage")).await,
            Decision::Deny(_)
        ));
        for (roles, allowed) in [
            (&["admin"][..], true),
            (&["reader"], true),
            (&["producer"], false),
        ] {
            let d = both.decide(&who("ok", roles), &act("QueryUsage")).await;
            assert_eq!(d == Decision::Allow, allowed, "{roles:?}: {d:?}");
        }
    }

    #[tokio::test]
    async fn first_matching_rule_decides_and_nothing_matching_denies() {
        let p = PolicyAuthorizer::default_policy();
        assert_eq!(
            p.decide(&who("a", &["admin"]), &act("CreateMeter")).await,
            Decision::Allow
        );
        assert_eq!(
            p.decide(&who("a", &["producer"]), &act("IngestEvents"))
                .await,
            Decision::Allow
        );
        assert!(matches!(
            p.decide(&who("a", &["producer"]), &act("QueryUsage")).await,
            Decision::Deny(_)
        ));
        assert_eq!(
            p.decide(&who("a", &["reader"]), &act("QueryUsage")).await,
            Decision::Allow
        );
        assert!(matches!(
            p.decide(&who("a", &[]), &act("QueryUsage")).await,
            Decision::Deny(_)
        ));

        let rules = r#"
            [[rules]]
            tenants = ["blocked"]
            effect = "deny"
            [[rules]]
            tenants = ["ok"]
            subjects = ["leaked"]
            effect = "deny"
            [[rules]]
            roles = ["admin"]
            effect = "allow"
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, rules).unwrap();
        let p = PolicyAuthorizer::load(&path).unwrap();
        assert!(matches!(
            p.decide(&who("blocked", &["admin"]), &act("QueryUsage"))
                .await,
            Decision::Deny(_)
        ));
        assert_eq!(
            p.decide(&who("ok", &["admin"]), &act("QueryUsage")).await,
            Decision::Allow
        );
        let leaked = Identity {
            subject: "leaked".into(),
            ..who("ok", &["admin"])
        };
        assert!(matches!(
            p.decide(&leaked, &act("QueryUsage")).await,
            Decision::Deny(_)
        ));
        assert!(PolicyAuthorizer::load(&dir.path().join("nope")).is_err());
        std::fs::write(&path, "[[rules]]\neffect = \"maybe\"").unwrap();
        assert!(PolicyAuthorizer::load(&path)
            .err()
            .unwrap()
            .contains("not valid"));
    }
}
