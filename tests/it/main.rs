//! Integration tests: real Portcullis instances and real upstream processes on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod aggregate;
mod auth;
mod authserver;
mod dropin;
mod eras;
mod external;
mod failclosed;
mod hotpath;
mod idp;
mod login;
mod oauth;
mod operating;
mod process;
mod protocol;
mod replicas;
mod secrets;
mod support;
mod tls;
mod tokens;
mod upstream;
