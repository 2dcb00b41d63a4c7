//! A minimal W3C WebDriver client (JSON over HTTP to chromedriver) for the browser tests:
//! just what they use, so no browser-automation dependency is needed.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::request;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver plus one headless Chromium session; both end on drop.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    /// Chromium's profile; dropped after the session and the driver have ended.
    _profile: crate::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Browser {
    pub fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; .ci/run installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let ready = crate::wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).ok()?;
            let r = request(addr, "GET", "/status", None, &[], None);
            (r.status == 200).then_some(())
        });
        assert!(ready.is_some(), "chromedriver did not start");
        let profile = crate::temp_dir("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let mut b = Browser { driver, addr, session: String::new(), _profile: profile };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r =
            request(self.addr, method, path, None, &[("Content-Type", "application/json")], bytes.as_deref());
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if r.status >= 400 {
            panic!("webdriver {method} {path}: {} {}", r.status, r.text());
        }
        v["value"].clone()
    }

    fn s(&self, tail: &str) -> String {
        format!("/session/{}{tail}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    pub fn set_window(&self, width: u32, height: u32) {
        self.call("POST", &self.s("/window/rect"), Some(json!({"width": width, "height": height})));
    }

    /// Runs JavaScript in the page and returns its result.
    pub fn js(&self, script: &str) -> Value {
        self.call("POST", &self.s("/execute/sync"), Some(json!({"script": script, "args": []})))
    }

    fn find(&self, css: &str) -> Option<String> {
        let r = request(
            self.addr,
            "POST",
            &self.s("/element"),
            None,
            &[("Content-Type", "application/json")],
            Some(json!({"using": "css selector", "value": css}).to_string().as_bytes()),
        );
        if r.status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&r.body).ok()?;
        v["value"][ELEMENT_KEY].as_str().map(str::to_string)
    }

    /// Text of the first element matching `css`, if any.
    pub fn text(&self, css: &str) -> Option<String> {
        let id = self.find(css)?;
        self.call("GET", &self.s(&format!("/element/{id}/text")), None).as_str().map(str::to_string)
    }

    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let id = self.find(css)?;
        self.call("GET", &self.s(&format!("/element/{id}/attribute/{name}")), None)
            .as_str()
            .map(str::to_string)
    }

    pub fn exists(&self, css: &str) -> bool {
        self.find(css).is_some()
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css).unwrap_or_else(|| panic!("no element {css}"));
        self.call("POST", &self.s(&format!("/element/{id}/click")), Some(json!({})));
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).unwrap_or_else(|| panic!("no element {css}"));
        self.call("POST", &self.s(&format!("/element/{id}/value")), Some(json!({"text": text})));
    }

    /// Waits until `f` holds, or panics naming `what` (and saves a screenshot for it).
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let shot = crate::artifacts_dir()
            .join(format!("timeout-{}.png", what.replace(|c: char| !c.is_alphanumeric(), "_")));
        self.screenshot(&shot);
        panic!("timed out waiting for {what} (screenshot: {})", shot.display());
    }

    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let b64 = self.call("GET", &self.s("/screenshot"), None);
        if let Some(data) =
            b64.as_str().and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        {
            let _ = std::fs::write(path, data);
        }
    }

    /// Console messages at level SEVERE since the last call. Panics when the driver does not
    /// answer the log request with a list (an unsupported endpoint would otherwise read as a
    /// clean console).
    pub fn console_errors(&self) -> Vec<String> {
        let r = request(
            self.addr,
            "POST",
            &self.s("/se/log"),
            None,
            &[("Content-Type", "application/json")],
            Some(br#"{"type":"browser"}"#),
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let entries = match (r.status, v["value"].as_array()) {
            (200, Some(entries)) => entries,
            _ => panic!("the driver's browser log answered {}: {}", r.status, r.text()),
        };
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(self.addr, "DELETE", &format!("/session/{}", self.session), None, &[], None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
