//! The relay link over TCP, in one process: TLS over TCP, WebSocket, the race against QUIC, HTTP
//! proxies and a proxy that inspects TLS. (Blocked UDP in real network namespaces, tinyproxy and
//! nginx: `firewall_netns.rs`.)
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::tandem_net::Transport;
use tandem_client::tandem_net::dial::TcpTarget;
use tandem_client::tandem_net::proxy::Proxy;
use tandem_client::{ClientError, ConnectOptions, ProxyChoice, RelayLink, Transports};
use tandem_tests::{TestRelay, datagram_arrives, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// A paired agent and console with the agent's link made by `agent_opts`.
async fn pair_with(relay: &TestRelay, agent_opts: &ConnectOptions) -> (RelayLink, RelayLink) {
    let mut agent = within(RelayLink::connect(agent_opts)).await.unwrap();
    let (slot, _) = within(agent.register()).await.unwrap();
    let mut console = relay.console().await;
    within(console.join(&slot)).await.unwrap();
    within(agent.wait_paired()).await.unwrap();
    (agent, console)
}

async fn exchange(agent: &RelayLink, console: &RelayLink) {
    let max = agent.max_datagram_size().min(console.max_datagram_size());
    assert!(max >= 1100, "datagram size {max}");
    for len in [1, 500, max] {
        datagram_arrives(agent, console, len).await;
        datagram_arrives(console, agent, len).await;
    }
    // A large payload through the payload stream (the path of frames bigger than a datagram).
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let mut tx = within(agent.open_payload_stream()).await.unwrap();
    within(tx.send(&big)).await.unwrap();
    let mut rx = within(console.accept_payload_stream()).await.unwrap();
    let got = within(rx.recv()).await.unwrap().unwrap();
    assert_eq!(&got[..], &big[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_over_tcp_link_pairs_and_forwards_with_a_quic_peer() {
    let relay = TestRelay::start().await;
    let mut opts = relay.opts();
    opts.transports = Transports::Tcp;
    let (agent, console) = pair_with(&relay, &opts).await;
    assert_eq!(agent.transport(), Transport::Tcp);
    assert_eq!(console.transport(), Transport::Quic);
    exchange(&agent, &console).await;
    let (_, m) = relay.http_get("/metrics").await;
    assert_eq!(
        metric(
            &m,
            "tandem_relay_connections_accepted_total{transport=\"tcp\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "tandem_relay_tcp_links{transport=\"tcp\"}"), 1.0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_link_pairs_and_forwards() {
    let relay = TestRelay::start().await;
    let mut opts = relay.opts();
    opts.transports = Transports::Tcp;
    let port = relay.handle().tcp_addrs()[0].port();
    opts.tcp = vec![TcpTarget::websocket(&format!("wss://localhost:{port}/tandem")).unwrap()];
    let (agent, console) = pair_with(&relay, &opts).await;
    assert_eq!(agent.transport(), Transport::WebSocket);
    exchange(&agent, &console).await;

    // Another path is not the relay's WebSocket.
    opts.tcp = vec![TcpTarget::websocket(&format!("wss://localhost:{port}/other")).unwrap()];
    opts.timeout = Duration::from_secs(3);
    let e = within(RelayLink::connect(&opts))
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("404"), "{e}");
    relay.shutdown().await;
}

/// QUIC gets no answer (its "relay" address is a UDP socket that reads nothing): TCP, started
/// after the race delay, wins long before QUIC's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_wins_the_race_when_quic_is_silent() {
    let relay = TestRelay::start().await;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut opts = ConnectOptions::new(
        silent.local_addr().unwrap().to_string(),
        RelayTrust::Pin(relay.pin),
    );
    opts.tcp = vec![TcpTarget::tls(&relay.handle().tcp_addrs()[0].to_string()).unwrap()];
    opts.timeout = Duration::from_secs(10);
    let t0 = Instant::now();
    let mut link = within(RelayLink::connect(&opts)).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(link.transport(), Transport::Tcp);
    // Decided by the race (300 ms head start), not by QUIC's 10 s timeout.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    within(link.register()).await.unwrap();

    // With QUIC answering, QUIC wins.
    let mut q = within(relay.connect()).await;
    assert_eq!(q.transport(), Transport::Quic);
    within(q.register()).await.unwrap();
    relay.shutdown().await;
}

/// Neither QUIC nor TCP answers: one error that names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_answers_gives_one_error_naming_both_transports() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut opts = ConnectOptions::new(
        silent.local_addr().unwrap().to_string(),
        RelayTrust::Pin(tandem_certs::Fingerprint::of(b"x")),
    );
    opts.tcp = vec![TcpTarget::tls(&format!("127.0.0.1:{closed_port}")).unwrap()];
    opts.timeout = Duration::from_secs(2);
    opts.proxy = ProxyChoice::Direct;
    let e = within(RelayLink::connect(&opts))
        .await
        .err()
        .expect("fails");
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("UDP port"), "{msg}");
    assert!(
        msg.contains("over TCP") && msg.contains(&closed_port.to_string()),
        "{msg}"
    );
}

/// A minimal HTTP CONNECT proxy for tests. With `inspect`, it plays a TLS-inspecting proxy: it
/// answers the TLS handshake itself with a certificate of its own.
async fn test_proxy(
    inspect: Option<tandem_certs::RelayIdentity>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<u32>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut served = 0;
        while let Ok((mut c, _)) = l.accept().await {
            served += 1;
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if c.read_exact(&mut b).await.is_err() {
                    break;
                }
                head.push(b[0]);
            }
            let text = String::from_utf8_lossy(&head).to_string();
            let target = text
                .strip_prefix("CONNECT ")
                .and_then(|r| r.split(' ').next())
                .unwrap_or_default()
                .to_string();
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            match &inspect {
                Some(id) => {
                    let cfg = tandem_certs::server_config(id, b"tandem-tcp/1").unwrap();
                    let acc = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
                    // The handshake fails on the client's side; that is the point.
                    let _ = acc.accept(c).await;
                }
                None => {
                    let mut up = tokio::net::TcpStream::connect(&target).await.unwrap();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                    });
                }
            }
        }
        served
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_carries_the_link_and_an_inspecting_proxy_is_refused() {
    let relay = TestRelay::start().await;
    // QUIC is silent, as on a network that allows only the web through its proxy.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (proxy_addr, proxy_task) = test_proxy(None).await;
    let mut opts = ConnectOptions::new(
        silent.local_addr().unwrap().to_string(),
        RelayTrust::Pin(relay.pin),
    );
    opts.tcp = vec![TcpTarget::tls(&relay.handle().tcp_addrs()[0].to_string()).unwrap()];
    opts.proxy = ProxyChoice::Use(Proxy::parse(&format!("http://{proxy_addr}")).unwrap());
    let (agent, console) = pair_with(&relay, &opts).await;
    assert_eq!(agent.transport(), Transport::Tcp);
    datagram_arrives(&agent, &console, 800).await;
    datagram_arrives(&console, &agent, 800).await;
    drop((agent, console));
    proxy_task.abort();

    // The same through a proxy that replaces the certificate: refused, and the message says why.
    let other = tempfile::tempdir().unwrap();
    let fake = tandem_certs::ensure_identity(other.path(), &[]).unwrap();
    let (mitm_addr, _mitm) = test_proxy(Some(fake)).await;
    opts.proxy = ProxyChoice::Use(Proxy::parse(&format!("http://{mitm_addr}")).unwrap());
    opts.timeout = Duration::from_secs(3);
    let e = within(RelayLink::connect(&opts))
        .await
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("does not match the pinned fingerprint"),
        "{msg}"
    );
    assert!(msg.contains("inspects TLS"), "{msg}");
    assert!(
        msg.contains(&mitm_addr.port().to_string()),
        "names the proxy: {msg}"
    );
    relay.shutdown().await;
}

/// Garbage on the TCP port closes that one connection; the relay keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tcp_port_is_dropped_and_counted() {
    let relay = TestRelay::start().await;
    let tcp = relay.handle().tcp_addrs()[0];
    // Not TLS at all.
    let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = within(s.read(&mut buf)).await.unwrap_or(0);
    assert!(n < 64);
    // TLS, then neither the preamble nor GET.
    let cfg = RelayTrust::Pin(relay.pin)
        .client_config(b"tandem-tcp/1")
        .unwrap();
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp_s = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within(conn.connect(name, tcp_s)).await.unwrap();
    tls.write_all(b"HELO").await.unwrap();
    let _ = within(tls.read(&mut buf)).await;
    // Still serving.
    let mut opts = relay.opts();
    opts.transports = Transports::Tcp;
    let mut link = within(RelayLink::connect(&opts)).await.unwrap();
    within(link.register()).await.unwrap();
    let (_, m) = relay.http_get("/metrics").await;
    assert!(
        metric(
            &m,
            "tandem_relay_tcp_handshake_failures_total{reason=\"tls\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tandem_relay_tcp_handshake_failures_total{reason=\"preamble\"}"
        ) >= 1.0,
        "{m}"
    );
    relay.shutdown().await;
}

/// A raw TLS connection to the relay's TCP front, after the handshake.
async fn raw_tls(
    relay: &TestRelay,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = RelayTrust::Pin(relay.pin).client_config(alpn).unwrap();
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(relay.handle().tcp_addrs()[0])
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    within(conn.connect(name, tcp)).await.unwrap()
}

/// Waits until the relay closes `s` (EOF or error), reading and discarding what comes.
async fn closed_by_relay<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 4096];
    within(async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Strangers on the TCP port: links per address are limited (counted before TLS), a link that
/// carries no QUIC connection is closed after the handshake timeout however it trickles frames,
/// a packet shorter than any QUIC packet ends its link, and a browser's WebSocket is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_front_limits_what_strangers_can_hold() {
    let tcp = tandem_relay_server::TcpConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        links_per_address: 3,
        handshake_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let relay = TestRelay::start_full(tandem_relay_server::Limits::default(), tcp).await;

    // A link that only trickles well-formed frames (no QUIC connection) is closed.
    let mut idle = raw_tls(&relay, b"tandem-tcp/1").await;
    idle.write_all(b"TQ1\n").await.unwrap();
    let t0 = Instant::now();
    let trickle = async {
        loop {
            let mut frame = vec![0u8, 40];
            frame.extend([0x40u8; 40]);
            if idle.write_all(&frame).await.is_err() {
                return;
            }
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(500), idle.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    };
    within(trickle).await;
    let held = t0.elapsed();
    assert!(
        held >= Duration::from_secs(2) && held < Duration::from_secs(8),
        "held {held:?}"
    );

    // A packet of 5 bytes ends its link at once.
    let mut tiny = raw_tls(&relay, b"tandem-tcp/1").await;
    tiny.write_all(b"TQ1\n\x00\x05hello").await.unwrap();
    closed_by_relay(&mut tiny).await;

    // A browser (Origin header) is refused.
    let mut ws = raw_tls(&relay, b"http/1.1").await;
    ws.write_all(
        b"GET /tandem HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Origin: https://evil.example\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 256];
    let n = within(ws.read(&mut answer)).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // Three open TCP connections from this address; the fourth is closed before TLS.
    let mut held = vec![];
    for _ in 0..3 {
        held.push(
            tokio::net::TcpStream::connect(relay.handle().tcp_addrs()[0])
                .await
                .unwrap(),
        );
    }
    let mut fourth = tokio::net::TcpStream::connect(relay.handle().tcp_addrs()[0])
        .await
        .unwrap();
    closed_by_relay(&mut fourth).await;
    let (_, m) = relay.http_get("/metrics").await;
    assert!(
        metric(
            &m,
            "tandem_relay_tcp_links_refused_total{limit=\"tcp_links_per_address\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tandem_relay_tcp_handshake_failures_total{reason=\"no_quic\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(held);
    relay.shutdown().await;
}

/// Behind a trusted reverse proxy, per-address limits go by the client the proxy names in the last
/// entry of the last X-Forwarded-For line, whatever the client itself claimed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_names_the_client_for_limits() {
    let tcp = tandem_relay_server::TcpConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        links_per_address: 1,
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    let relay = TestRelay::start_full(tandem_relay_server::Limits::default(), tcp).await;
    let upgrade = |xff: &str| {
        format!(
            "GET /tandem HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Forwarded-For: {xff}\r\n\r\n"
        )
    };
    // Whether the relay keeps the link open for a moment after the upgrade.
    async fn kept(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> bool {
        let mut buf = vec![0u8; 512];
        let n = within(s.read(&mut buf)).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
            .await
            .is_err()
    }
    let mut first = raw_tls(&relay, b"http/1.1").await;
    first
        .write_all(upgrade("203.0.113.1, 198.51.100.9").as_bytes())
        .await
        .unwrap();
    assert!(kept(&mut first).await, "the first link of 198.51.100.9");
    // The same client claiming to be someone else before the proxy's entry: still 198.51.100.9.
    let mut second = raw_tls(&relay, b"http/1.1").await;
    second
        .write_all(upgrade("192.0.2.77, 198.51.100.9").as_bytes())
        .await
        .unwrap();
    assert!(!kept(&mut second).await, "over 198.51.100.9's share");
    // Another client behind the same proxy has its own share.
    let mut third = raw_tls(&relay, b"http/1.1").await;
    third
        .write_all(upgrade("198.51.100.10").as_bytes())
        .await
        .unwrap();
    assert!(kept(&mut third).await, "198.51.100.10's own share");
    relay.shutdown().await;
}
