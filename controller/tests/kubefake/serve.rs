//! The in-memory API server over HTTP/1.1 on loopback, for programs that reach a cluster
//! through a kubeconfig (`sidenetctl --kubeconfig`, a `sidenet-controller kubernetes` process).
//! Requests and answers with a `content-length` body, keep-alive; a watch is answered with a
//! chunked body, one chunk per event as it happens, until the client goes away.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use bytes::Bytes;
use http::{Method, Uri};
use http_body_util::BodyExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::FakeApi;

/// Serves `api` on 127.0.0.1; returns the port. The task ends with the runtime.
pub async fn serve(api: FakeApi) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // As a real API server (Go sets it on every connection): without it, Nagle's
            // algorithm holds each answer back for the client's delayed acknowledgement
            // (about 40 ms a request).
            let _ = stream.set_nodelay(true);
            let api = api.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
                        return;
                    };
                    let (method, target) = (method.to_string(), target.to_string());
                    let mut len = 0usize;
                    let mut ct = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            match k.trim().to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "content-type" => ct = v.trim().to_string(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let method = Method::from_bytes(method.as_bytes()).unwrap();
                    let uri: Uri = target.parse().unwrap();
                    let watch = uri.query().is_some_and(|q| {
                        q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1")
                    });
                    let resp = api.handle(method, uri, ct, Bytes::from(body));
                    let status = resp.status();
                    if watch && status.is_success() {
                        let head = format!(
                            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                            status.as_u16(),
                            status.canonical_reason().unwrap_or(""),
                        );
                        if w.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        let mut events = resp.into_body();
                        while let Some(Ok(frame)) = events.frame().await {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            if data.is_empty() {
                                continue;
                            }
                            let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
                            chunk.extend_from_slice(&data);
                            chunk.extend_from_slice(b"\r\n");
                            if w.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                        if w.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let bytes = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let head = format!(
                        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        status.as_u16(),
                        status.canonical_reason().unwrap_or(""),
                        bytes.len()
                    );
                    let mut answer = head.into_bytes();
                    answer.extend_from_slice(&bytes);
                    if w.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A kubeconfig at `path` whose current context reaches `port` over plain HTTP, namespace
/// `namespace`.
pub fn kubeconfig(path: &Path, port: u16, namespace: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: admin\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: admin\n  user: {{}}\n"
        ),
    )
    .unwrap();
}
