//! A minimal HTTP/1.1 client over a tokio TCP stream, for talking to the UI and to chromedriver on loopback:
//! one request per connection (`Connection: close`), the body read by its `Content-Length` or to the end.
//! Enough for tests and the benchmark, and no HTTP client crate in the tree for it.
#![allow(dead_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method path` to `addr` (`127.0.0.1:port`) with an optional JSON body.
pub async fn request(addr: &str, method: &str, path: &str, json: Option<&str>) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = json.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n{}Content-Length: {}\r\n\r\n",
        if json.is_some() { "Content-Type: application/json; charset=utf-8\r\n" } else { "" },
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (status, header_end, length) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before the headers"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
            });
            break (status, end + 4, length);
        }
    };
    let mut body = buf.split_off(header_end);
    loop {
        if length.is_some_and(|l| body.len() >= l) {
            break;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if let Some(l) = length {
        body.truncate(l);
    }
    Ok(Response { status, body })
}

pub async fn get(addr: &str, path: &str) -> std::io::Result<Response> {
    request(addr, "GET", path, None).await
}
