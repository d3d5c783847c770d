//! Headless Chromium driven through chromedriver with the W3C WebDriver protocol: a session, navigation,
//! scripts, screenshots. Only the handful of commands the browser test needs, spoken over [`super::http`].
#![allow(dead_code)]

use super::http;
use base64::Engine;
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// chromedriver as a child process on a free loopback port, killed when dropped.
pub struct Driver {
    child: std::process::Child,
    pub addr: String,
    log: std::path::PathBuf,
}

impl Driver {
    pub fn start() -> Driver {
        let port = omega::etcd_process::free_port().expect("a free port for chromedriver");
        let log = std::env::temp_dir().join(format!("omega-test-chromedriver-{}.log", std::process::id()));
        let child =
            Command::new(std::env::var("OMEGA_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()))
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver (Debian's chromium-driver; deploy/install-deps.sh installs it)");
        Driver { child, addr: format!("127.0.0.1:{port}"), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A headless Chromium session.
    pub async fn session(&self) -> Session {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("OMEGA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1"]
            }
        }}});
        let v = call(&self.addr, "POST", "/session", Some(caps)).await.expect("a chromium session");
        let id = v["sessionId"].as_str().expect("a session id").to_string();
        Session { addr: self.addr.clone(), id }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Session {
    addr: String,
    id: String,
}

/// A WebDriver command; its `value`, or the driver's error in words.
async fn call(addr: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let text = body.map(|b| b.to_string());
    let resp = http::request(addr, method, path, text.as_deref()).await.map_err(|e| format!("{method} {path}: {e}"))?;
    let v: Value = serde_json::from_slice(&resp.body).map_err(|e| format!("{method} {path}: {e}: {}", resp.text()))?;
    if resp.status != 200 {
        return Err(format!("{method} {path}: {} {}", resp.status, v["value"]));
    }
    Ok(v["value"].clone())
}

impl Session {
    async fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, String> {
        call(&self.addr, method, &format!("/session/{}{what}", self.id), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await.expect("navigate");
    }

    /// Runs `script` (a function body; `return` its result) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).await.expect("run a script")
    }

    /// Saves a screenshot of the whole page, however tall, as PNG (Chromium's own capture, through
    /// chromedriver's DevTools command: WebDriver's screenshot is of the window only).
    pub async fn screenshot(&self, path: &std::path::Path) {
        let shot = self
            .cmd(
                "POST",
                "/goog/cdp/execute",
                Some(json!({"cmd": "Page.captureScreenshot", "params": {"format": "png", "captureBeyondViewport": true}})),
            )
            .await
            .expect("screenshot");
        let png =
            base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap_or("")).expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    pub async fn close(self) {
        let _ = self.cmd("DELETE", "", None).await;
    }
}
