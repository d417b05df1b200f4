//! The forward-auth pattern's session check (as Authelia or oauth2-proxy are
//! deployed behind nginx `auth_request`), for the benchmark: 204 when the
//! `s` cookie names a key in Redis, with the user it holds in `Remote-User`
//! and `Remote-Groups` (as Authelia answers), 401 otherwise.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use redis::IntoConnectionInfo;

pub(crate) async fn serve(listen: &str, redis_url: &str) {
    // One multiplexed connection, on a socket opened here: the client's own
    // connect would link its TLS and cluster code into this small tool.
    let info = redis_url.into_connection_info().expect("redis url");
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else { panic!("redis over plain TCP") };
    // Nagle left on, as the client's own connect leaves it.
    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await.expect("redis");
    let (redis, driver) =
        MultiplexedConnection::new_with_config(info.redis_settings(), tcp, AsyncConnectionConfig::new())
            .await
            .expect("redis");
    tokio::spawn(driver);
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    loop {
        let (tcp, _) = listener.accept().await.expect("accept");
        let redis = redis.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let mut redis = redis.clone();
                async move {
                    let session = request
                        .headers()
                        .get("cookie")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|c| c.split(';').find_map(|p| p.trim().strip_prefix("s=")))
                        .map(str::to_string);
                    let user = match session {
                        Some(s) => redis::cmd("GET")
                            .arg(format!("session:{s}"))
                            .query_async::<Option<String>>(&mut redis)
                            .await
                            .ok()
                            .flatten(),
                        None => None,
                    };
                    let mut response = Response::new(Full::new(Bytes::new()));
                    match user.and_then(|u| http::HeaderValue::try_from(u).ok()) {
                        Some(user) => {
                            *response.status_mut() = StatusCode::NO_CONTENT;
                            response.headers_mut().insert("remote-user", user);
                            response
                                .headers_mut()
                                .insert("remote-groups", http::HeaderValue::from_static("user"));
                        }
                        None => *response.status_mut() = StatusCode::UNAUTHORIZED,
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            // nginx asks over HTTP/1.1 keep-alive.
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}
