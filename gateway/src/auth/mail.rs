//! Email: sign-in and invite links over SMTP (lettre: implicit TLS, STARTTLS
//! or a plain local relay, with authentication from the URL). With no SMTP
//! configured, links go to the log with a warning: development only.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::Email;
use crate::error::escape;

pub enum Mailer {
    Smtp { transport: AsyncSmtpTransport<Tokio1Executor>, from: Mailbox },
    Log,
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

    pub fn new(email: &Email) -> Result<Self, String> {
        let Some(url) = &email.smtp_url else {
            tracing::warn!(
                "email.smtp_url is empty: sign-in links will be written to the log (development only)"
            );
            return Ok(Self::Log);
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("email.smtp_url: {e}"))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        let from = email.from.parse::<Mailbox>().map_err(|e| format!("email.from: {e}"))?;
        Ok(Self::Smtp { transport, from })
    }

    /// Sends a link. Errors are for the log only: the person was already told
    /// "if an account matches, we sent a link", whatever happens here.
    pub async fn send_link(
        &self,
        kind: LinkKind,
        to: &str,
        user: &str,
        product: &str,
        link: &str,
        valid_for: Duration,
    ) -> Result<(), String> {
        let minutes = valid_for.as_secs().div_ceil(60);
        let validity =
            if minutes >= 120 { format!("{} hours", minutes / 60) } else { format!("{minutes} minutes") };
        let (subject, intro) = match kind {
            LinkKind::SignIn => {
                (format!("Sign in to {product}"), "Someone (hopefully you) asked for a link to sign in.")
            }
            LinkKind::Invite => (format!("Welcome to {product}"), "An account has been set up for you."),
        };
        let text = format!(
            "{intro}\n\nAccount: {user}\nOpen this link to sign in (it works once, for {validity}):\n\n{link}\n\n\
             After signing in you can create a passkey, so next time your fingerprint, face or device PIN is enough.\n\
             If you did not ask for this, ignore this email.\n"
        );
        let html = format!(
            "<p>{intro}</p><p>Account: <b>{user}</b></p><p><a href=\"{link}\">Sign in to {product}</a></p>\
             <p>The link works once, for {validity}. After signing in you can create a passkey, so next time \
             your fingerprint, face or device PIN is enough.</p><p>If you did not ask for this, ignore this email.</p>",
            intro = escape(intro),
            user = escape(user),
            link = escape(link),
            product = escape(product),
        );
        match self {
            Self::Log => {
                tracing::warn!(%user, %link, "no SMTP configured: this sign-in link would have been emailed");
                Ok(())
            }
            Self::Smtp { transport, from } => {
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
