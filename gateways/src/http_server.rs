//! The HTTP ports (`/metrics`, `/health`, oversight's approval page): the axum router on hyper's
//! HTTP/1 server, with the limit `axum::serve` leaves out. Without a timer hyper never applies
//! its header read timeout, so a client that opened a connection and sent half a request line
//! (or sent nothing after a response) held it for ever; enough of them took every file
//! descriptor, and the probes and scrapes on this port with them.
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a client has to send a request's head, counted from when the server starts waiting
/// for it: an idle keep-alive connection is closed after as long.
pub const HEADER_READ: Duration = Duration::from_secs(10);
/// How long a stop waits for the requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `stop` changes, then lets requests in flight finish
/// (for at most [`DRAIN`]).
pub async fn serve(listener: TcpListener, router: Router, stop: watch::Receiver<bool>) {
    serve_with(listener, router, stop, HEADER_READ).await
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    header_read: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, mostly: pause instead of spinning on the error.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
        tokio::spawn(graceful.watch(connection));
    }
    // Closed first: while draining, a new client is refused at once instead of waiting in the
    // backlog for an answer that never comes.
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(header_read: Duration) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/health", get(|| async { "up" }));
        let (stop, rx) = watch::channel(false);
        tokio::spawn(serve_with(listener, router, rx, header_read));
        (addr, stop)
    }

    /// Reads until the server closes the connection, or fails after `limit`.
    async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> String {
        let mut seen = Vec::new();
        tokio::time::timeout(limit, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("the server kept the connection open");
        String::from_utf8_lossy(&seen).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_closed() {
        let (addr, _stop) = start(Duration::from_millis(300)).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let began = Instant::now();
        read_to_close(&mut slow, Duration::from_secs(5)).await;
        assert!(began.elapsed() >= Duration::from_millis(250));

        // An idle keep-alive connection is closed as well, after its answer.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut idle, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("up"), "{answer}");
    }

    #[tokio::test]
    async fn a_stop_ends_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, Router::new(), rx));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("still serving after the stop")
            .unwrap();
        // And its port is closed.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
