//! One large transfer through the target: an upload (`POST /upload`, the
//! body streamed from one shared buffer with a Content-Length) or a download
//! (`GET /download?bytes=N`, read and dropped); both check the byte count
//! and are timed from the request to the last byte.

use std::time::Instant;

use bytes::Bytes;

const CHUNK: usize = 256 * 1024;

/// Seconds the transfer of `bytes` took.
pub async fn upload(base: &str, cookie: Option<&str>, bytes: u64) -> anyhow::Result<f64> {
    let http = client();
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let body = futures::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= bytes {
                return None;
            }
            let n = (CHUNK as u64).min(bytes - sent) as usize;
            Some((Ok::<_, std::io::Error>(chunk.slice(..n)), sent + n as u64))
        }
    });
    let mut req = http
        .post(format!("{base}/upload"))
        .header(reqwest::header::CONTENT_LENGTH, bytes)
        .body(reqwest::Body::wrap_stream(body));
    if let Some(c) = cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    let t0 = Instant::now();
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(status == 200, "upload answered {status}: {text}");
    let got: serde_json::Value = serde_json::from_str(&text)?;
    anyhow::ensure!(got["bytes"].as_u64() == Some(bytes), "the backend received {text}, not {bytes} bytes");
    Ok(secs)
}

/// Seconds the transfer of `bytes` took.
pub async fn download(base: &str, cookie: Option<&str>, bytes: u64) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let http = client();
    let mut req = http.get(format!("{base}/download?bytes={bytes}"));
    if let Some(c) = cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    let t0 = Instant::now();
    let resp = req.send().await?;
    anyhow::ensure!(resp.status() == 200, "download answered {}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut got: u64 = 0;
    while let Some(chunk) = stream.next().await {
        got += chunk?.len() as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "received {got} bytes, not {bytes}");
    Ok(secs)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("HTTP client")
}
