//! E-mail: one plain-text message per approver that has an address, over SMTP (lettre on
//! tokio). `smtp://host:port` is plain SMTP (a local relay or sink), `smtp://host:port?tls=required`
//! upgrades with STARTTLS, `smtps://host:port` is TLS from the first byte; TLS is rustls with the
//! system's roots. `user:password@` in the URL logs in.
//!
//! One attempt mails every recipient not mailed yet for this notification; if some fail, the
//! attempt fails and the retry mails those again, not the ones already mailed (each would get
//! another message, with other links).
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use creto_schemas::oversight::v1::Channel;
use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::links::LinkSigner;
use super::{action_name, parameters, priority_name, rfc3339, Links, Notification, Sender};

pub struct EmailSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to_domain: Option<String>,
    /// Domains addresses may be at (lowercase); empty: any.
    domains: Vec<String>,
    signer: Option<LinkSigner>,
    /// Addresses mailed so far, per notification (tenant, request, level) not yet mailed to
    /// everyone: what a retry skips.
    mailed: Mutex<HashMap<(String, String, u32), HashSet<String>>>,
}

/// Notifications with recipients still to mail that are remembered; past it, forgotten (a
/// retry then mails everyone again).
const MAILED_REMEMBERED: usize = 10_000;

impl EmailSender {
    /// `smtp_url` as in the module docs; `from` a mailbox (`Name <addr>` or `addr`). Approvers
    /// without '@' are mailed at `<approver>@<to_domain>` when it is set; with `domains`, only
    /// addresses at one of them are mailed. With `signer`, each
    /// recipient gets links signed for their own identity; without, the notification's links.
    pub fn new(
        smtp_url: &str,
        from: &str,
        to_domain: Option<String>,
        domains: Vec<String>,
        signer: Option<LinkSigner>,
        timeout: Duration,
    ) -> Result<EmailSender, String> {
        let from: Mailbox = from
            .parse()
            .map_err(|e| format!("OVERSIGHT_EMAIL_FROM {from:?} is not a mailbox: {e}"))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url)
            // The URL may hold a password: not in the message.
            .map_err(|e| format!("OVERSIGHT_SMTP_URL is not usable: {e}"))?
            .timeout(Some(timeout))
            .build();
        Ok(EmailSender {
            transport,
            from,
            to_domain,
            domains,
            signer,
            mailed: Mutex::new(HashMap::new()),
        })
    }

    /// (approver, address) for each approver that can be mailed.
    fn recipients<'a>(&self, approvers: &'a [String]) -> Vec<(&'a str, String)> {
        let mut out: Vec<(&str, String)> = Vec::new();
        for a in approvers {
            let address = if a.contains('@') {
                a.clone()
            } else if let Some(domain) = &self.to_domain {
                format!("{a}@{domain}")
            } else {
                continue;
            };
            // Only addresses a policy names in full: those at OVERSIGHT_EMAIL_TO_DOMAIN are the
            // operator's own.
            let domain = address.rsplit('@').next().unwrap_or_default();
            if a.contains('@')
                && !self.domains.is_empty()
                && !self.domains.contains(&domain.to_ascii_lowercase())
            {
                // A tenant's policy may name anyone: this relay mails only where it was told.
                tracing::warn!(address = %address, "approver's address is outside OVERSIGHT_EMAIL_DOMAINS; not mailed");
                continue;
            }
            if !out.iter().any(|(_, x)| x.eq_ignore_ascii_case(&address)) {
                out.push((a, address));
            }
        }
        out
    }
}

/// "[Approval needed][HIGH] payments.refund by agent-7"
pub fn subject(n: &Notification) -> String {
    format!(
        "[Approval needed][{}] {} by {}",
        priority_name(n.request.priority),
        action_name(&n.request),
        n.request.agent_id
    )
}

/// The text body for one recipient.
pub fn body(n: &Notification, links: Option<&Links>) -> String {
    let r = &n.request;
    let mut b = format!(
        "{agent} asks for approval to run {action} (priority {priority}).\n\n",
        agent = r.agent_id,
        action = action_name(r),
        priority = priority_name(r.priority),
    );
    b.push_str(&format!("Tenant:   {}\n", n.tenant));
    b.push_str(&format!("Request:  {}\n", r.request_id));
    b.push_str(&format!("Level:    {}\n", n.level));
    if let Some(deadline) = rfc3339(r.deadline.as_ref()) {
        b.push_str(&format!("Deadline: {deadline}\n"));
    }
    b.push_str("\nContext:\n");
    b.push_str(if r.context.trim().is_empty() {
        "(none given)"
    } else {
        &r.context
    });
    b.push_str("\n\nParameters:\n");
    b.push_str(&serde_json::to_string_pretty(&parameters(r)).unwrap_or_default());
    b.push_str("\n\n");
    match links {
        Some(l) => {
            b.push_str(&format!("Approve: {}\n\n", l.approve));
            b.push_str(&format!("Deny:    {}\n\n", l.deny));
            b.push_str(&format!("Open the request: {}\n\n", l.page));
            b.push_str(
                "The approve and deny links answer as you, once: do not forward this e-mail.\n",
            );
        }
        None => b.push_str(&format!(
            "Answer with Respond on the oversight API (request {}).\n",
            r.request_id
        )),
    }
    b
}

#[async_trait::async_trait]
impl Sender for EmailSender {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    async fn send(&self, n: &Notification) -> Result<(), String> {
        let recipients = self.recipients(&n.request.approvers);
        if recipients.is_empty() {
            return Err(
                "no approver has an e-mail address this deployment mails (see OVERSIGHT_EMAIL_TO_DOMAIN and OVERSIGHT_EMAIL_DOMAINS)"
                    .to_owned(),
            );
        }
        let subject = subject(n);
        let key = (n.tenant.clone(), n.request.request_id.clone(), n.level);
        let done = self
            .mailed
            .lock()
            .expect("mailed lock")
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let mut failures = Vec::new();
        for (approver, address) in &recipients {
            if done.contains(address) {
                continue;
            }
            let to: Mailbox = match address.parse() {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{address}: not an address ({e})"));
                    continue;
                }
            };
            let links = match &self.signer {
                Some(s) => Some(s.links_until(
                    &n.tenant,
                    &n.request.request_id,
                    approver,
                    super::deadline_of(&n.request),
                )),
                None => n.links.clone(),
            };
            let message = Message::builder()
                .from(self.from.clone())
                .to(to)
                .subject(subject.as_str())
                // <random@hostname>: not every relay adds one, and its absence looks like spam.
                .message_id(None)
                .header(ContentType::TEXT_PLAIN)
                .body(body(n, links.as_ref()));
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{address}: {e}"));
                    continue;
                }
            };
            match self.transport.send(message).await {
                // Remembered at once: a delivery cut short (its time limit) retries only the
                // rest.
                Ok(_) => {
                    let mut mailed = self.mailed.lock().expect("mailed lock");
                    if mailed.len() >= MAILED_REMEMBERED && !mailed.contains_key(&key) {
                        mailed.clear();
                    }
                    mailed
                        .entry(key.clone())
                        .or_default()
                        .insert(address.clone());
                }
                Err(e) => failures.push(format!("{address}: {e}")),
            }
        }
        if failures.is_empty() {
            self.mailed.lock().expect("mailed lock").remove(&key);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} recipients failed: {}",
                failures.len(),
                recipients.len(),
                failures.join("; ")
            ))
        }
    }
}
