//! Slack: a Block Kit message POSTed to an incoming webhook. The approve / deny buttons are URL
//! buttons (they open the signed links in the browser), so no Slack app with interactivity is
//! needed. They are sent only when the deployment says its incoming webhook posts to the
//! approver alone (`OVERSIGHT_SLACK_LINKS=approver`): a link answers as the approver it names
//! for whoever clicks it, and one incoming webhook usually posts to a channel many people read
//! (every tenant's requests go to it). Text that comes from the agent (context, parameters) is escaped so it cannot mention
//! `@channel` or forge links.
use creto_schemas::oversight::v1::Channel;
use serde_json::{json, Value};

use super::{
    action_name, check_response, describe_http_error, excerpt, parameters, priority_name, rfc3339,
    Notification, Sender,
};

pub struct SlackSender {
    http: reqwest::Client,
    /// The incoming-webhook URL: a secret, never logged.
    url: String,
    /// Whether messages carry the notification's one-click links.
    links: bool,
}

impl SlackSender {
    pub fn new(http: reqwest::Client, url: String, links: bool) -> SlackSender {
        SlackSender { http, url, links }
    }
}

#[async_trait::async_trait]
impl Sender for SlackSender {
    fn channel(&self) -> Channel {
        Channel::Slack
    }

    async fn send(&self, n: &Notification) -> Result<(), String> {
        let resp = self
            .http
            .post(&self.url)
            .json(&message(n, self.links))
            .send()
            .await
            .map_err(describe_http_error)?;
        check_response(resp).await
    }
}

/// Slack's mrkdwn escaping: `&`, `<` and `>` (which would otherwise make links and mentions).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The message body: a fallback `text` and the blocks; the buttons when `links`.
pub fn message(n: &Notification, links: bool) -> Value {
    let r = &n.request;
    let action = action_name(r);
    let priority = priority_name(r.priority);
    let agent = &r.agent_id;
    let mut blocks = vec![
        json!({
            "type": "header",
            // Header text: plain text, at most 150 characters.
            "text": {"type": "plain_text", "text": excerpt(&format!("Approval needed [{priority}]: {action}"), 150)}
        }),
        json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": excerpt(
                &if r.context.trim().is_empty() { "_No context given._".to_owned() } else { escape(&r.context) },
                3000,
            )}
        }),
    ];
    let mut fields = vec![
        json!({"type": "mrkdwn", "text": format!("*Agent*\n`{}`", escape(agent))}),
        json!({"type": "mrkdwn", "text": format!("*Priority*\n{priority}")}),
        json!({"type": "mrkdwn", "text": format!("*Tenant*\n`{}`", escape(&n.tenant))}),
        json!({"type": "mrkdwn", "text": format!("*Level*\n{}", n.level)}),
    ];
    if let Some(deadline) = rfc3339(r.deadline.as_ref()) {
        fields.push(json!({"type": "mrkdwn", "text": format!("*Deadline*\n{deadline}")}));
    }
    fields
        .push(json!({"type": "mrkdwn", "text": format!("*Request*\n`{}`", escape(&r.request_id))}));
    blocks.push(json!({"type": "section", "fields": fields}));
    let params = serde_json::to_string_pretty(&parameters(r)).unwrap_or_default();
    // A ``` inside the parameters would close the code block early.
    let params = escape(&params).replace("```", "`\u{200b}``");
    blocks.push(json!({
        "type": "section",
        "text": {"type": "mrkdwn", "text": format!("*Parameters*\n```{}```", excerpt(&params, 2900))}
    }));
    match n.links.as_ref().filter(|_| links) {
        Some(links) => blocks.push(json!({
            "type": "actions",
            "block_id": "oversight_decision",
            "elements": [
                {
                    "type": "button",
                    "action_id": "approve",
                    "style": "primary",
                    "text": {"type": "plain_text", "text": "Approve"},
                    "url": links.approve,
                },
                {
                    "type": "button",
                    "action_id": "deny",
                    "style": "danger",
                    "text": {"type": "plain_text", "text": "Deny"},
                    "url": links.deny,
                },
                {
                    "type": "button",
                    "action_id": "open",
                    "text": {"type": "plain_text", "text": "Open request"},
                    "url": links.page,
                },
            ]
        })),
        None => blocks.push(json!({
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": format!(
                "Answer with the link e-mailed to you, or with `Respond` on the oversight API (request `{}`).", escape(&r.request_id)
            )}]
        })),
    }
    json!({
        "text": format!("Approval needed [{priority}]: {} by {}", escape(action), escape(agent)),
        "blocks": blocks,
    })
}
