//! What the UI's tests and benchmark share: a tiny HTTP client and a WebDriver session.
pub mod http;
pub mod webdriver;
