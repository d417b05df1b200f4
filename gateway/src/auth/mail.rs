//! Email: sign-in and invite links over SMTP (lettre: implicit TLS, STARTTLS
//! or a plain local relay, with authentication from the URL). With no SMTP
//! configured, links go to the log with a warning: development only.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use serde::Serialize;

use crate::config::Email;
use crate::ui::{i18n, Lang, Ui};

pub struct Mailer {
    ui: std::sync::Arc<Ui>,
    way: Way,
}

enum Way {
    Smtp { transport: AsyncSmtpTransport<Tokio1Executor>, from: Mailbox },
    Log,
}

/// What the link email's templates show.
#[derive(Serialize)]
struct LinkView<'a> {
    subject: &'a str,
    intro: &'a str,
    user: &'a str,
    valid_for: &'a str,
    link: &'a str,
}

/// What an email is for; decides its wording.
#[derive(Debug, Clone, Copy)]
pub enum LinkKind {
    SignIn,
    Invite,
}

impl Mailer {
    pub fn check_url(url: &str) -> Result<(), String> {
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map(|_| ()).map_err(|e| e.to_string())
    }

    pub fn new(email: &Email, ui: std::sync::Arc<Ui>) -> Result<Self, String> {
        let Some(url) = &email.smtp_url else {
            tracing::warn!(
                "email.smtp_url is empty: sign-in links will be written to the log (development only)"
            );
            return Ok(Self { ui, way: Way::Log });
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("email.smtp_url: {e}"))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        let from = email.from.parse::<Mailbox>().map_err(|e| format!("email.from: {e}"))?;
        Ok(Self { ui, way: Way::Smtp { transport, from } })
    }

    /// Sends a link, in `lang`. Errors are for the log only: the person
    /// was already told "if an account matches, we sent a link", whatever
    /// happens here.
    pub async fn send_link(
        &self,
        kind: LinkKind,
        to: &str,
        user: &str,
        lang: Lang,
        link: &str,
        valid_for: Duration,
    ) -> Result<(), String> {
        let ui = &self.ui;
        let product = ui.brand.product.as_str();
        let (subject_key, intro_key) = match kind {
            LinkKind::SignIn => ("mail.sign_in.subject", "mail.sign_in.intro"),
            LinkKind::Invite => ("mail.invite.subject", "mail.invite.intro"),
        };
        let subject = ui.text(lang, subject_key, &[("product", product)]);
        let intro = ui.text(lang, intro_key, &[]);
        let valid_for = i18n::duration(lang, valid_for);
        let view = LinkView { subject: &subject, intro: &intro, user, valid_for: &valid_for, link };
        let text = ui.render(lang, "email-link.txt", "", &subject, &view).map_err(|e| e.to_string())?;
        let html = ui.render(lang, "email-link.html", "", &subject, &view).map_err(|e| e.to_string())?;
        match &self.way {
            Way::Log => {
                tracing::warn!(%user, %link, "no SMTP configured: this sign-in link would have been emailed");
                Ok(())
            }
            Way::Smtp { transport, from } => {
                let to: Mailbox = to.parse().map_err(|e| format!("recipient: {e}"))?;
                let message = Message::builder()
                    .from(from.clone())
                    .to(to)
                    .subject(subject)
                    .multipart(MultiPart::alternative_plain_html(text, html))
                    .map_err(|e| e.to_string())?;
                transport.send(message).await.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    }
}
