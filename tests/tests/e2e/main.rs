#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! End-to-end tests: one test binary (link time matters on 2 cores), real
//! clients and servers on 127.0.0.1 ephemeral ports.

mod admin;
mod attacks;
mod deploy;
mod hardening;
mod lifecycle;
mod login;
mod pages;
mod proxy;
mod screening;
mod store;
mod tls;
